"""VisionTower: any Hugging Face vision encoder, with the feature layer and token selection LLaVA uses
(or, with `post_norm`, the normalised last layer BLIP-2 feeds its Q-Former)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, Blip2VisionModel, CLIPVisionModel, InstructBlipVisionModel,
                          SiglipVisionModel)
from transformers.utils import logging as hf_logging

# Full dual-encoder checkpoints (CLIP, SigLIP) load only their vision half; a bare vision model loads as is.
_VISION_CLASSES = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
    # AutoModel does not know these (they exist only inside BLIP-2 / InstructBLIP checkpoints).
    "blip_2_vision_model": Blip2VisionModel,
    "instructblip_vision_model": InstructBlipVisionModel,
}
_WITH_CLS_TOKEN = ("clip", "clip_vision_model", "blip_2_vision_model", "instructblip_vision_model")


def vision_model_class(model_type: str) -> type:
    """The transformers class that loads a vision model of `model_type` (a dual encoder: its vision half)."""
    return _VISION_CLASSES.get(model_type, AutoModel)


@dataclass
class VisionTowerConfig:
    path: str = ""  # a local model directory or hub id (CLIP, SigLIP, or any AutoModel vision encoder)
    # Index into the hidden states (0 = embeddings); LLaVA uses the penultimate layer. A list takes several
    # layers, concatenated along the channels in the order given (HF Llava's `vision_feature_layer` list).
    feature_layer: int | list[int] = -2
    select: Literal["patch", "full"] = "patch"  # "patch" drops the CLS token where the encoder has one
    post_norm: bool = False  # apply the encoder's final LayerNorm to the selected layer (BLIP-2: layer -1, "full")


class VisionTower(nn.Module):
    """pixel_values [B, 3, H, W] -> features [B, N, Dv·L] from the L hidden layers `feature_layer` names
    (LayerNorm-ed by the encoder's `post_layernorm` with `post_norm`)."""

    def __init__(self, model: nn.Module, feature_layer: int | Sequence[int] = -2, select: str = "patch",
                 post_norm: bool = False):
        super().__init__()
        if select not in ("patch", "full"):
            raise ValueError(f"unknown vision feature selection {select!r}; valid: patch, full")
        self.model = model
        self.feature_layer = feature_layer if isinstance(feature_layer, int) else list(feature_layer)
        self.select = select
        self.post_norm = post_norm
        if post_norm and _post_layernorm(model) is None:
            raise ValueError(f"post_norm needs a vision encoder with a `post_layernorm`; "
                             f"{type(model).__name__} has none")
        config = self.vision_config
        layers = config.num_hidden_layers
        if not self.feature_layers:
            raise ValueError("feature_layer is an empty list; name at least one hidden layer")
        for layer in self.feature_layers:
            if not -(layers + 1) <= layer <= layers:
                raise ValueError(f"feature_layer {layer} is out of range for a {layers}-layer vision "
                                 f"encoder (valid: {-(layers + 1)} .. {layers})")

    @classmethod
    def from_pretrained(cls, cfg: VisionTowerConfig, dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False) -> VisionTower:
        path = str(cfg.path)
        if not path:
            raise ValueError("vision.path is empty; give a vision model directory or hub id")
        model_type = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
        loader = vision_model_class(model_type)
        # A dual encoder's text half is expected to go unused: keep its weights out of the load report.
        quiet = model_type in ("clip", "siglip")
        verbosity = hf_logging.get_verbosity()
        if quiet:
            hf_logging.set_verbosity_error()
        try:
            model = loader.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(model, cfg.feature_layer, cfg.select, cfg.post_norm)

    @classmethod
    def from_config(cls, cfg: VisionTowerConfig, config) -> VisionTower:
        """The tower `config` (the transformers config of `cfg.path`) describes, freshly initialised and
        nothing read from disk: the architecture `from_pretrained` would load. Built under
        `torch.device("meta")`, it allocates no weights (to count parameters)."""
        loader = vision_model_class(config.model_type)
        if loader is AutoModel:
            model = AutoModel.from_config(config)
        else:  # a dual encoder's config holds its vision half, which is what from_pretrained loads
            model = loader(getattr(config, "vision_config", config))
        return cls(model, cfg.feature_layer, cfg.select, cfg.post_norm)

    @property
    def vision_config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.vision_config.hidden_size

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The hidden layers taken, in order (`feature_layer` as given: an int or a list)."""
        layer = self.feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @property
    def feature_size(self) -> int:
        """Channels of a feature token: the encoder's width times the number of layers taken."""
        return self.hidden_size * len(self.feature_layers)

    @property
    def has_cls_token(self) -> bool:
        return self.vision_config.model_type in _WITH_CLS_TOKEN

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def grid_size(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_tokens(self) -> int:
        """Feature tokens per image after selection."""
        keep_cls = self.has_cls_token and self.select == "full"
        return self.grid_size ** 2 + int(keep_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        chosen = [out.hidden_states[layer] for layer in self.feature_layers]  # each [B, N(+1), Dv]
        if self.post_norm:
            chosen = [_post_layernorm(self.model)(h) for h in chosen]
        features = chosen[0] if len(chosen) == 1 else torch.cat(chosen, dim=-1)
        if self.select == "patch" and self.has_cls_token:
            features = features[:, 1:]
        return features

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)


def _post_layernorm(model: nn.Module) -> nn.Module | None:
    """The encoder's final LayerNorm: on the model itself (BLIP-2) or its `vision_model` (CLIP, SigLIP)."""
    for owner in (model, getattr(model, "vision_model", None)):
        norm = getattr(owner, "post_layernorm", None)
        if isinstance(norm, nn.Module):
            return norm
    return None
