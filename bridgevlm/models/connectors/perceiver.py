"""Flamingo's Perceiver resampler: a fixed set of learned latents reads an image's features, so every
image becomes the same small number of visual latents, however many patches it has. (An image is one
frame here, so Flamingo's per-frame time embeddings are left out.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        allowed: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Tq, H*dh], k and v [B, Tk, H*dh], allowed [B, Tq, Tk] bool (None: all) -> [B, Tq, H*dh]."""
    batch, length, inner = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, t.shape[1], heads, inner // heads).transpose(1, 2)

    mask = None if allowed is None else allowed[:, None]
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, length, inner)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Pre-norm FFW of the resampler and the gated blocks (as OpenFlamingo: no biases)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents [I, L, D] attend to concat(features, latents) [I, N + L, D] (Flamingo's keys and values)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm_media(features), self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(multihead_attention(self.to_q(latents), k, v, self.heads))


class PerceiverResampler(nn.Module):
    """features [I, N, D] -> latents [I, L, D], at the vision features' width D."""

    def __init__(self, dim: int, num_latents: int, num_layers: int, heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleDict({"attn": PerceiverAttention(dim, heads, head_dim), "ff": feed_forward(dim, ff_mult)})
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = latents + layer["attn"](features, latents)
            latents = latents + layer["ff"](latents)
        return self.norm(latents)
