"""What trains in a stage, decided from data: `{vision: frozen, connector: full, llm: lora}`.

A VisionLanguageModel's parts live under the prefixes `vision.`, `connector.` and `llm.`; a stage
freezes, fully trains or LoRA-adapts each. A connector made of sub-parts can train only some of
them: `{connector: full, connector_parts: [adapter]}` (CROME's task-specific stage).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ..models.connectors import connector_part_names
from ..models.lora import LoraSettings, inject_lora

Mode = Literal["frozen", "lora", "full"]


@dataclass
class Trainability:
    vision: Mode = "frozen"
    connector: Mode = "full"
    llm: Mode = "frozen"
    # With connector: full, train only these sub-parts of it (module paths inside the connector, e.g.
    # `adapter`, `visual.language_projection`); empty: all of it. The stage's checkpoint then holds only
    # these parts, on top of the model directory the stage started from.
    connector_parts: list[str] = field(default_factory=list)


PARTS = ("vision", "connector", "llm")


def apply_trainability(model: nn.Module, trainable: Trainability, lora: LoraSettings) -> None:
    """Freeze / unfreeze / LoRA-adapt each part of `model` in place. The model's `lora_parts`
    records which parts hold adapters and with what settings (needed to rebuild them when loading)."""
    adapters: dict[str, LoraSettings] = model.lora_parts
    connector_names = None  # None: every connector parameter follows trainable.connector
    if trainable.connector_parts:
        if trainable.connector != "full":
            raise ValueError(f"trainable.connector_parts {trainable.connector_parts} trains parts of the connector, "
                             f"but trainable.connector is {trainable.connector!r}; set it to full")
        connector_names = connector_part_names(model.connector, trainable.connector_parts, "trainable.connector_parts")
    model.connector_parts = list(trainable.connector_parts)
    for part_name in PARTS:
        mode = getattr(trainable, part_name)
        part = getattr(model, part_name)
        if mode not in ("frozen", "lora", "full"):
            raise ValueError(f"trainable.{part_name}: unknown mode {mode!r}; valid: frozen, lora, full")
        if mode == "lora":
            if part_name == "connector":
                raise ValueError("trainable.connector: LoRA is for pretrained parts; train the connector 'full'")
            if part_name == "llm" and getattr(model.connector, "wraps_llm_linears", False):
                raise ValueError(f"trainable.llm: lora would add LoRA to the LLM's linear layers, which the "
                                 f"{type(model.connector).__name__} already adapts (at the visual positions); "
                                 f"train those with trainable.connector: full, and the LLM frozen or full")
            if part_name in adapters and adapters[part_name] != lora:
                raise ValueError(f"trainable.{part_name}: it already holds LoRA adapters with other settings "
                                 f"({adapters[part_name]}); merge them first (bridgevlm export) or reuse those settings")
            if part_name not in adapters:
                inject_lora(part, lora, part_name)
                adapters[part_name] = lora
        if mode == "full" and part_name != "connector":
            model.fully_trained.add(part_name)
        for name, param in part.named_parameters():
            if part_name == "connector" and connector_names is not None:
                param.requires_grad = name in connector_names
                continue
            is_adapter = "lora_" in name
            param.requires_grad = (mode == "full" and not is_adapter) or (mode == "lora" and is_adapter)
