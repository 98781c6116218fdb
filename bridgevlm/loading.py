"""`bridgevlm.load(path)`: a saved model, a training run, or a Hugging Face Llava directory."""
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
    model_type = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type == "llava":
        from .convert.llava import import_llava

        return import_llava(directory, trust_remote_code=trust_remote_code)
    raise ValueError(f"{directory}/config.json is a {model_type!r} model; bridgevlm loads its own model "
                     f"directories and Hugging Face Llava ('llava') directories")
