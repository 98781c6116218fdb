"""Hugging Face `LlavaForConditionalGeneration` <-> bridgevlm (CLIP tower, mlp2x_gelu, causal LM)."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from ..data.images import ImageProcessor
from ..models.assemble import LoadedVlm, VlmConfig
from ..models.connectors import ConnectorConfig, MlpConnector
from ..models.llm import LanguageModel
from ..models.vision import VisionTower, VisionTowerConfig
from ..models.vlm import VisionLanguageModel
from .keys import ConversionError, convert_state

# HF module names (transformers >= 5, in memory) <-> bridgevlm names, as prefix pairs.
PREFIXES = [
    ("model.vision_tower.", "vision.model."),
    ("model.multi_modal_projector.linear_1.", "connector.layers.0."),
    ("model.multi_modal_projector.linear_2.", "connector.layers.2."),
    ("model.language_model.", "llm.model.model."),
    ("lm_head.", "llm.model.lm_head."),
]
FROM_HF = [(rf"^{re.escape(hf)}(.*)$", rf"{ours}\1") for hf, ours in PREFIXES]
TO_HF = [(rf"^{re.escape(ours)}(.*)$", rf"{hf}\1") for hf, ours in PREFIXES]
_SELECT = {"default": "patch", "full": "full"}


def import_llava(path: str | Path, trust_remote_code: bool = False) -> LoadedVlm:
    """Load a HF Llava directory (or hub id) as a bridgevlm model with identical outputs."""
    hf = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    config: LlavaConfig = hf.config
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        raise ConversionError(f"{path}: only the GELU projector with biases (mlp2x_gelu) is supported")
    select = _SELECT.get(config.vision_feature_select_strategy)
    if select is None:
        raise ConversionError(f"{path}: unknown vision_feature_select_strategy {config.vision_feature_select_strategy!r}")
    # an int, or a list of layers whose features are concatenated
    vision = VisionTower(type(hf.model.vision_tower)(config.vision_config), config.vision_feature_layer, select)
    llm = LanguageModel(AutoModelForCausalLM.from_config(config.text_config))
    connector = MlpConnector(vision.feature_size, config.text_config.hidden_size, depth=2)
    model = VisionLanguageModel(vision, connector, llm, config.image_token_id)
    state = convert_state(hf.state_dict(), FROM_HF, model.state_dict(), f"import {path}")
    model.load_state_dict(state, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    processor = ImageProcessor.from_pretrained(path, image_size=vision.image_size, aspect="crop")
    cfg = VlmConfig(vision=VisionTowerConfig("vision", vision.feature_layer, select),
                    connector=ConnectorConfig("mlp2x_gelu"), llm="llm", image_aspect="crop",
                    image_token_id=config.image_token_id)
    return LoadedVlm(model, tokenizer, processor, cfg)


def export_llava(loaded: LoadedVlm, path: str | Path) -> Path:
    """Write a HF Llava directory (model, tokenizer, image processor config) with identical outputs;
    LoRA adapters are merged first."""
    model = loaded.model
    if not isinstance(model.connector, MlpConnector) or len(model.connector.layers) != 3 or model.connector.pool:
        raise ConversionError(f"HF Llava has a 2-layer GELU projector without pooling; this model's connector is "
                              f"{loaded.config.connector}")
    if model.vision.vision_config.model_type != "clip_vision_model":
        raise ConversionError("export to HF Llava needs a CLIP vision tower")
    model.merge_adapters()
    config = LlavaConfig(vision_config=model.vision.vision_config.to_dict(), text_config=model.llm.config.to_dict(),
                         image_token_id=model.image_token_id, projector_hidden_act="gelu",
                         vision_feature_layer=model.vision.feature_layer,
                         vision_feature_select_strategy="default" if model.vision.select == "patch" else "full",
                         image_seq_length=model.num_image_tokens,
                         tie_word_embeddings=model.llm.config.tie_word_embeddings)
    hf = LlavaForConditionalGeneration(config)
    state = convert_state(model.state_dict(), TO_HF, hf.state_dict(), "export to HF Llava")
    hf.load_state_dict(state, strict=True)
    path = Path(path)
    hf.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    loaded.processor.save_pretrained(path)
    return path
