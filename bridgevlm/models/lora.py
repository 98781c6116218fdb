"""LoRA adapters through `peft`, injected in place so parameter names stay readable and a wrapped
model keeps its own forward; merged back into plain layers for export."""
from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

# Linear layers of Llama-style LLMs and CLIP-style vision towers; users name their own for other models.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "out_proj",
                        "fc1", "fc2"]


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in module.modules())


def inject_lora(part: nn.Module, settings: LoraSettings, part_name: str = "model") -> None:
    """Add LoRA adapters to the Linear layers of `part` named in `settings.targets` (those it has)."""
    names = {name.rsplit(".", 1)[-1] for name, m in part.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in settings.targets if t in names]
    if not targets:
        raise ValueError(f"lora.targets {settings.targets} match no Linear layer of {part_name}; "
                         f"its Linear layers are named: {', '.join(sorted(names))}")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets)
    inject_adapter_in_model(config, part)


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and remove the adapter; returns how many were merged."""
    merged = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, child.get_base_layer())
            merged += 1
    return merged
