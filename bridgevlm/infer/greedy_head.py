"""Greedy decoding's argmax over a large vocabulary, with about half the memory reads.

A decoding step on a CPU is bound by memory reads, and the LM head is often the largest matrix read:
32000 × 4096 fp32 weights for a 7B Llama, 50272 × 256 (62% of a step) for the BLIP-2 benchmark's OPT.
Greedy decoding needs only the argmax of the logits, not the logits. `BoundedArgmaxHead` scores the
vocabulary with a bfloat16 copy of the head (half the bytes; CPUs with AVX512-BF16 multiply it
natively), bounds each score's distance from its fp32 value, and recomputes in fp32 only the tokens
that can still be the maximum, usually a handful. The token picked is the fp32 argmax: the bounds are
worst-case (Cauchy–Schwarz on the rounding of the hidden state and of each weight row, the bfloat16
result's rounding, fp32 accumulation), so the fp32 winner is always among the candidates. Only logits
within fp32 rounding of each other could be ordered differently, exactly as a change of batch size
(and so of BLAS blocking) can already order them differently.

`greedy_head(model)` builds it for a Hugging Face causal LM whose logits are its output embedding
applied to its base model's last hidden state (checked numerically once, so a model that scales or
caps its logits keeps the plain path), rebuilding it whenever the head's weights change.
"""
from __future__ import annotations

import torch
from torch import nn

# Below this many head weights the fp32 product is cheap and the bounds would cost more than they save.
MIN_HEAD_WEIGHTS = 1 << 21
# A single row's fp32 matrix-vector product runs about as fast as bfloat16's on CPUs (measured: 2.0 ms
# against 3.1 ms for 50272 x 256, 3.5 against 2.5 for 32000 x 512); from two rows on, bfloat16 wins.
MIN_ROWS = 2
# More candidates than this (a degenerate hidden state, many tied rows): the plain fp32 product instead.
MAX_CANDIDATES = 4096
_BF16_ROUNDING = 2.0 ** -7  # |bf16(x) - x| <= 2^-8 |x|, so <= 2^-7 |bf16(x)|
_FP32_SUMS = 2.0 ** -22  # per term of a d-term fp32 dot product: d * 2^-24, with a 4x margin for blocked sums

_ATTRIBUTE = "_bridgevlm_greedy_head"


class BoundedArgmaxHead:
    """argmax(hidden @ weight.T) for fp32 hidden states [B, d] and a fp32 head weight [V, d]."""

    def __init__(self, weight: torch.Tensor):
        with torch.no_grad():
            self.weight = weight.detach()
            self.low = weight.detach().to(torch.bfloat16).contiguous()
            low = self.low.float()
            width = weight.shape[1]
            norms = weight.norm(dim=1)
            # per row, the coefficients of ||bf16(h)||, ||h - bf16(h)|| and ||h|| in a score's error bound
            self.coefficients = torch.stack([(weight - low).norm(dim=1) + width * _FP32_SUMS * low.norm(dim=1),
                                             norms, width * _FP32_SUMS * norms])  # [3, V]
        self.key = _weight_key(weight)

    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, d] fp32 -> the fp32 logits' argmax [B] (the first index among exact ties, as torch's)."""
        hidden = hidden.float()
        hidden_low = hidden.to(torch.bfloat16)
        scores = (hidden_low @ self.low.t()).float()  # [B, V]
        hidden_low = hidden_low.float()
        norms = torch.stack([hidden_low.norm(dim=1), (hidden - hidden_low).norm(dim=1), hidden.norm(dim=1)], dim=1)
        slack = (norms @ self.coefficients).add_(scores.abs(), alpha=_BF16_ROUNDING)
        # a token is a candidate unless its best case is below some other token's worst case
        floor = (scores - slack).amax(dim=1, keepdim=True)
        rows, cols = torch.nonzero(scores + slack >= floor, as_tuple=True)
        if rows.numel() > MAX_CANDIDATES or rows.unique().numel() != hidden.shape[0]:
            return (hidden @ self.weight.t()).argmax(-1)  # too many to recompute, or non-finite scores
        exact = (self.weight[cols] * hidden[rows]).sum(-1)
        best = torch.full((hidden.shape[0],), float("-inf")).scatter_reduce(0, rows, exact, "amax")
        winners = exact == best[rows]
        first = torch.full((hidden.shape[0],), self.weight.shape[0], dtype=torch.long)
        return first.scatter_reduce(0, rows[winners], cols[winners], "amin")


def greedy_head(model: nn.Module) -> BoundedArgmaxHead | None:
    """The bounded argmax for `model`'s head, or None where the plain logits should be used: a model
    training or off the CPU, a head that is small, not fp32, biased, or not what makes the logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (model.training or not isinstance(head, nn.Linear) or head.bias is not None
            or head.weight.device.type != "cpu" or head.weight.dtype != torch.float32
            or head.weight.numel() < MIN_HEAD_WEIGHTS or getattr(model, "base_model", model) is model
            or getattr(model.config, "is_encoder_decoder", False)):
        return None
    cached = getattr(model, _ATTRIBUTE, None)
    if cached is False:  # the check below failed once for this model
        return None
    if cached is not None and cached.key == _weight_key(head.weight):
        return cached
    if cached is None and not _logits_are_the_head_of_the_last_hidden_state(model, head):
        object.__setattr__(model, _ATTRIBUTE, False)
        return None
    built = BoundedArgmaxHead(head.weight)
    object.__setattr__(model, _ATTRIBUTE, built)
    return built


def _weight_key(weight: torch.Tensor) -> tuple:
    """Changes when the weight is replaced, re-laid out or updated in place (an optimiser step)."""
    return weight.data_ptr(), weight.stride(), weight._version


def _logits_are_the_head_of_the_last_hidden_state(model: nn.Module, head: nn.Linear) -> bool:
    """Whether the model's logits are `head(base_model(...).last_hidden_state)`: not scaled, capped or
    shifted on the way (some architectures do), checked on a two-token input."""
    ids = torch.tensor([[0, min(1, head.weight.shape[0] - 1)]])
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits.float()
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state.float()
            ours = head(hidden).float()
    except Exception:  # a model that cannot run bare (it needs an image context, say): keep the plain path
        return False
    return ours.shape == logits.shape and bool((ours - logits).abs().max() <= 1e-4 * (1 + logits.abs().max()))
