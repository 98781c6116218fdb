"""InternLM-XComposer2's Partial LoRA: a plain projection makes the visual tokens, and low-rank updates
of the LLM's linear layers apply only at the visual positions.

For a visual token x_v: y = W0·x_v + b + (α/r)·B(A(dropout(x_v))); for a text token: y = W0·x_t + b,
computed by the frozen layer alone, so text is processed exactly as by the base LLM.

`attach(llm)` replaces each target Linear by a `PartialLoraLinear` holding the frozen layer and a
reference to its low-rank update; the updates belong to the connector (`connector.adapters.*`), so
`trainable: {connector: full, llm: frozen}` trains the projection and the updates, and a saved model
holds them with the connector. Per forward the wrapper reads which positions are visual from the
context in the connector's slot (in_llm.py); while decoding, every new token is text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from .in_llm import ContextSlot, context_mismatch, refer, require_decoder_only
from .mlp import MlpConnector, mlp_depth

# Linear layers of the attention (q, k, v, output) and the FFN of Llama-style LLMs (three matrices),
# OPT (two) and InternLM2 (XComposer's LLM: wqkv, wo, w1..w3).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "out_proj", "fc1", "fc2", "wqkv", "wo", "w1", "w2", "w3")


@dataclass
class PartialLoraConfig:
    # XComposer2 uses rank 256, alpha 256, dropout 0.05; these defaults suit the tiny Shapes LLMs.
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.05
    # Suffixes of the LLM's Linear module names (`q_proj` or `self_attn.q_proj`). None: those of
    # DEFAULT_TARGETS the LLM has; a listed suffix that matches nothing is an error.
    targets: list[str] | None = None
    projector: str = "mlp2x_gelu"  # the visual tokens' projection: linear | mlp{N}x_gelu (XComposer2: mlp2x_gelu)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"connector.partial_lora.rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"connector.partial_lora.dropout must be in [0, 1), got {self.dropout}")
        if mlp_depth(self.projector) is None:
            raise ValueError(f"connector.partial_lora.projector {self.projector!r} is not a projection kind; "
                             f"valid: linear, mlp{{N}}x_gelu")


class LowRankUpdate(nn.Module):
    """x [K, in] -> (α/r)·B(A(dropout(x))) [K, out]. B starts at zero, so the wrapped layer starts unchanged."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)  # A (Kaiming-uniform, as LoRA)
        self.up = nn.Linear(rank, out_features, bias=False)  # B
        nn.init.zeros_(self.up.weight)
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(self.dropout(x))) * self.scale


@dataclass(frozen=True)
class VisualPositions:
    """The partial LoRA context: which positions of the batch [B, T] hold visual tokens."""

    slot: ContextSlot
    shape: tuple[int, int]  # (B, T)
    index: torch.Tensor | None  # [K] flat positions (row * T + t) of the visual tokens; None: all text
    mask: torch.Tensor | None = None  # [B, T] bool, kept to select rows

    @classmethod
    def of(cls, slot: ContextSlot, mask: torch.Tensor) -> VisualPositions:
        index = mask.reshape(-1).nonzero().squeeze(1)
        return cls(slot, tuple(mask.shape), index if index.numel() else None, mask)

    def applied(self):
        return self.slot.holding(self)

    def decoding(self) -> VisualPositions:
        return VisualPositions(self.slot, (self.shape[0], 1), None)

    def select(self, rows: torch.Tensor) -> VisualPositions:
        if self.mask is None:
            return replace(self, shape=(len(rows), self.shape[1]))
        return VisualPositions.of(self.slot, self.mask[rows])

    @classmethod
    def join(cls, contexts: list[VisualPositions]) -> VisualPositions:
        if any(c.index is not None for c in contexts):
            raise ValueError("only decoding contexts (text tokens only) join into one batch")
        return cls(contexts[0].slot, (sum(c.shape[0] for c in contexts), contexts[0].shape[1]), None)


class PartialLoraLinear(nn.Module):
    """A frozen Linear plus its low-rank update at the visual positions of the current context.

    The input may be [B, T, in] or flattened to [B*T, in] (OPT's FFN): positions are counted row-major either way.
    """

    def __init__(self, base: nn.Linear, update: LowRankUpdate, slot: ContextSlot):
        super().__init__()
        self.base = base
        refer(self, "update", update)
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        context = self.slot.current
        if context is None:
            return out
        if x.numel() // x.shape[-1] != math.prod(context.shape):
            raise context_mismatch("partial LoRA", context.shape, x.shape[:-1])
        if context.index is None:
            return out
        flat = out.reshape(-1, out.shape[-1])
        visual = x.reshape(-1, x.shape[-1])[context.index]  # [K, in]
        # Each visual position is updated once; every other row keeps the frozen layer's output bit for bit.
        return flat.index_add(0, context.index, self.update(visual).to(out.dtype)).view_as(out)


class PartialLoraConnector(nn.Module):
    """features [I, N, Dv] -> visual tokens [I, M, D_llm] (the projection), plus partial LoRA in the LLM."""

    wraps_llm_linears = True  # so peft's LoRA (trainable.llm: lora) cannot also wrap them

    def __init__(self, cfg: PartialLoraConfig, vision_hidden: int, llm_hidden: int, pool: int = 0):
        super().__init__()
        self.config = cfg
        self.projector = MlpConnector(vision_hidden, llm_hidden, depth=mlp_depth(cfg.projector), pool=pool)
        self.adapters = nn.ModuleDict()  # LLM module path (dots as '-') -> its LowRankUpdate; filled by attach
        self.slot = ContextSlot()
        self._wrapped: list[tuple[nn.Module, str, nn.Linear]] = []  # (parent, attribute, original) to detach

    def num_tokens(self, num_vision_tokens: int) -> int:
        return self.projector.num_tokens(num_vision_tokens)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def context(self, is_image: torch.Tensor, features: torch.Tensor | None = None) -> VisualPositions:
        return VisualPositions.of(self.slot, is_image)

    def attach(self, llm: nn.Module) -> None:
        require_decoder_only(llm, "partial_lora")
        if self._wrapped:
            return
        cfg = self.config
        for name, linear in target_linears(llm, cfg.targets):
            key = name.replace(".", "-")
            if key not in self.adapters:
                update = LowRankUpdate(linear.in_features, linear.out_features, cfg.rank, cfg.alpha, cfg.dropout)
                self.adapters[key] = update.to(device=linear.weight.device, dtype=linear.weight.dtype)
            parent_name, _, attr = name.rpartition(".")
            parent = llm.get_submodule(parent_name)
            setattr(parent, attr, PartialLoraLinear(linear, self.adapters[key], self.slot))
            self._wrapped.append((parent, attr, linear))

    def detach(self, llm: nn.Module) -> None:
        for parent, attr, linear in self._wrapped:
            setattr(parent, attr, linear)
        self._wrapped = []


def target_linears(llm: nn.Module, targets: list[str] | None) -> list[tuple[str, nn.Linear]]:
    """The (name, module) of every Linear of `llm` whose name ends with one of `targets` (None: the
    defaults it has). A listed target that matches nothing is an error naming what there is."""
    linears = {name: m for name, m in llm.named_modules() if isinstance(m, nn.Linear)}
    wanted = list(DEFAULT_TARGETS) if targets is None else list(targets)

    def matches(name: str, suffix: str) -> bool:
        return name == suffix or name.endswith("." + suffix)

    found = {t: [n for n in linears if matches(n, t)] for t in wanted}
    missing = [t for t, names in found.items() if not names]
    if (targets is not None and missing) or len(missing) == len(wanted):
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        what = f"target(s) {missing}" if targets is not None else f"none of the default targets {wanted}"
        raise ValueError(f"connector.partial_lora: {what} match no Linear layer of {type(llm).__name__}; its Linear "
                         f"layers end in: {', '.join(suffixes)} (targets are name suffixes, e.g. q_proj or "
                         f"self_attn.q_proj)")
    return [(name, linears[name]) for name in linears if any(name in names for names in found.values())]
