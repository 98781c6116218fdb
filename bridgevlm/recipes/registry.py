"""Recipe files: YAML whose `task` names the recipe; the rest is that recipe's typed config."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..config import ConfigError, load_config, load_layered_yaml, to_dict
from .backbones import BackboneRecipe, make_backbones
from .blip2 import Blip2Stage1Recipe, run_blip2_stage1
from .clip import ClipRecipe, run_clip
from .lm import LmRecipe, run_lm
from .vlm import VlmRecipe, run_vlm

RECIPES: dict[str, tuple[type, Callable]] = {
    "clip": (ClipRecipe, run_clip),
    "lm": (LmRecipe, run_lm),
    "backbones": (BackboneRecipe, lambda recipe, out, progress: make_backbones(recipe, out, progress=progress)),
    "vlm": (VlmRecipe, run_vlm),
    "blip2_stage1": (Blip2Stage1Recipe, run_blip2_stage1),
}


def load_recipe(path: str | Path, overrides: Sequence[str] = ()):
    """(task name, typed recipe) from a YAML file plus dotted overrides."""
    task = load_layered_yaml(path).get("task")
    if not isinstance(task, str) or task not in RECIPES:
        raise ConfigError(f"{path}: field 'task' must be one of {', '.join(RECIPES)}, got {task!r}")
    recipe_cls, _ = RECIPES[task]
    # The file and overrides merge over the recipe's own defaults, so a partial section such as
    # `qformer: {num_layers: 2}` keeps the recipe's other qformer values, not its class's defaults.
    return task, load_config(recipe_cls, path, overrides, base=to_dict(recipe_cls()), skip_keys=("task",))


def run_recipe_file(path: str | Path, overrides: Sequence[str], out: str | Path, progress: bool = True) -> dict:
    task, recipe = load_recipe(path, overrides)
    return RECIPES[task][1](recipe, Path(out), progress)
