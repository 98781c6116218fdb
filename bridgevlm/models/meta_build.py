"""The model a VlmConfig describes, built from configs alone on the meta device: no weight is read,
downloaded or allocated, so a 7B recipe costs a second and no memory (to count its parameters).

Each pretrained part's architecture comes from, in this order:
1. a local directory (its `config.json`; relative paths as `build_vlm` resolves them),
2. the Hugging Face cache (a hub id whose config was downloaded before; never fetched here),
3. `PUBLIC_ARCHITECTURES`, the public configs of the hub ids the shipped paper recipes name, written
   down so their parameters can be counted offline. Every use of it is reported in the notes.
Anything else is an error naming the part and the id.

A Q-Former connector starting from a BLIP-2 stage-1 model (`connector.init`) takes that model's sizes
when the directory is here. When it is not (a paper recipe on a machine without the run), the sizes
come from the stage-1 config passed in (what a stage-1 recipe would train), else from the recipe's own
`connector.qformer`, which defaults to BLIP-2's (BERT-base, 32 queries); the notes say which.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from ..config import from_dict
from .assemble import CONFIG_FILE, FALLBACK_IMAGE_TOKEN_ID, VlmConfig, _resolve, language_model_class
from .blip2_stage1 import Stage1Config, follow_stage1, stage1_model_dir, stage1_qformer_config
from .connectors import ConnectorConfig, build_connector
from .lora import LoraSettings, inject_lora
from .seq2seq_llm import Seq2SeqLanguageModel
from .vision import VisionTower, VisionTowerConfig
from .vlm import VisionLanguageModel

# The architecture fields of the public `config.json` of each hub id the paper recipes name, values as
# published (the fields that shape parameters; the rest keep the config classes' defaults). Used only
# when the id is neither a local directory nor in the Hugging Face cache.
_VICUNA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
              "tie_word_embeddings": False}
_CLIP_VIT_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "patch_size": 14, "projection_dim": 768}
PUBLIC_ARCHITECTURES: dict[str, dict] = {
    "lmsys/vicuna-7b-v1.1": {**_VICUNA_7B, "max_position_embeddings": 2048},
    "lmsys/vicuna-7b-v1.5": {**_VICUNA_7B, "max_position_embeddings": 4096},
    "facebook/opt-2.7b": {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                          "num_attention_heads": 32, "vocab_size": 50272, "max_position_embeddings": 2048,
                          "word_embed_proj_dim": 2560, "do_layer_norm_before": True},
    "google/flan-t5-xl": {"model_type": "t5", "d_model": 2048, "d_ff": 5120, "d_kv": 64, "num_heads": 32,
                          "num_layers": 24, "num_decoder_layers": 24, "vocab_size": 32128,
                          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
                          "tie_word_embeddings": False},
    # CLIP checkpoints: only the vision half is loaded (VisionTower), so only it is written down.
    "openai/clip-vit-large-patch14": {"model_type": "clip", "vision_config": {**_CLIP_VIT_L14, "image_size": 224}},
    "openai/clip-vit-large-patch14-336": {"model_type": "clip",
                                          "vision_config": {**_CLIP_VIT_L14, "image_size": 336}},
}
FROM_TABLE = "bridgevlm's table of public configs"


class UnknownArchitectureError(ValueError):
    """A part names neither a local directory, nor a cached hub config, nor a known public architecture."""


@dataclass
class Architecture:
    config: object  # a transformers PretrainedConfig
    source: str  # "local directory" | "Hugging Face cache" | FROM_TABLE

    def note(self, name: str) -> str | None:
        """What a report should say about where `name`'s architecture came from (only the table is news)."""
        if self.source != FROM_TABLE:
            return None
        return f"{name}: architecture from {FROM_TABLE} (not a local directory, not cached; nothing downloaded)"


# A stage-1 Q-Former config standing in for a missing `connector.init`, and where it comes from (for notes).
Stage1Source = tuple[Stage1Config, str]


def resolve_architecture(name_or_path: str, field_name: str) -> Architecture:
    """The transformers config of a pretrained part, without downloading anything (see the module docstring)."""
    if not name_or_path:
        raise ValueError(f"{field_name} is empty; give a model directory or hub id")
    if Path(name_or_path).is_dir():
        return Architecture(AutoConfig.from_pretrained(name_or_path), "local directory")
    try:
        return Architecture(AutoConfig.from_pretrained(name_or_path, local_files_only=True), "Hugging Face cache")
    except (OSError, ValueError):  # not cached (ValueError: not even a valid hub id)
        pass
    known = PUBLIC_ARCHITECTURES.get(name_or_path)
    if known is None:
        raise UnknownArchitectureError(
            f"{field_name}: {name_or_path!r} is not a local directory, its config is not in the Hugging Face cache, "
            f"and bridgevlm knows no public architecture for it (known: {', '.join(PUBLIC_ARCHITECTURES)}); give a "
            f"directory holding its config.json (the weights are not needed to count parameters)")
    spec = dict(known)
    return Architecture(AutoConfig.for_model(spec.pop("model_type"), **spec), FROM_TABLE)


@dataclass
class MetaVlm:
    """A VisionLanguageModel on the meta device, the config it was built with (Q-Former sizes filled
    in as `build_vlm` would) and notes on where each architecture came from."""

    model: VisionLanguageModel
    config: VlmConfig
    notes: list[str] = field(default_factory=list)


def build_vlm_meta(cfg: VlmConfig, base_dir: str | Path | None = None,
                   stage1: Stage1Source | None = None) -> MetaVlm:
    """`build_vlm(cfg)`'s model on the meta device, architectures only. `stage1`: (config, where it
    comes from) of the stage-1 Q-Former to take the sizes of when `cfg.connector.init` is not here."""
    notes: list[str] = []
    vision_cfg = replace(cfg.vision, path=_resolve(cfg.vision.path, base_dir))
    llm_path = _resolve(cfg.llm, base_dir)
    vision_arch = resolve_architecture(vision_cfg.path, "model.vision.path")
    llm_arch = resolve_architecture(llm_path, "model.llm")
    notes += [note for note in (vision_arch.note(vision_cfg.path), llm_arch.note(llm_path)) if note]
    with torch.device("meta"):
        vision = VisionTower.from_config(vision_cfg, vision_arch.config)
        wrapper = language_model_class(llm_arch.config)
        auto = AutoModelForSeq2SeqLM if wrapper is Seq2SeqLanguageModel else AutoModelForCausalLM
        hf_llm = auto.from_config(llm_arch.config)
        if _untie_stored_head(hf_llm, llm_arch, llm_path):
            notes.append(f"{llm_path}: counted with its own output head (its checkpoint stores one, which loading "
                         f"keeps apart from the input embeddings)")
        llm = wrapper(hf_llm)
        connector_cfg = _connector_config(cfg.connector, vision_cfg, vision.feature_size, base_dir, stage1, notes)
        connector = build_connector(connector_cfg, vision.feature_size, llm.config.hidden_size)
        model = VisionLanguageModel(vision, connector, llm, FALLBACK_IMAGE_TOKEN_ID)
    return MetaVlm(model, replace(cfg, vision=vision_cfg, connector=connector_cfg), notes)


def _untie_stored_head(model: nn.Module, arch: Architecture, path: str) -> bool:
    """Untie the output head of `model` (built from a config: tied as its class decides) when loading the
    checkpoint would: transformers ties a T5's head to its input embeddings whatever its config says,
    but a checkpoint that stores its own head (T5 v1.1, FlanT5) loads untied. Whether it does is read
    from the checkpoint's key list when the directory holds weights (a stored head is taken to differ
    from the embeddings; transformers keeps equal ones tied), else from the published config
    (`tie_word_embeddings: false`, which a T5 config keeps as `scale_decoder_outputs: false`)."""
    head = model.get_output_embeddings()
    if head is None or head.weight is not model.get_input_embeddings().weight:
        return False
    keys = checkpoint_keys(path) if arch.source == "local directory" else None
    if keys is not None:
        name = next(name for name, module in model.named_modules() if module is head)
        stored = f"{name}.weight" in keys
    else:
        stored = getattr(arch.config, "scale_decoder_outputs", True) is False
    if stored:
        head.weight = nn.Parameter(torch.empty_like(head.weight))
    return stored


def checkpoint_keys(directory: str | Path) -> set[str] | None:
    """The tensor names a directory's safetensors checkpoint holds (headers only), None without one."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    keys: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt") as checkpoint:
            keys.update(checkpoint.keys())
    return keys


def _connector_config(connector: ConnectorConfig, vision: VisionTowerConfig, vision_width: int,
                      base_dir: str | Path | None, stage1: Stage1Source | None,
                      notes: list[str]) -> ConnectorConfig:
    if not connector.init:
        return connector
    try:
        directory = stage1_model_dir(_resolve(connector.init, base_dir))
    except FileNotFoundError:
        directory = None
    if directory is not None:
        return replace(connector, init=str(directory),
                       qformer=stage1_qformer_config(connector.qformer, directory, vision, vision_width))
    if stage1 is not None:
        config, source = stage1
        notes.append(f"connector.init {connector.init} is not here: the Q-Former has the sizes of {source}")
        return replace(connector, qformer=follow_stage1(connector.qformer, config, source, vision, vision_width))
    q = connector.qformer
    notes.append(f"connector.init {connector.init} is not here: the Q-Former has the recipe's connector.qformer sizes "
                 f"({q.num_layers} layers of {q.hidden_size}, {q.num_query_tokens} queries, a vocabulary of "
                 f"{q.vocab_size}; QFormerConfig's defaults are BLIP-2's BERT-base ones)")
    return connector


def load_vlm_meta(directory: str | Path) -> MetaVlm:
    """`load_vlm(directory)`'s model on the meta device: the saved config's architecture and the LoRA
    adapters the directory records (its `vlm.yaml` lists those of every part, its base's included)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    meta = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    cfg = from_dict(VlmConfig, meta["vlm"], source=str(config_path))
    # A saved config already holds the Q-Former's stage-1 sizes: the stage-1 model is not needed.
    built = build_vlm_meta(replace(cfg, connector=replace(cfg.connector, init=None, init_weights=True)),
                           base_dir=directory)
    model = built.model
    with torch.device("meta"):
        for part, settings in meta.get("lora", {}).items():
            lora = from_dict(LoraSettings, settings, source=f"{config_path}: lora.{part}")
            inject_lora(getattr(model, part), lora, part)
            model.lora_parts[part] = lora
    model.fully_trained = set(meta.get("fully_trained", []))
    return built
