"""What trains in a stage, decided from data: `{vision: frozen, connector: full, llm: lora}`.

A VisionLanguageModel's parts live under the prefixes `vision.`, `connector.` and `llm.`; a stage
freezes, fully trains or LoRA-adapts each.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from torch import nn

from ..models.lora import LoraSettings, inject_lora

Mode = Literal["frozen", "lora", "full"]


@dataclass
class Trainability:
    vision: Mode = "frozen"
    connector: Mode = "full"
    llm: Mode = "frozen"


def apply_trainability(model: nn.Module, trainable: Trainability, lora: LoraSettings) -> None:
    """Freeze / unfreeze / LoRA-adapt each part of `model` in place. The model's `lora_parts`
    records which parts hold adapters and with what settings (needed to rebuild them when loading)."""
    adapters: dict[str, LoraSettings] = model.lora_parts
    for spec in fields(Trainability):
        part_name, mode = spec.name, getattr(trainable, spec.name)
        part = getattr(model, part_name)
        if mode not in ("frozen", "lora", "full"):
            raise ValueError(f"trainable.{part_name}: unknown mode {mode!r}; valid: frozen, lora, full")
        if mode == "lora":
            if part_name == "connector":
                raise ValueError("trainable.connector: LoRA is for pretrained parts; train the connector 'full'")
            if part_name in adapters and adapters[part_name] != lora:
                raise ValueError(f"trainable.{part_name}: it already holds LoRA adapters with other settings "
                                 f"({adapters[part_name]}); merge them first (bridgevlm export) or reuse those settings")
            if part_name not in adapters:
                inject_lora(part, lora, part_name)
                adapters[part_name] = lora
        if mode == "full" and part_name != "connector":
            model.fully_trained.add(part_name)
        for name, param in part.named_parameters():
            is_adapter = "lora_" in name
            param.requires_grad = (mode == "full" and not is_adapter) or (mode == "lora" and is_adapter)
