"""Bridges between a vision tower and an LLM.

Input-level connectors turn vision features [B, N, Dv] into tokens [B, M, D_llm] that are spliced
into the LLM's input embeddings; each one reports `num_tokens(N) -> M`. A connector that also has
`adapt_text(embeds)` (CROME's gated adapter) also reads, before each image, an adapted copy of the
text of the image's turn (models/vlm.py).

In-LLM connectors (partial LoRA, Flamingo's gated cross-attention) also `attach(llm)` and act inside
the LLM, reading per forward a context built from the batch (in_llm.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from torch import nn

from .gated_adapter import GatedAdapterConfig, GatedAdapterConnector, GatedCrossModalAdapter
from .gated_xattn import GatedXattnConfig, GatedXattnConnector
from .in_llm import InLlmConnector, LlmContext, is_in_llm
from .mlp import MlpConnector, mlp_depth
from .partial_lora import PartialLoraConfig, PartialLoraConnector
from .qformer import QFormer, QFormerConfig, QFormerConnector


@dataclass
class ConnectorConfig:
    # linear | mlp{N}x_gelu | qformer | gated_adapter (a Q-Former + CROME's adapter) | partial_lora | gated_xattn
    kind: str = "mlp2x_gelu"
    pool: int = 0  # mlp kinds: average-pool the square patch grid to pool x pool tokens first; 0 keeps every patch
    qformer: QFormerConfig = field(default_factory=QFormerConfig)  # kinds qformer, gated_adapter: the Q-Former's sizes
    adapter: GatedAdapterConfig = field(default_factory=GatedAdapterConfig)  # kind gated_adapter
    # kind partial_lora (XComposer2): the projection and the LoRA at visual positions (`pool` applies too)
    partial_lora: PartialLoraConfig = field(default_factory=PartialLoraConfig)
    gated_xattn: GatedXattnConfig = field(default_factory=GatedXattnConfig)  # kind gated_xattn (Flamingo)
    # kinds qformer, gated_adapter: a finished BLIP-2 stage-1 run (or its model/ directory) whose Q-Former this one
    # starts from, architecture and weights (the language projection starts fresh). Loaded when the
    # VLM is built fresh (a stage's `init: base`); a saved VLM holds the whole connector and ignores it.
    init: str | None = None
    # False: take only the architecture and tokenizer of `init`, with freshly initialised weights (the
    # control for BLIP-2's claim that stage 1 matters: the same model, stage 1 skipped)
    init_weights: bool = True

    def __post_init__(self):
        if self.init and _family(self.kind) not in WITH_QFORMER:
            raise ValueError(f"connector.init starts a Q-Former from a BLIP-2 stage-1 model, but the connector is "
                             f"{self.kind!r}; use kind: {' or '.join(WITH_QFORMER)}, or leave init unset")
        if not self.init_weights and not self.init:
            raise ValueError("connector.init_weights: false takes the architecture of a stage-1 model without "
                             "its weights, but connector.init names none")


def _build_mlp(cfg: ConnectorConfig, vision_hidden: int, llm_hidden: int) -> nn.Module:
    return MlpConnector(vision_hidden, llm_hidden, depth=mlp_depth(cfg.kind), pool=cfg.pool)


def _build_qformer(cfg: ConnectorConfig, vision_hidden: int, llm_hidden: int) -> nn.Module:
    width = cfg.qformer.vision_width
    if width is not None and width != vision_hidden:
        raise ValueError(f"connector.qformer.vision_width is {width} but the vision tower's features are "
                         f"{vision_hidden} wide; leave it unset to follow the tower")
    return QFormerConnector(QFormer(replace(cfg.qformer, vision_width=vision_hidden)), llm_hidden)


def _build_gated_adapter(cfg: ConnectorConfig, vision_hidden: int, llm_hidden: int) -> nn.Module:
    return GatedAdapterConnector(_build_qformer(cfg, vision_hidden, llm_hidden),
                                 GatedCrossModalAdapter(llm_hidden, cfg.adapter))


def _build_partial_lora(cfg: ConnectorConfig, vision_hidden: int, llm_hidden: int) -> nn.Module:
    return PartialLoraConnector(cfg.partial_lora, vision_hidden, llm_hidden, pool=cfg.pool)


def _build_gated_xattn(cfg: ConnectorConfig, vision_hidden: int, llm_hidden: int) -> nn.Module:
    return GatedXattnConnector(cfg.gated_xattn, vision_hidden, llm_hidden)


# family -> builder(cfg, vision_hidden, llm_hidden). The "mlp" family covers the kinds `linear` and
# `mlp{N}x_gelu` (any depth N).
CONNECTORS = {
    "mlp": _build_mlp,
    "qformer": _build_qformer,
    "gated_adapter": _build_gated_adapter,
    "partial_lora": _build_partial_lora,
    "gated_xattn": _build_gated_xattn,
}
KINDS = ("linear", "mlp{N}x_gelu", "qformer", "gated_adapter", "partial_lora", "gated_xattn")
WITH_QFORMER = ("qformer", "gated_adapter")  # the kinds whose Q-Former connector.init can start


def _family(kind: str) -> str:
    return "mlp" if mlp_depth(kind) is not None else kind


def build_connector(cfg: ConnectorConfig, vision_hidden: int, llm_hidden: int) -> nn.Module:
    """The connector `cfg.kind` names, mapping vision features of width `vision_hidden` to `llm_hidden`."""
    builder = CONNECTORS.get(_family(cfg.kind))
    if builder is None:
        raise ValueError(f"unknown connector {cfg.kind!r}; valid: {', '.join(KINDS)} (e.g. mlp2x_gelu)")
    return builder(cfg, vision_hidden, llm_hidden)


def connector_part_names(connector: nn.Module, parts: Sequence[str], field_name: str) -> set[str]:
    """Names of the connector's parameters that lie in `parts` (dotted module paths such as
    `adapter` or `visual.language_projection`, or a parameter's own name). A part that matches
    nothing is an error naming `field_name` and listing the parts there are."""
    names = [name for name, _ in connector.named_parameters()]
    selected: set[str] = set()
    for part in parts:
        matched = {name for name in names if name == part or name.startswith(f"{part}.")}
        if not matched:
            valid = sorted({".".join(name.split(".")[:depth]) for name in names for depth in (1, 2)
                            if name.count(".") >= depth})
            raise ValueError(f"{field_name}: {part!r} matches no parameter of the {type(connector).__name__}; "
                             f"its parts: {', '.join(valid)}")
        selected |= matched
    return selected


__all__ = ["CONNECTORS", "ConnectorConfig", "GatedAdapterConfig", "GatedAdapterConnector", "GatedCrossModalAdapter",
           "GatedXattnConfig", "GatedXattnConnector", "InLlmConnector", "LlmContext", "MlpConnector",
           "PartialLoraConfig", "PartialLoraConnector", "QFormer", "QFormerConfig", "QFormerConnector", "build_connector",
           "connector_part_names", "is_in_llm"]
