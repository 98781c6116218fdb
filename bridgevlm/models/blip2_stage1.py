"""A finished BLIP-2 stage-1 model directory: what it holds, how it is saved, and how its Q-Former is
loaded, whole (to evaluate it) or into a stage-2 connector (to start from it).

The directory holds `config.json` (the Q-Former's, the objectives' and the vision tower's configs),
`model.safetensors` (Q-Former, projections, ITM head, temperature) and the tokenizer the Q-Former's
vocabulary follows. The frozen tower is referenced by path, not saved.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer

from ..config import follow_fields, from_dict, to_dict
from ..io import write_json
from .blip2_pretrain import Blip2PretrainConfig, QFormerPretrainer
from .connectors.qformer import QFormer, QFormerConfig
from .vision import VisionTowerConfig

logger = logging.getLogger(__name__)

MODEL_CONFIG, MODEL_WEIGHTS = "config.json", "model.safetensors"
STAGE1_COMMAND = "bridgevlm train configs/shapes/blip2_stage1.yaml --out DIR world=..."

# The Q-Former fields a trained model fixes. A connector starting from it takes them from its config.
ARCHITECTURE = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "num_query_tokens",
                "cross_attention_frequency", "vocab_size", "max_position_embeddings", "pad_token_id",
                "layer_norm_eps")
# What the Q-Former learnt to read: a tower giving other features would feed it a different input.
VISION_FEATURES = ("feature_layer", "select", "post_norm")


@dataclass
class Stage1Config:
    """`config.json` of a saved stage-1 model: enough to rebuild it from the directory alone."""
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    objectives: Blip2PretrainConfig = field(default_factory=Blip2PretrainConfig)
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)


def load_text_tokenizer(path: str | Path):
    """The Q-Former's tokenizer. BERT's [CLS] and [SEP] take the BOS and EOS roles `encode_text`
    writes, so either way a text starts with the summary token ITC reads (and ITG swaps for [DEC])."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.bos_token_id is None and tokenizer.cls_token_id is not None:
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.eos_token_id is None and tokenizer.sep_token_id is not None:
        tokenizer.eos_token = tokenizer.sep_token
    missing = [name for name in ("bos_token", "eos_token", "pad_token") if getattr(tokenizer, f"{name}_id") is None]
    if missing:
        raise ValueError(f"the tokenizer at {path} has no {', '.join(missing)} (nor BERT's [CLS]/[SEP]); "
                         "the Q-Former needs a first summary token, an end token and padding")
    return tokenizer


def save_stage1(model: QFormerPretrainer, vision: VisionTowerConfig, tokenizer, directory: str | Path) -> Path:
    """Everything but the frozen tower (referenced by path); weights first, the config marks a complete save."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
             if not name.startswith("vision.")}
    tmp = directory / f".{MODEL_WEIGHTS}.tmp-{os.getpid()}"
    save_file(state, tmp)
    os.replace(tmp, directory / MODEL_WEIGHTS)
    tokenizer.save_pretrained(directory)
    write_json(directory / MODEL_CONFIG, to_dict(Stage1Config(model.qformer.config, model.config, vision)))
    return directory


def load_stage1_config(directory: str | Path) -> Stage1Config:
    path = Path(directory) / MODEL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a BLIP-2 stage-1 model directory: {MODEL_CONFIG} is missing")
    return from_dict(Stage1Config, json.loads(path.read_text(encoding="utf-8")), source=str(path))


def load_stage1_pretrainer(directory: str | Path, vision: nn.Module | None = None) -> QFormerPretrainer:
    """The saved Q-Former with its projections and heads; `vision` (e.g. the tower named in the
    config) is needed only to feed it pixels rather than features."""
    cfg = load_stage1_config(directory)
    model = QFormerPretrainer(vision, QFormer(cfg.qformer), cfg.objectives)
    path = Path(directory) / MODEL_WEIGHTS
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    missing = [name for name in missing if not name.startswith("vision.")]  # the tower is referenced, not saved
    if missing or unexpected:
        raise ValueError(f"{path} does not match {MODEL_CONFIG}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _qformer_state(directory: Path) -> dict:
    path = directory / MODEL_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete BLIP-2 stage-1 model directory: {MODEL_WEIGHTS} "
                                f"is missing")
    return {k.removeprefix("qformer."): v for k, v in load_file(path).items() if k.startswith("qformer.")}


def load_stage1_qformer(directory: str | Path) -> QFormer:
    """The trained Q-Former alone (queries, layers, text embeddings, LM head)."""
    qformer = QFormer(load_stage1_config(directory).qformer)
    qformer.load_state_dict(_qformer_state(Path(directory)))
    return qformer


# ------------------------------------------------------------------------------------------------
# Stage 2 (and InstructBLIP) start from it: a connector's Q-Former takes the stage-1 architecture and weights
# ------------------------------------------------------------------------------------------------

def stage1_model_dir(path: str | Path) -> Path:
    """The stage-1 model directory `path` stands for: itself, or a `blip2_stage1` run's `model/`."""
    path = Path(path)
    for directory in (path, path / "model"):
        if (directory / MODEL_CONFIG).is_file():
            return directory
    what = "does not exist" if not path.exists() else f"holds no {MODEL_CONFIG} (nor model/{MODEL_CONFIG})"
    raise FileNotFoundError(f"connector.init: {path} {what}; it must be a finished BLIP-2 stage-1 run or its "
                            f"model directory, made by `{STAGE1_COMMAND.replace('DIR', str(path))}`")


def stage1_qformer_config(qformer: QFormerConfig, directory: Path, vision: VisionTowerConfig,
                          vision_width: int) -> QFormerConfig:
    """`qformer` with the architecture (ARCHITECTURE) of the stage-1 Q-Former in `directory`.

    Sizes follow the stage-1 model: a field left at its default takes the stage-1 value, a field
    set to another value is an error that names it. `text_input`, `lm_head` and `dropout` stay the
    connector's own. The VLM's tower (`vision`, `vision_width` wide) must give the features stage 1
    was trained on."""
    return follow_stage1(qformer, load_stage1_config(directory), str(directory), vision, vision_width)


def follow_stage1(qformer: QFormerConfig, stage1: Stage1Config, source: str, vision: VisionTowerConfig,
                  vision_width: int) -> QFormerConfig:
    """`stage1_qformer_config` for the stage-1 config `stage1`, saved or not; `source` names where it
    comes from in error messages (a directory, or a stage-1 recipe that would make it)."""
    if stage1.qformer.vision_width != vision_width:
        raise ValueError(f"connector.init: the stage-1 Q-Former in {source} reads vision features "
                         f"{stage1.qformer.vision_width} wide, but this model's tower ({vision.path}) gives "
                         f"{vision_width}; use the tower stage 1 was trained on ({stage1.vision.path})")
    differing = [f"{name} {getattr(vision, name)!r} (stage 1: {getattr(stage1.vision, name)!r})"
                 for name in VISION_FEATURES if getattr(vision, name) != getattr(stage1.vision, name)]
    if differing:
        raise ValueError(f"connector.init: the stage-1 Q-Former in {source} was trained on other vision "
                         f"features than this model's tower gives: vision.{', vision.'.join(differing)}; "
                         f"set the model's vision config to the stage-1 one")
    reason = f"the stage-1 Q-Former in {source}"
    return follow_fields(qformer, "connector.qformer",
                         {name: (getattr(stage1.qformer, name), reason) for name in ARCHITECTURE})


def load_stage1_into(qformer: QFormer, directory: Path) -> None:
    """Copy the stage-1 weights into `qformer` (built with `stage1_qformer_config`). Every one of its
    weights must be in the stage-1 model; stage-1 weights it has no place for are dropped: the text
    side when it has `text_input: false` (BLIP-2's stage 2 drops it too) and the LM head unless it
    keeps one. The ITC/ITM projections and heads live outside the Q-Former and never come along."""
    state = _qformer_state(directory)
    own = qformer.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"connector.init: {directory / MODEL_WEIGHTS} lacks {len(missing)} weight(s) the "
                         f"connector's Q-Former needs: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for name, tensor in own.items():
        if state[name].shape != tensor.shape:
            raise ValueError(f"connector.init: {directory / MODEL_WEIGHTS}: {name} has shape "
                             f"{tuple(state[name].shape)}, the connector's Q-Former {tuple(tensor.shape)}")
    qformer.load_state_dict({name: state[name] for name in own})
    dropped = sorted(set(state) - set(own))
    logger.info("connector: Q-Former from %s (%d tensors; %d stage-1 tensors not used%s)", directory, len(own),
                len(dropped), f", e.g. {dropped[0]}" if dropped else "")
