"""The one training loop every stage of every model runs."""
from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bridgevlm.models.output import LossOutput
from bridgevlm.train.checkpoint import (
    CheckpointError,
    get_rng_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from bridgevlm.train.distributed import DistContext, all_reduce_sum, barrier, init_distributed
from bridgevlm.train.optim import (
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    build_scheduler,
    describe_trainable,
)
from bridgevlm.train.sampler import EpochShare, LengthGrouping, ResumableSampler
from bridgevlm.train.sharding import FsdpStage

logger = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module, int], dict[str, float]]


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 8  # per rank, per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    max_steps: int = 0  # optimiser steps; 0 -> derived from `epochs`
    epochs: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = torch.autocast on the device type
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    num_workers: int = 0
    # Batch samples of similar length and one modality together (the dataset must offer
    # `lengths()` and `modalities()`): less padding computed, same samples per epoch.
    group_by_length: bool = False
    # With several ranks (torchrun): "ddp" replicates the model; "fsdp" shards parameters,
    # gradients and optimizer state with FSDP2 (per-layer units, bf16 compute with precision: bf16).
    distributed: Literal["ddp", "fsdp"] = "ddp"
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class TrainResult:
    steps: int  # the global optimiser step reached
    final_loss: float  # loss of the last logged interval (nan if this call logged none)
    history: list[dict]  # every metrics line this call logged, eval lines included
    run_dir: Path


def train_stage(
    model: nn.Module,
    dataset: Dataset,  # map-style, with __len__
    collate_fn: Callable[[list], dict],
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    eval_fn: EvalFn | None = None,
    dist: DistContext | None = None,
    config_to_save: dict | None = None,
    stop_after_steps: int | None = None,
    progress: bool = True,
    sampler: EpochShare | None = None,
) -> TrainResult:
    """Train the parameters of `model` that require grad on `dataset`, resuming from the latest
    checkpoint under `run_dir/checkpoints` if there is one.

    `model(batch)` returns a `LossOutput` whose loss is summed over its targets; each optimiser
    step divides by the number of targets in the whole accumulation window over all ranks, so
    every target weighs the same however targets are spread over micro-batches and ranks.
    A resumed run is bit-identical to an uninterrupted one (same batch layout and world size).
    `stop_after_steps` ends the call once that global step is reached, after saving a checkpoint
    (an interruption; the final evaluation is skipped). `sampler` replaces the default
    (seed, epoch)-shuffled one with this rank's share of another draw, e.g. a `MixtureSampler`
    over a ConcatDataset; it follows `EpochShare`'s contract, so resume stays exact. A dataset with
    `set_epoch(epoch)` (random prefix-LM caption splits) is told each epoch before it is read.

    Writes `run_dir/metrics.jsonl` (one JSON line per log) and
    `run_dir/checkpoints/step_<N:08d>/` with the trainable parameters, optimiser, scheduler, RNG
    and position in the data.
    """
    dist = dist or init_distributed()
    device = dist.device
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    _check_config(cfg)

    # Build: seed, move, and show what trains.
    seed_everything(cfg.seed)
    model.to(device)
    model.train()
    if dist.is_main:
        logger.info("trainable parameters:\n%s", describe_trainable(model))

    # Data: this rank's share of a (seed, epoch)-determined permutation.
    if len(dataset) == 0:
        raise ValueError("the dataset is empty; nothing to train on")
    if sampler is None:
        grouping = _length_grouping(dataset, cfg.batch_size * dist.world_size) if cfg.group_by_length else None
        sampler = ResumableSampler(len(dataset), dist.rank, dist.world_size, seed=cfg.seed, grouping=grouping)
    elif cfg.group_by_length:
        raise ValueError("group_by_length orders the default sampler's draws; it cannot reorder a given sampler")
    elif (sampler.rank, sampler.world_size) != (dist.rank, dist.world_size):
        raise ValueError(f"the sampler was built for rank {sampler.rank} of {sampler.world_size}, "
                         f"but this process is rank {dist.rank} of {dist.world_size}")
    if cfg.batch_size > sampler.share:
        raise ValueError(
            f"batch_size {cfg.batch_size} is larger than this rank's share of the dataset "
            f"({sampler.share} of {len(dataset)} samples over {dist.world_size} rank(s)); "
            "lower batch_size or add data"
        )
    # The loader gets its own generator so creating an iterator never draws from the global RNG
    # (which would make a resumed run diverge); it only seeds the workers.
    loader_generator = torch.Generator()
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        generator=loader_generator,
    )
    # An accumulation window never crosses an epoch: the last one of an epoch may be shorter.
    batches_per_epoch = math.ceil(sampler.share / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # Load the weights of the latest checkpoint, if any, before anything is wrapped or sharded.
    layout = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
              "world_size": dist.world_size}
    step, epoch, batch_in_epoch = 0, 0, 0
    resume_from = latest_checkpoint(ckpt_root)
    if resume_from is not None:
        model_state, saved = load_checkpoint(resume_from, restore_rng=False)
        _check_same_layout(saved, layout, resume_from)
        _load_trainable(model, model_state, resume_from)

    # Wrap: DDP replicates and averages gradients on the last backward of each window; FSDP2
    # shards parameters, gradients and optimizer state (and reduce-scatters the gradients).
    fsdp = FsdpStage(model, mixed_precision=cfg.precision == "bf16") \
        if dist.world_size > 1 and cfg.distributed == "fsdp" else None
    ddp = dist.world_size > 1 and fsdp is None
    train_model = fsdp.sharded if fsdp else model
    if ddp:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=False
        )
    trainable = [p for p in train_model.parameters() if p.requires_grad]
    optimizer = build_optimizer(fsdp.sharded if fsdp else model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    if resume_from is not None:  # optimizer, scheduler, RNG and the position in the data
        load_checkpoint(resume_from, optimizer, scheduler)
        if fsdp:
            fsdp.shard_optimizer_state(optimizer)
        step, epoch, batch_in_epoch = saved["step"], saved["epoch"], saved["batch_in_epoch"]
        if dist.is_main:
            logger.info("resumed from %s at step %d (epoch %d, batch %d)",
                        resume_from, step, epoch, batch_in_epoch)
    # Under FSDP the mixed-precision policy casts instead.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16" and not fsdp)

    # Train.
    stop_step = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
    history: list[dict] = []
    meter = _Meter()
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (progress and dist.is_main))
    data_iter = None
    if step >= stop_step and dist.is_main:
        logger.info("run in %s is already at step %d of %d; nothing to do",
                    run_dir, step, stop_step)

    while step < stop_step:
        if data_iter is None:
            sampler.set_epoch(epoch)
            sampler.set_start(batch_in_epoch * cfg.batch_size)
            if hasattr(dataset, "set_epoch"):  # before the workers copy it
                dataset.set_epoch(epoch)
            loader_generator.manual_seed(hash((cfg.seed, epoch, dist.rank)) % 2**63)
            data_iter = iter(loader)

        window = min(cfg.grad_accum, batches_per_epoch - batch_in_epoch)
        window_sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss_sum, targets]
        for micro in range(window):
            waited = time.perf_counter()
            batch = next(data_iter)
            meter.data_wait_s += time.perf_counter() - waited
            batch = _to_device(batch, device)
            last = micro == window - 1
            if fsdp:
                fsdp.set_gradient_sync(last)
            with nullcontext() if last or not ddp else train_model.no_sync():
                with autocast:
                    out: LossOutput = train_model(batch)
                out.loss_sum.backward()
            window_sums[0] += out.loss_sum.detach().to(torch.float64)
            window_sums[1] += out.num_targets.detach().to(device, torch.float64)
            meter.add_logs(out.logs)

        # DDP left each grad as the mean over ranks of per-rank target sums: rescale to the mean
        # over every target in the window.
        loss_sum, targets = all_reduce_sum(window_sums).tolist()
        scale = dist.world_size / max(targets, 1.0)
        for p in trainable:
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
        lrs = _lrs(optimizer)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        step += 1
        batch_in_epoch += window
        if batch_in_epoch == batches_per_epoch:
            epoch, batch_in_epoch, data_iter = epoch + 1, 0, None
        meter.add_step(loss_sum, targets)
        bar.update(1)
        # data_wait: the share of time spent waiting for batches; high means loading is the bottleneck
        bar.set_postfix(loss=f"{loss_sum / max(targets, 1.0):.4f}", lr=f"{lrs['lr']:.2e}",
                        tgt_s=f"{meter.targets_per_s():.0f}", data_wait=f"{meter.data_wait_share():.0%}",
                        refresh=False)

        if step % cfg.log_every == 0 or step == stop_step:
            record = {"step": step, "epoch": round(step / steps_per_epoch, 4), **meter.summary(),
                      **lrs}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            _log(record, run_dir, history, dist)
            meter = _Meter()

        if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                    or step == total_steps):
            if fsdp:  # collective: the evaluated model needs its full weights
                fsdp.gather_into_original()
            if dist.is_main:
                results = _evaluate(eval_fn, model, step)
                _log({"step": step, **{f"eval/{k}": v for k, v in results.items()}},
                     run_dir, history, dist)
            barrier()

        # Save: rank 0 writes; the others wait so nobody races ahead of a checkpoint.
        if step == stop_step or (cfg.save_every and step % cfg.save_every == 0):
            # Consolidated under FSDP (a collective gather), so any world size can load it.
            model_state = fsdp.full_parameters(trainable_only=True) if fsdp else \
                {n: p for n, p in model.named_parameters() if p.requires_grad}
            optimizer_state = fsdp.full_optimizer_state(optimizer) if fsdp else optimizer
            if dist.is_main:
                save_checkpoint(
                    ckpt_root / f"step_{step:08d}",
                    model_state=model_state,
                    optimizer=optimizer_state,
                    scheduler=scheduler,
                    train_state={"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                 "total_steps": total_steps, "seed": cfg.seed, **layout},
                    config=config_to_save,
                    keep=cfg.keep_checkpoints,
                )
            barrier()

    bar.close()
    if fsdp:  # collective: the caller's model gets the trained full weights back
        fsdp.gather_into_original()
    train_lines = [r for r in history if "loss" in r]
    final_loss = train_lines[-1]["loss"] if train_lines else math.nan
    return TrainResult(steps=step, final_loss=final_loss, history=history, run_dir=run_dir)


# ---------------------------------------------------------------------------------------------
# helpers


class _Meter:
    """Sums since the last log line."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.loss_sum = 0.0
        self.targets = 0.0
        self.data_wait_s = 0.0
        self.log_sums: dict[str, float] = {}
        self.log_counts: dict[str, int] = {}

    def add_step(self, loss_sum: float, targets: float) -> None:
        self.loss_sum += loss_sum
        self.targets += targets

    def add_logs(self, logs: dict[str, Any]) -> None:
        for key, value in logs.items():
            self.log_sums[key] = self.log_sums.get(key, 0.0) + float(value)
            self.log_counts[key] = self.log_counts.get(key, 0) + 1

    def targets_per_s(self) -> float:
        return self.targets / max(time.perf_counter() - self.started, 1e-9)

    def data_wait_share(self) -> float:
        return self.data_wait_s / max(time.perf_counter() - self.started, 1e-9)

    def summary(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.started
        return {
            # weighted by targets over every micro-batch of every rank since the last log
            "loss": self.loss_sum / max(self.targets, 1.0),
            "targets": self.targets,
            "targets_per_s": self.targets / max(seconds, 1e-9),
            "seconds": seconds,
            "data_wait_s": self.data_wait_s,
            # the model's own logs: mean over this rank's micro-batches
            **{k: self.log_sums[k] / self.log_counts[k] for k in self.log_sums},
        }


def _check_config(cfg: TrainConfig) -> None:
    positive = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "log_every": cfg.log_every}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"TrainConfig.{name} must be >= 1, got {value}")
    if cfg.max_steps < 0 or (cfg.max_steps == 0 and cfg.epochs <= 0):
        raise ValueError(
            f"set TrainConfig.max_steps > 0 or epochs > 0 (got max_steps={cfg.max_steps}, "
            f"epochs={cfg.epochs})"
        )
    if cfg.distributed not in ("ddp", "fsdp"):
        raise ValueError(f"unknown distributed strategy {cfg.distributed!r}; valid: ddp, fsdp")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {cfg.precision!r}; valid: fp32, bf16")


def _length_grouping(dataset: Dataset, group_size: int) -> LengthGrouping:
    if not (hasattr(dataset, "lengths") and hasattr(dataset, "modalities")):
        raise ValueError(f"group_by_length needs a dataset with lengths() and modalities(); "
                         f"{type(dataset).__name__} has not; set train.group_by_length=false")
    return LengthGrouping(dataset.lengths(), dataset.modalities(), group_size)


def seed_everything(seed: int) -> None:
    # Every rank gets the same seed (as the Hugging Face Trainer does), so the checkpoint can keep
    # rank 0's RNG state for all of them.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_same_layout(saved: dict, layout: dict, path: Path) -> None:
    changed = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
    if changed:
        detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        raise CheckpointError(
            f"cannot resume exactly from {path}: {detail}. The position in the data depends on "
            "these; keep them, or start a new run_dir (load_checkpoint gives the weights)"
        )


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(trainable - state.keys()), sorted(state.keys() - trainable)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the trainable parameters: missing {missing[:5]}, "
            f"not trainable here {unexpected[:5]}; is the same stage being resumed?"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the model "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The lr of the first group, plus one per part when parts have their own lr."""
    groups = optimizer.param_groups
    lrs = {"lr": groups[0]["lr"]}
    parts = {g["name"].split(":")[0]: g["lr"] for g in groups}
    if len(parts) > 1:
        lrs.update({f"lr/{part}": lr for part, lr in parts.items()})
    return lrs


@contextmanager
def _isolated(model: nn.Module):
    """Eval mode and an untouched RNG stream for the duration, then each module's mode back."""
    modes = {m: m.training for m in model.modules()}
    rng = get_rng_state()
    model.eval()
    try:
        yield
    finally:
        set_rng_state(rng)
        for module, training in modes.items():
            module.train(training)


def _evaluate(eval_fn: EvalFn, model: nn.Module, step: int) -> dict[str, float]:
    with _isolated(model), torch.no_grad():
        return {k: float(v) for k, v in eval_fn(model, step).items()}


def _log(record: dict, run_dir: Path, history: list[dict], dist: DistContext) -> None:
    history.append(record)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
