"""Bridges between a vision tower and an LLM.

Input-level connectors turn vision features [B, N, Dv] into tokens [B, M, D_llm] that are spliced
into the LLM's input embeddings; each one reports `num_tokens(N) -> M`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from .mlp import MlpConnector, mlp_depth
from .qformer import QFormer, QFormerConfig, QFormerConnector


@dataclass
class ConnectorConfig:
    kind: str = "mlp2x_gelu"  # linear | mlp{N}x_gelu | qformer
    pool: int = 0  # mlp kinds: average-pool the square patch grid to pool x pool tokens first; 0 keeps every patch
    qformer: QFormerConfig = field(default_factory=QFormerConfig)  # kind qformer: the Q-Former's sizes
    # kind qformer: a finished BLIP-2 stage-1 run (or its model/ directory) whose Q-Former this one
    # starts from, architecture and weights (the language projection starts fresh). Loaded when the
    # VLM is built fresh (a stage's `init: base`); a saved VLM holds the whole connector and ignores it.
    init: str | None = None
    # False: take only the architecture and tokenizer of `init`, with freshly initialised weights (the
    # control for BLIP-2's claim that stage 1 matters: the same model, stage 1 skipped)
    init_weights: bool = True

    def __post_init__(self):
        if self.init and _family(self.kind) != "qformer":
            raise ValueError(f"connector.init starts a Q-Former from a BLIP-2 stage-1 model, but the connector is "
                             f"{self.kind!r}; use kind: qformer or leave init unset")
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


# family -> builder(cfg, vision_hidden, llm_hidden). The "mlp" family covers the kinds `linear` and
# `mlp{N}x_gelu` (any depth N).
CONNECTORS = {
    "mlp": _build_mlp,
    "qformer": _build_qformer,
}
KINDS = ("linear", "mlp{N}x_gelu", "qformer")


def _family(kind: str) -> str:
    return "mlp" if mlp_depth(kind) is not None else kind


def build_connector(cfg: ConnectorConfig, vision_hidden: int, llm_hidden: int) -> nn.Module:
    """The connector `cfg.kind` names, mapping vision features of width `vision_hidden` to `llm_hidden`."""
    builder = CONNECTORS.get(_family(cfg.kind))
    if builder is None:
        raise ValueError(f"unknown connector {cfg.kind!r}; valid: {', '.join(KINDS)} (e.g. mlp2x_gelu)")
    return builder(cfg, vision_hidden, llm_hidden)


__all__ = ["CONNECTORS", "ConnectorConfig", "MlpConnector", "QFormer", "QFormerConfig", "QFormerConnector",
           "build_connector"]
