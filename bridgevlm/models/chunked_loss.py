"""An LM head and its cross-entropy, a chunk of rows at a time: the [N, V] logits never exist whole.

With a frozen LLM the vocabulary-sized head dominates a training step, and the plain path
(`F.cross_entropy(lm_head(h).float())`) spends much of it writing and reading [N, V] fp32 tensors:
the logits, their log-softmax, its gradient, zero-filled first. Here each chunk's logits [C, V] are
made, reduced and dropped before the next chunk's.

The loss is a scalar, so d loss / d logits = softmax − onehot is known in the forward; only its scale
(the incoming gradient, 1 / targets in the training loop) waits for the backward. The forward
therefore computes the gradients too, chunk by chunk, and keeps those ([N, D], plus [V, D] and [V]
when the head trains) instead of hidden states from which the backward would recompute the logits:
one GEMM of the head per chunk fewer (recomputing was slower than the plain path), nothing else
kept. Nothing of the kind is done when no gradient will be asked for (under `no_grad`, or when neither
the hidden states nor the head require one), and a frozen head gets no weight gradient computed.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

CHUNK_ROWS = 256  # 256 x 50k fp32 logits is 50 MB: small beside [N, V], large enough for an efficient GEMM


def is_plain_linear(module: nn.Module) -> bool:
    """True when `module(x)` is exactly `F.linear(x, module.weight, module.bias)`: an nn.Linear itself, not a
    subclass (quantised layers), a wrapper (peft's LoRA) or a layer with hooks or a patched forward
    (accelerate's device hooks)."""
    return (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in vars(module))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """`F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")` and the number of
    rows whose logits' argmax is the target, without the [N, V] logits.

    hidden [N, D], weight [V, D], bias [V] or None, targets [N] (every entry a class: no ignore index).
    The logits are computed in hidden's dtype, or autocast's where it is on (as `F.linear` would), and
    taken to fp32 for the softmax. Returns the loss [] (fp32, differentiable) and the count [] (int64).
    The loss's backward can run once per forward (no `retain_graph=True` through it).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, D] and targets [N]; got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, grad_enabled):
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        needs_hidden, needs_weight, needs_bias = (grad_enabled and needed for needed in ctx.needs_input_grad[:3])
        # Autocast is applied by hand, once, so that the chunks reuse one cast of the weight.
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            if autocast:
                dtype = torch.get_autocast_dtype(device_type)
                hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
                bias_c = None if bias is None else bias.to(dtype)
            else:
                hidden_c, weight_c, bias_c = hidden, weight, bias
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if needs_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h, t = hidden_c[rows], targets[rows, None]  # [C, D], [C, 1]
                logits = F.linear(h, weight_c, bias_c).float()  # [C, V]
                # log_softmax's own steps (x - max - log Σ exp(x - max)), in place; max gives the argmax too
                row_max, predicted = logits.max(-1)
                correct += (predicted == t[:, 0]).sum()
                shifted = logits.sub_(row_max[:, None])
                target_shifted = shifted.gather(1, t)[:, 0]
                exp = shifted.exp_()
                sum_exp = exp.sum(-1)  # [C]
                loss += (sum_exp.log() - target_shifted).sum()
                if not (needs_hidden or needs_weight or needs_bias):
                    continue
                grad_logits = exp.div_(sum_exp[:, None]).scatter_add_(1, t, exp.new_full(t.shape, -1.0))  # [C, V]
                if needs_bias:
                    grad_bias += grad_logits.sum(0)
                grad_logits = grad_logits.to(weight_c.dtype)
                if needs_hidden:
                    grad_hidden[rows] = grad_logits @ weight_c
                if needs_weight:
                    if grad_logits.dtype == grad_weight.dtype:
                        grad_weight.addmm_(grad_logits.t(), h)
                    else:
                        grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                              None if grad_bias is None else grad_bias.to(bias.dtype))
        ctx.mark_non_differentiable(correct)
        ctx.backward_done = False
        return loss, correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_correct):
        # Scaled in place: a trained head's weight gradient [V, D] is not copied, at the price of one
        # backward per forward.
        if ctx.backward_done:
            raise RuntimeError("linear_cross_entropy's backward can run only once per forward: it scales the "
                               "gradients computed in the forward in place (retain_graph=True is not supported)")
        ctx.backward_done = True
        return (*(None if grad is None else grad.mul_(grad_loss) for grad in ctx.saved_tensors), None, None, None)
