"""LLaVA's projectors: `linear` (LLaVA 1.0) and `mlp{N}x_gelu` (LLaVA-1.5 uses N = 2)."""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

_MLP_KIND = re.compile(r"^mlp(\d+)x_gelu$")


def mlp_depth(kind: str) -> int | None:
    """Number of Linear layers a projector kind has ('linear' -> 1, 'mlp2x_gelu' -> 2), None if not an MLP kind."""
    if kind == "linear":
        return 1
    match = _MLP_KIND.match(kind)
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


class MlpConnector(nn.Module):
    """features [B, N, Dv] -> visual tokens [B, M, D_llm]: Linear(Dv->D), then (GELU, Linear(D->D)) x (depth-1).

    With `pool` > 0 the square patch grid is first average-pooled to pool x pool tokens (M = pool²),
    e.g. to give each cell of a coarse layout one token, or to shorten long sequences.
    """

    def __init__(self, vision_hidden: int, llm_hidden: int, depth: int = 2, pool: int = 0):
        super().__init__()
        self.pool = pool
        layers: list[nn.Module] = [nn.Linear(vision_hidden, llm_hidden)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden, llm_hidden)]
        # Indexed like LLaVA's `mm_projector` Sequential (0, 2, 4, ...), so its weights map one-to-one.
        self.layers = nn.Sequential(*layers)

    def num_tokens(self, num_vision_tokens: int) -> int:
        if not self.pool:
            return num_vision_tokens
        side = math.isqrt(num_vision_tokens)
        if side * side != num_vision_tokens:
            raise ValueError(f"pooling needs a square patch grid, got {num_vision_tokens} tokens "
                             f"(select: patch drops a CLS token)")
        if self.pool > side:
            raise ValueError(f"connector.pool {self.pool} is larger than the {side}x{side} patch grid")
        return self.pool ** 2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool:
            batch, count, width = features.shape
            side = math.isqrt(count)
            grid = features.transpose(1, 2).reshape(batch, width, side, side)  # [B, Dv, g, g]
            features = F.adaptive_avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # [B, pool², Dv]
        return self.layers(features)
