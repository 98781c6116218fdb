"""CLIP-style dual encoder: symmetric InfoNCE with a learnable, clamped temperature.

Wraps any Hugging Face `CLIPModel` (a tiny one built here, or a released checkpoint loaded with
`ContrastiveModel.from_pretrained`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

from ..data.captions import encode_text, pad_texts
from .output import LossOutput

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature so the scale never exceeds 100


@dataclass
class TinyClipConfig:
    image_size: int = 96
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    projection_dim: int = 128
    max_text_length: int = 96


def build_tiny_clip(cfg: TinyClipConfig, tokenizer) -> CLIPModel:
    """A small CLIP whose text side uses `tokenizer` (its EOS marks the pooled position)."""
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_text_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_hidden,
            intermediate_size=4 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
        ),
        projection_dim=cfg.projection_dim,
        logit_scale_init_value=math.log(1 / 0.07),
    )
    return CLIPModel(config)


def _embedding(output) -> torch.Tensor:
    # transformers >= 5 returns an output object whose pooler_output holds the projected embedding.
    return output.pooler_output if hasattr(output, "pooler_output") else output


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     negative_embeds: torch.Tensor | None = None, negative_present: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives. Embeddings [B, E], L2-normalised; returns the mean.

    Optional hard negatives [B, E] (NegCLIP) join the candidates of the image->text direction;
    `negative_present` [B] masks out the samples that have none.
    """
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * image_embeds @ text_embeds.t()  # [B, B], image i vs text j
    targets = torch.arange(len(logits), device=logits.device)
    image_to_text = logits
    if negative_embeds is not None:
        hard = scale * image_embeds @ negative_embeds.t()  # [B, B]
        if negative_present is not None:
            hard = hard.masked_fill(~negative_present.bool()[None, :], float("-inf"))
        image_to_text = torch.cat([logits, hard], dim=1)  # [B, 2B]
    return (F.cross_entropy(image_to_text, targets) + F.cross_entropy(logits.t(), targets)) / 2


class ContrastiveModel(nn.Module):
    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> ContrastiveModel:
        return cls(CLIPModel.from_pretrained(str(name_or_path)))

    @property
    def max_text_length(self) -> int:
        return self.clip.config.text_config.max_position_embeddings

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> L2-normalised [B, E]"""
        return F.normalize(_embedding(self.clip.get_image_features(pixel_values=pixel_values)), dim=-1)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] -> L2-normalised [B, E]"""
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(_embedding(out), dim=-1)

    def forward(self, batch: dict) -> LossOutput:
        images = self.encode_images(batch["pixel_values"])
        texts = self.encode_texts(batch["input_ids"], batch["attention_mask"])
        negatives = None
        if "negative_input_ids" in batch:
            negatives = self.encode_texts(batch["negative_input_ids"], batch["negative_attention_mask"])
        loss = contrastive_loss(images, texts, self.clip.logit_scale, negatives, batch.get("negative_present"))
        count = torch.tensor(len(images))
        scale = self.clip.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp().item()
        # The in-batch loss is a mean over pairs; as a sum over the batch it fits the loop's target weighting.
        return LossOutput(loss_sum=loss * len(images), num_targets=count, logs={"logit_scale": scale})


@torch.no_grad()
def zero_shot_classifier(model: ContrastiveModel, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                         max_length: int | None = None) -> torch.Tensor:
    """Class embeddings [C, E]: per class, the mean of its normalised prompt embeddings, renormalised."""
    max_length = max_length or model.max_text_length
    weights = []
    for name in classnames:
        ids, mask = pad_texts([encode_text(tokenizer, t.format(name), max_length) for t in templates], tokenizer.pad_token_id)
        device = next(model.parameters()).device
        weights.append(F.normalize(model.encode_texts(ids.to(device), mask.to(device)).mean(0), dim=-1))
    return torch.stack(weights)
