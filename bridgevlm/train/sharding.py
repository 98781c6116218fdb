"""FSDP2 (`fully_shard`) for one training stage: parameters, gradients and optimizer state are
sharded over the ranks, and the caller's model holds ordinary full weights again afterwards.

The stage trains a sharded copy of the model; the original's parameter storage is released while
it trains, and refilled (an all-gather) whenever full weights are needed: for an evaluation, at
the end. Checkpoints are written consolidated (full tensors), so they load on any world size.

Wrap policy: every module whose class a Hugging Face model lists in `_no_split_modules` (decoder
layers, vision encoder layers) becomes its own FSDP unit, then the root; a unit's parameters are
gathered only while it runs. With `mixed_precision` the units compute in bf16 and reduce gradients
in fp32, while the sharded master weights stay fp32.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def _is_sharded(tensor) -> bool:
    return isinstance(tensor, DTensor)


def wrap_classes(model: nn.Module) -> set[str]:
    """Class names of the units to shard separately, as the model's own HF classes declare them."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def _scalars_to_vectors(model: nn.Module) -> None:
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.dim() == 0:
                module._parameters[name] = nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad)


class FsdpStage:
    def __init__(self, model: nn.Module, mixed_precision: bool = False):
        self.model = model
        self._shapes = {name: p.shape for name, p in model.named_parameters()}
        self.sharded = copy.deepcopy(model)
        _scalars_to_vectors(self.sharded)  # fully_shard cannot shard 0-d parameters (CLIP's logit_scale)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
            else MixedPrecisionPolicy()
        classes = wrap_classes(self.sharded)
        for module in list(self.sharded.modules())[1:]:
            if type(module).__name__ in classes:
                fully_shard(module, mp_policy=policy)
        fully_shard(self.sharded, mp_policy=policy)
        self.release()

    def release(self) -> None:
        """Free the original's parameter storage (the shards hold the weights meanwhile)."""
        for param in self.model.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def full_parameters(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """name -> full tensor; collective: every rank must call it."""
        return {name: (p.full_tensor() if _is_sharded(p) else p).detach().reshape(self._shapes[name])
                for name, p in self.sharded.named_parameters() if p.requires_grad or not trainable_only}

    def gather_into_original(self) -> None:
        """Collective: the original model's parameters get the current full weights."""
        full = self.full_parameters()
        for name, param in self.model.named_parameters():
            param.data = full[name].clone()

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Collective: the optimizer's state dict with every sharded tensor gathered."""
        state_dict = optimizer.state_dict()
        for values in state_dict["state"].values():
            for key, value in values.items():
                if _is_sharded(value):
                    values[key] = value.full_tensor()
        return state_dict

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After loading a consolidated optimizer state: full tensors -> this rank's shards."""
        for param, values in optimizer.state.items():
            if not _is_sharded(param):
                continue
            for key, value in values.items():
                if torch.is_tensor(value) and not _is_sharded(value) and value.shape == param.shape:
                    values[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)

    def set_gradient_sync(self, enabled: bool) -> None:
        """Off for the micro-batches of an accumulation window but the last (no reduce-scatter)."""
        self.sharded.set_requires_gradient_sync(enabled)
