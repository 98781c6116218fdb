"""LLaVA's projectors: `linear` (LLaVA 1.0) and `mlp{N}x_gelu` (LLaVA-1.5 uses N = 2)."""
from __future__ import annotations

import re

import torch
from torch import nn

_MLP_KIND = re.compile(r"^mlp(\d+)x_gelu$")


def mlp_depth(kind: str) -> int | None:
    """Number of Linear layers a projector kind has ('linear' -> 1, 'mlp2x_gelu' -> 2), None if not an MLP kind."""
    if kind == "linear":
        return 1
    match = _MLP_KIND.match(kind)
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


class MlpConnector(nn.Module):
    """features [B, N, Dv] -> visual tokens [B, N, D_llm]: Linear(Dv->D), then (GELU, Linear(D->D)) x (depth-1)."""

    def __init__(self, vision_hidden: int, llm_hidden: int, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(vision_hidden, llm_hidden)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden, llm_hidden)]
        # Indexed like LLaVA's `mm_projector` Sequential (0, 2, 4, ...), so its weights map one-to-one.
        self.layers = nn.Sequential(*layers)

    def num_tokens(self, num_vision_tokens: int) -> int:
        return num_vision_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
