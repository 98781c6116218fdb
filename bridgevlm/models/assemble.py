"""Build a VisionLanguageModel from its config, save the parts that changed, load it back, export it.

A saved directory holds `vlm.yaml` (the config, the LoRA adapters present, which parts were fully
trained), `weights.safetensors` (the connector, the adapters and any fully trained part) and, for a
Q-Former that reads instructions, its tokenizer in `qformer_tokenizer/`. The pretrained vision tower
and LLM are referenced by path, so a stage checkpoint stays small; `export_vlm` writes a standalone
directory with LoRA merged.

A stage that trained only some parts of the connector (`trainable.connector_parts`, e.g. CROME's
adapter) and started from a saved model saves only those parts; its `vlm.yaml` names that model's
directory as `base` (a path relative to itself), which `load_vlm` loads first.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

from ..config import from_dict, to_dict
from ..data.images import ImageProcessor
from ..data.instructions import InstructionTokenizer
from ..data.templates import IMAGE_TAG, ImagePlaceholder
from ..io import atomic_write_text
from .blip2_stage1 import load_stage1_into, load_text_tokenizer, stage1_model_dir, stage1_qformer_config
from .connectors import ConnectorConfig, build_connector, connector_part_names, is_in_llm
from .llm import LanguageModel, LanguageModelProtocol
from .lora import LoraSettings, inject_lora
from .seq2seq_llm import Seq2SeqLanguageModel
from .vision import VisionTower, VisionTowerConfig
from .vlm import VisionLanguageModel

CONFIG_FILE = "vlm.yaml"
WEIGHTS_FILE = "weights.safetensors"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"  # the Q-Former's own tokenizer (where HF InstructBLIP keeps it too)
# LLaVA's IMAGE_TOKEN_INDEX: a placeholder id outside every vocabulary, for tokenizers without an <image> token.
FALLBACK_IMAGE_TOKEN_ID = -200


@dataclass
class VlmConfig:
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: str = ""  # a causal or encoder-decoder (T5) LM directory or hub id
    tokenizer: str | None = None  # None: the LLM's own
    image_aspect: str = "pad"  # crop | pad (to a square with the mean colour, as LLaVA-1.5)
    template: str = "vicuna_v1"  # the conversation format used for chat and evaluation
    image_token_id: int | None = None  # None: the tokenizer's <image> token, else an id outside the vocabulary
    # A Q-Former that reads instructions gets at most this many instruction tokens per image, start and
    # end tokens included (longer ones keep their beginning); None: as many as it has text positions.
    instruction_max_length: int | None = None


@dataclass
class LoadedVlm:
    """A model with everything needed to feed it."""

    model: VisionLanguageModel
    tokenizer: object
    processor: ImageProcessor
    config: VlmConfig
    qformer_tokenizer: object | None = None  # the connector's own tokenizer for qformer_input_ids (InstructBLIP)
    directory: Path | None = None  # the saved model directory whose weights the model holds (load_vlm, save_vlm)

    @property
    def placeholder(self) -> ImagePlaceholder:
        return ImagePlaceholder(self.model.image_token_id, self.model.num_image_tokens, self.model.text_copy_offset)

    def instruction_tokenizer(self) -> InstructionTokenizer | None:
        """How each image's instruction is tokenised for the Q-Former; None when the connector reads none."""
        connector = self.model.connector
        if not getattr(connector, "reads_instructions", False):
            return None
        if self.qformer_tokenizer is None:
            raise ValueError("this model's Q-Former reads an instruction with each image (qformer.text_input: true) "
                             "but has no tokenizer for it: start the connector from a BLIP-2 stage-1 model "
                             "(connector.init), whose tokenizer it then uses, or give an imported model its "
                             f"{QFORMER_TOKENIZER_DIR}/; a Q-Former that reads only images has text_input: false")
        positions = connector.qformer.config.max_position_embeddings
        limit = self.config.instruction_max_length or positions
        if limit > positions:
            raise ValueError(f"instruction_max_length {limit} exceeds the Q-Former's {positions} text positions")
        return InstructionTokenizer(self.qformer_tokenizer, limit)

    def chat(self, image, text: str, **generation) -> str:
        """One question about one image (a PIL image, or None): `model.chat(image, "What is here?")`."""
        from ..infer.pipeline import chat  # generation code is loaded only when used

        return chat(self, image, text, **generation)


class VlmLoadError(ValueError):
    """A saved model directory that is incomplete or does not match its config."""


def image_token_id(tokenizer) -> int:
    """The tokenizer's `<image>` token if it has one, else a placeholder id outside the vocabulary."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TAG)
    if token_id is None or token_id == tokenizer.unk_token_id or IMAGE_TAG not in tokenizer.get_vocab():
        return FALLBACK_IMAGE_TOKEN_ID
    return token_id


def build_vlm(cfg: VlmConfig, base_dir: str | Path | None = None, trust_remote_code: bool = False) -> LoadedVlm:
    """Load the pretrained vision tower and LLM `cfg` names and a freshly initialised connector, or
    one whose Q-Former starts from the BLIP-2 stage-1 model `cfg.connector.init` (the returned config
    then holds the stage-1 sizes). Relative paths are looked up under `base_dir` first (a saved model's
    own directory)."""
    vision_cfg = replace(cfg.vision, path=_resolve(cfg.vision.path, base_dir))
    vision = VisionTower.from_pretrained(vision_cfg, trust_remote_code=trust_remote_code)
    llm_path = _resolve(cfg.llm, base_dir)
    if not llm_path:
        raise ValueError("llm is empty; give a causal or encoder-decoder LM directory or hub id")
    llm = load_language_model(llm_path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(_resolve(cfg.tokenizer, base_dir) or llm_path,
                                              trust_remote_code=trust_remote_code)
    connector_cfg, stage1_dir = cfg.connector, None
    if connector_cfg.init:
        stage1_dir = stage1_model_dir(_resolve(connector_cfg.init, base_dir))
        connector_cfg = replace(connector_cfg, init=str(stage1_dir), qformer=stage1_qformer_config(
            connector_cfg.qformer, stage1_dir, vision_cfg, vision.feature_size))
    connector = build_connector(connector_cfg, vision.feature_size, llm.config.hidden_size)
    qformer_tokenizer = None
    if stage1_dir is not None:
        if connector_cfg.init_weights:
            load_stage1_into(connector.qformer, stage1_dir)
        if connector.reads_instructions:  # with the ids stage 1 trained its text embeddings on
            qformer_tokenizer = load_text_tokenizer(stage1_dir)
    token_id = cfg.image_token_id if cfg.image_token_id is not None else image_token_id(tokenizer)
    model = VisionLanguageModel(vision, connector, llm, token_id)
    processor = ImageProcessor.from_pretrained(vision_cfg.path, image_size=vision.image_size, aspect=cfg.image_aspect)
    if processor.size != vision.image_size:
        raise ValueError(f"the image processor crops to {processor.size} px but the vision tower expects "
                         f"{vision.image_size} px ({vision_cfg.path})")
    return LoadedVlm(model, tokenizer, processor, replace(cfg, connector=connector_cfg), qformer_tokenizer)


def load_language_model(name_or_path: str | Path, dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False) -> LanguageModelProtocol:
    """The LLM wrapper its config calls for: encoder-decoder (T5, BART) or causal."""
    config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    return language_model_class(config).from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)


def language_model_class(config) -> type[LanguageModel] | type[Seq2SeqLanguageModel]:
    """The LLM wrapper a transformers config calls for: encoder-decoder (T5, BART) or causal."""
    return Seq2SeqLanguageModel if getattr(config, "is_encoder_decoder", False) else LanguageModel


def _resolve(path: str | None, base_dir: str | Path | None) -> str | None:
    if path and base_dir is not None and not os.path.isabs(path) and (Path(base_dir) / path).exists():
        return str(Path(base_dir) / path)
    return path


def saved_state(model: VisionLanguageModel, connector_parts: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The parameters that differ from the pretrained parts: the connector (only its `connector_parts`
    when given; the rest lies in the base directory), LoRA adapters, and every parameter of a part
    that was fully trained."""
    connector = None
    if connector_parts:
        connector = {f"connector.{name}" for name in
                     connector_part_names(model.connector, connector_parts, "connector_parts")}

    def changed(name: str) -> bool:
        if name.startswith("connector."):
            return connector is None or name in connector
        return "lora_" in name or name.split(".", 1)[0] in model.fully_trained

    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters() if changed(name)}


def _stacks_on(loaded: LoadedVlm, directory: Path) -> Path | None:
    """The directory a save of `loaded` to `directory` stacks on: the one the model was loaded from
    or last saved to, when the current stage trains only parts of the connector; else None."""
    if not loaded.model.connector_parts or loaded.directory is None:
        return None
    base = Path(loaded.directory).resolve()
    return None if base == directory.resolve() else base


def save_vlm(loaded: LoadedVlm, directory: str | Path) -> Path:
    """Write the changed weights and the config (weights first; the config marks a complete save).
    The model then counts as holding `directory`'s weights (`loaded.directory`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    base = _stacks_on(loaded, directory)
    parts = list(model.connector_parts) if base is not None else []
    tmp = directory / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    save_file(saved_state(model, parts), tmp)
    os.replace(tmp, directory / WEIGHTS_FILE)
    if loaded.qformer_tokenizer is not None:
        loaded.qformer_tokenizer.save_pretrained(directory / QFORMER_TOKENIZER_DIR)
    meta = {"vlm": to_dict(loaded.config), "lora": {k: to_dict(v) for k, v in model.lora_parts.items()},
            "fully_trained": sorted(model.fully_trained)}
    if base is not None:  # relative, so a run directory can move as a whole
        meta.update(base=os.path.relpath(base, directory.resolve()), connector_parts=parts)
    atomic_write_text(directory / CONFIG_FILE, yaml.safe_dump(meta, sort_keys=False))
    loaded.directory = directory
    return directory


def load_vlm(directory: str | Path, trust_remote_code: bool = False) -> LoadedVlm:
    """Rebuild a saved model from its directory alone (plus the pretrained parts it references)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise VlmLoadError(f"{directory} is not a bridgevlm model directory: {CONFIG_FILE} is missing")
    meta = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    cfg = from_dict(VlmConfig, meta["vlm"], source=str(config_path))
    if meta.get("base"):
        loaded = _load_base(directory, meta, cfg, trust_remote_code)
    else:
        # The saved weights hold the whole connector: the stage-1 model it started from is not needed.
        loaded = build_vlm(replace(cfg, connector=replace(cfg.connector, init=None, init_weights=True)),
                           base_dir=directory, trust_remote_code=trust_remote_code)
    loaded.config = cfg
    if (directory / QFORMER_TOKENIZER_DIR).is_dir():
        loaded.qformer_tokenizer = AutoTokenizer.from_pretrained(str(directory / QFORMER_TOKENIZER_DIR),
                                                                 trust_remote_code=trust_remote_code)
    model = loaded.model
    for part, settings in meta.get("lora", {}).items():
        lora = from_dict(LoraSettings, settings, source=f"{config_path}: lora.{part}")
        if part in model.lora_parts:  # injected by the base directory
            if model.lora_parts[part] != lora:
                raise VlmLoadError(f"{config_path}: lora.{part} {lora} differs from its base's "
                                   f"{model.lora_parts[part]}")
            continue
        inject_lora(getattr(model, part), lora, part)
        model.lora_parts[part] = lora
    model.fully_trained = set(meta.get("fully_trained", []))
    state = load_file(directory / WEIGHTS_FILE)
    expected = saved_state(model, meta.get("connector_parts", []))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(dict(model.named_parameters())))
    if missing or unexpected:
        raise VlmLoadError(f"{directory / WEIGHTS_FILE} does not match {CONFIG_FILE}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        param = model.get_parameter(name)
        if param.shape != tensor.shape:
            raise VlmLoadError(f"{directory / WEIGHTS_FILE}: {name} has shape {tuple(tensor.shape)}, "
                               f"the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
    loaded.directory = directory
    return loaded


def _load_base(directory: Path, meta: dict, cfg: VlmConfig, trust_remote_code: bool) -> LoadedVlm:
    """The model a partial save in `directory` stacks on (meta's `base`, relative to `directory`)."""
    base = directory / meta["base"]
    if not (base / CONFIG_FILE).is_file():
        raise VlmLoadError(f"{directory} holds only the connector parts {meta.get('connector_parts')} its stage "
                           f"trained, on top of the model in {base}, which is missing; keep the run directory "
                           f"together, or export a standalone copy (bridgevlm export) while it is")
    loaded = load_vlm(base, trust_remote_code=trust_remote_code)
    if to_dict(loaded.config) != to_dict(cfg):
        raise VlmLoadError(f"{directory / CONFIG_FILE}: its model config differs from that of its base {base}")
    return loaded


def export_vlm(loaded: LoadedVlm, directory: str | Path) -> Path:
    """A standalone copy: LoRA merged, vision tower and LLM (with tokenizer) saved inside, so the
    directory no longer depends on the pretrained paths."""
    directory = Path(directory)
    model = loaded.model
    model.merge_adapters()
    model.vision.save_pretrained(directory / "vision")
    loaded.processor.save_pretrained(directory / "vision")
    with _own_modules(model):
        model.llm.model.save_pretrained(directory / "llm")
    loaded.tokenizer.save_pretrained(directory / "llm")
    config = replace(loaded.config, vision=replace(loaded.config.vision, path="vision"), llm="llm", tokenizer=None,
                     image_token_id=model.image_token_id)
    model.fully_trained = set()  # the parts now live in vision/ and llm/
    save_vlm(LoadedVlm(model, loaded.tokenizer, loaded.processor, config, loaded.qformer_tokenizer), directory)
    return directory


@contextmanager
def _own_modules(model: VisionLanguageModel) -> Iterator[None]:
    """The LLM with its own modules in place of an in-LLM connector's wrappers (whose parameters the
    connector saves), so it is written in its own format."""
    if not is_in_llm(model.connector):
        yield
        return
    model.connector.detach(model.llm.model)
    try:
        yield
    finally:
        model.connector.attach(model.llm.model)
