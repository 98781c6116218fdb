"""Hugging Face `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration` -> bridgevlm.

The parts map one to one: the vision model's last layer after its `post_layernorm`, CLS token
included, is what HF feeds the Q-Former (VisionTower with feature_layer -1, select "full",
post_norm); the query tokens, Q-Former and language projection become a QFormerConnector; the
language model is wrapped as it is: a decoder-only one (OPT, Llama) as a LanguageModel, an
encoder-decoder one (FlanT5) as a Seq2SeqLanguageModel, HF's `language_model.*` becoming
`llm.model.*` either way. HF's placeholder convention is already bridgevlm's: each image is
`num_query_tokens` copies of `image_token_index` in `input_ids`, filled in reading order, so the
same ids give the same logits. With FlanT5 those ids are the encoder's input and the logits are the
decoder's, given the same `decoder_input_ids` (or labels, shifted right). InstructBLIP's instruction
(the prompt, tokenised with the Q-Former's own BERT tokenizer) goes in as `qformer_input_ids` /
`qformer_attention_mask`.

Images: BLIP's processor resizes straight to a square (no crop); bridgevlm's ImageProcessor keeps the
aspect ratio and centre-crops, which is the same on square images and close on others.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration)

from ..data.images import ImageProcessor
from ..models.assemble import FALLBACK_IMAGE_TOKEN_ID, QFORMER_TOKENIZER_DIR, LoadedVlm, VlmConfig, image_token_id
from ..models.connectors import ConnectorConfig, QFormer, QFormerConnector
from ..models.llm import LanguageModel
from ..models.seq2seq_llm import Seq2SeqLanguageModel
from ..models.vision import VisionTower, VisionTowerConfig
from ..models.vlm import VisionLanguageModel
from . import qformer_keys
from .keys import ConversionError, convert_state

# HF module names (transformers >= 5, in memory) -> bridgevlm names; the Q-Former's own table is reused.
FROM_HF = [
    (r"^vision_model\.(.*)$", r"vision.model.\1"),
    (r"^language_model\.(.*)$", r"llm.model.\1"),
    *[(pattern, f"connector.{replacement}") for pattern, replacement in qformer_keys.FROM_HF],
]
# What HF feeds the Q-Former: the last layer, normalised, every token (CLS first).
VISION = VisionTowerConfig("vision", feature_layer=-1, select="full", post_norm=True)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


@dataclass(frozen=True)
class _Family:
    name: str
    importer: str
    hf_class: type


# HF model_type -> family
_FAMILIES = {"blip-2": _Family("BLIP-2", "import_blip2", Blip2ForConditionalGeneration),
             "instructblip": _Family("InstructBLIP", "import_instructblip", InstructBlipForConditionalGeneration)}


def import_blip2(path: str | Path, trust_remote_code: bool = False) -> LoadedVlm:
    """Load a HF `Blip2ForConditionalGeneration` directory (OPT/Llama or FlanT5 LLM) as a bridgevlm model
    with identical outputs: `model.logits(ids, mask, pixels)` equals HF's logits on the same ids (with
    FlanT5, `model.logits(ids, mask, pixels, decoder_input_ids=...)` equals HF's given those ids)."""
    return _import(path, "blip-2", trust_remote_code)


def import_instructblip(path: str | Path, trust_remote_code: bool = False) -> LoadedVlm:
    """Load a HF `InstructBlipForConditionalGeneration` directory (OPT/Llama/Vicuna or FlanT5 LLM) as a
    bridgevlm model with identical outputs given the same `qformer_input_ids` / `qformer_attention_mask`. The
    Q-Former's tokenizer, when saved (in `qformer_tokenizer/`), is `loaded.qformer_tokenizer`."""
    loaded = _import(path, "instructblip", trust_remote_code)
    loaded.qformer_tokenizer = _tokenizer(path, trust_remote_code, QFORMER_TOKENIZER_DIR)
    return loaded


def _import(path: str | Path, model_type: str, trust_remote_code: bool) -> LoadedVlm:
    family = _FAMILIES[model_type]
    config = _read_config(path, model_type, family.name)
    hf = _load_hf(path, family)
    vision = VisionTower(type(hf.vision_model)(config.vision_config), VISION.feature_layer, VISION.select,
                         VISION.post_norm)
    qformer_cfg = qformer_keys.qformer_config_from_hf(config.qformer_config, config.num_query_tokens)
    connector = QFormerConnector(QFormer(qformer_cfg), config.text_config.hidden_size)
    if config.use_decoder_only_language_model:
        llm = LanguageModel(AutoModelForCausalLM.from_config(config.text_config))
    else:
        llm = Seq2SeqLanguageModel(AutoModelForSeq2SeqLM.from_config(config.text_config))
    tokenizer = _tokenizer(path, trust_remote_code)
    # Checkpoints saved before the processor inserted placeholders have none: fall back as build_vlm does.
    token_id = config.image_token_index
    if token_id is None:
        token_id = image_token_id(tokenizer) if tokenizer is not None else FALLBACK_IMAGE_TOKEN_ID
    model = VisionLanguageModel(vision, connector, llm, token_id)
    state = convert_state(hf.state_dict(), FROM_HF, model.state_dict(), f"import {path}")
    model.load_state_dict(state, strict=True)
    processor = ImageProcessor.from_pretrained(path, image_size=vision.image_size, aspect="crop")
    cfg = VlmConfig(vision=replace(VISION), connector=ConnectorConfig("qformer", qformer=qformer_cfg), llm="llm",
                    image_aspect="crop", image_token_id=token_id)
    return LoadedVlm(model, tokenizer, processor, cfg)


def _read_config(path: str | Path, model_type: str, name: str):
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path}: not a Hugging Face {name} directory ({error})") from None
    if config.model_type != model_type:
        other = _FAMILIES.get(config.model_type)
        hint = f"; use {other.importer}" if other else ""
        raise ConversionError(f"{path}: a {config.model_type!r} checkpoint, not {name} ({model_type!r}){hint}")
    return config


def _load_hf(path: str | Path, family: _Family):
    try:
        hf, info = family.hf_class.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path}: cannot load the {family.name} weights ({error})") from None
    # transformers initialises missing or misshapen weights randomly with only a warning; a converted
    # model built on them would look fine and answer nonsense.
    bad = sorted(info["missing_keys"]) + sorted(str(key) for key in info["mismatched_keys"])
    if bad:
        raise ConversionError(f"{path}: the checkpoint lacks or misshapes {len(bad)} weight(s) of {family.name}: "
                              f"{bad[:5]}{'...' if len(bad) > 5 else ''}")
    return hf


def _tokenizer(path: str | Path, trust_remote_code: bool, subfolder: str = ""):
    """The tokenizer saved with the checkpoint (in `subfolder`), or None where a local directory has none."""
    if not Path(path).is_dir():  # a hub id
        return AutoTokenizer.from_pretrained(str(path), subfolder=subfolder, trust_remote_code=trust_remote_code)
    directory = Path(path) / subfolder
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
