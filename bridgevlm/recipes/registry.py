"""Recipe files: YAML whose `task` names the recipe; the rest is that recipe's typed config."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..config import ConfigError, load_config, load_yaml
from .backbones import BackboneRecipe, make_backbones
from .clip import ClipRecipe, run_clip
from .lm import LmRecipe, run_lm
from .vlm import VlmRecipe, run_vlm

RECIPES: dict[str, tuple[type, Callable]] = {
    "clip": (ClipRecipe, run_clip),
    "lm": (LmRecipe, run_lm),
    "backbones": (BackboneRecipe, lambda recipe, out, progress: make_backbones(recipe, out, progress=progress)),
    "vlm": (VlmRecipe, run_vlm),
}


def load_recipe(path: str | Path, overrides: Sequence[str] = ()):
    """(task name, typed recipe) from a YAML file plus dotted overrides."""
    task = load_yaml(path).get("task")
    if not isinstance(task, str) or task not in RECIPES:
        raise ConfigError(f"{path}: field 'task' must be one of {', '.join(RECIPES)}, got {task!r}")
    recipe_cls, _ = RECIPES[task]
    return task, load_config(recipe_cls, path, overrides, skip_keys=("task",))


def run_recipe_file(path: str | Path, overrides: Sequence[str], out: str | Path, progress: bool = True) -> dict:
    task, recipe = load_recipe(path, overrides)
    return RECIPES[task][1](recipe, Path(out), progress)
