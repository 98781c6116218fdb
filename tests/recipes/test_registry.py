from pathlib import Path

import pytest

from bridgevlm.config import ConfigError
from bridgevlm.recipes.backbones import BackboneRecipe
from bridgevlm.recipes.clip import ClipRecipe
from bridgevlm.recipes.lm import LmRecipe
from bridgevlm.recipes.registry import RECIPES, load_recipe

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
task: clip
world: runs/world
tokenizer: runs/tokenizer
model: {image_size: 64, patch_size: 32}
train:
  batch_size: 4
  max_steps: 10
  optim: {lr: 1.0e-3}
"""


def _write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_file_and_overrides_give_the_typed_recipe(tmp_path):
    path = _write(tmp_path, GOOD)
    task, recipe = load_recipe(path, ["train.optim.lr=5e-4", "model.vision_layers=2", "world=elsewhere"])
    assert task == "clip"
    assert isinstance(recipe, ClipRecipe)
    assert recipe.train.optim.lr == 5e-4  # the override wins over the file
    assert recipe.model.vision_layers == 2
    assert recipe.world == "elsewhere"
    assert recipe.tokenizer == "runs/tokenizer"  # from the file
    assert (recipe.model.image_size, recipe.model.patch_size) == (64, 32)
    assert recipe.train.max_steps == 10 and recipe.train.batch_size == 4
    assert recipe.model.text_hidden == ClipRecipe().model.text_hidden  # default kept
    assert load_recipe(path)[1].train.optim.lr == 1e-3


@pytest.mark.parametrize("task,cls", [("lm", LmRecipe), ("backbones", BackboneRecipe)])
def test_task_picks_the_recipe_type(tmp_path, task, cls):
    field = "corpus_scenes: 7" if task == "lm" else "tokenizer_corpus_scenes: 7"
    got_task, recipe = load_recipe(_write(tmp_path, f"task: {task}\n{field}\n"))
    assert got_task == task and isinstance(recipe, cls)
    assert getattr(recipe, field.split(":")[0]) == 7


def test_unknown_key_names_the_file_and_dotted_field(tmp_path):
    path = _write(tmp_path, GOOD.replace("max_steps: 10", "max_stepz: 10"))
    with pytest.raises(ConfigError) as error:
        load_recipe(path)
    message = str(error.value)
    assert str(path) in message
    assert "train.max_stepz" in message
    assert "max_steps" in message  # the valid field is suggested
    assert error.value.field == "train.max_stepz"


def test_override_typo_names_the_command_line_override(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_recipe(_write(tmp_path, GOOD), ["model.vision_layers=2", "train.lrr=1"])
    message = str(error.value)
    assert "command line override 'train.lrr=1'" in message
    assert "train.lrr" in message
    assert str(tmp_path) not in message  # the file is fine; the override is at fault
    assert error.value.field == "train.lrr"


def test_override_of_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"command line override 'train.max_steps=many'.*train\.max_steps"):
        load_recipe(_write(tmp_path, GOOD), ["train.max_steps=many"])


@pytest.mark.parametrize("task_line", ["", "task: clipp\n", "task: null\n", "task: 3\n"])
def test_missing_or_invalid_task_lists_the_valid_tasks(tmp_path, task_line):
    path = _write(tmp_path, task_line + "world: runs/world\n")
    with pytest.raises(ConfigError) as error:
        load_recipe(path)
    message = str(error.value)
    assert str(path) in message and "task" in message
    assert "clip, lm, backbones, vlm" in message
    assert set(RECIPES) == {"clip", "lm", "backbones", "vlm", "blip2_stage1"}
    from bridgevlm.cli import RECIPE_TASKS

    assert set(RECIPE_TASKS) == set(RECIPES)  # what `bridgevlm train --help` lists


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_shipped_clip_recipe_loads():
    task, recipe = load_recipe(REPO / "configs" / "shapes" / "clip.yaml", ["world=w", "tokenizer=t"])
    assert task == "clip" and isinstance(recipe, ClipRecipe)
    assert (recipe.world, recipe.tokenizer) == ("w", "t")
    assert recipe.captions == ["captions/train.json", "captions_short/train.json"]
    assert recipe.train.precision == "bf16"
    assert recipe.train.optim.betas == (0.9, 0.98)
    assert recipe.train.max_steps > 0 and recipe.train.schedule.kind == "cosine"


def test_task_that_is_not_a_string_lists_valid_tasks(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: [clip]\n")
    with pytest.raises(ConfigError, match="clip, lm, backbones"):
        load_recipe(path)
