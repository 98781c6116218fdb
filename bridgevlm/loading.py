"""`bridgevlm.load(path)`: a saved model, a training run, or a Hugging Face Llava / BLIP-2 / InstructBLIP directory."""
from __future__ import annotations

import json
from pathlib import Path

from .models.assemble import CONFIG_FILE, LoadedVlm, load_vlm


def find_model_dir(path: str | Path) -> Path:
    """The model directory `path` stands for: itself, or the last finished stage of a run directory."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() or (path / "config.json").is_file():
        return path
    stages = sorted(p.parent for p in path.glob(f"*/model/{CONFIG_FILE}"))
    if stages:
        return stages[-1]
    if not path.exists():
        raise FileNotFoundError(f"no such model or run directory: {path}")
    raise FileNotFoundError(f"{path} holds no model: expected {CONFIG_FILE} (a bridgevlm model), config.json "
                            f"(a Hugging Face Llava model) or stage directories NN_name/model/ (a run)")


def load(path: str | Path, trust_remote_code: bool = False) -> LoadedVlm:
    """Load a model for inference; `loaded.chat(image, "...")` asks it something."""
    directory = find_model_dir(path)
    if (directory / CONFIG_FILE).is_file():
        return load_vlm(directory, trust_remote_code=trust_remote_code)
    return import_hf(directory, trust_remote_code=trust_remote_code)


def _importers() -> dict:
    # Imported lazily: each pulls in its transformers model family.
    from .convert.blip2 import import_blip2, import_instructblip
    from .convert.llava import import_llava

    return {"llava": import_llava, "blip-2": import_blip2, "instructblip": import_instructblip}


def import_hf(directory: str | Path, trust_remote_code: bool = False) -> LoadedVlm:
    """A Hugging Face vision-language directory (or hub id) as a bridgevlm model, by its model_type."""
    if (Path(directory) / "config.json").is_file():
        model_type = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get("model_type")
    else:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code).model_type
    importers = _importers()
    if model_type not in importers:
        raise ValueError(f"{directory}/config.json is a {model_type!r} model; bridgevlm loads its own model "
                         f"directories and Hugging Face {', '.join(repr(k) for k in importers)} directories")
    return importers[model_type](directory, trust_remote_code=trust_remote_code)
