"""The Shapes recipes of the in-LLM bridges (partial LoRA, Flamingo): parse, then a seconds-long run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from bridgevlm.config import from_dict
from bridgevlm.eval.vqa import evaluate_vqa_on_world
from bridgevlm.models.assemble import load_vlm
from bridgevlm.recipes.registry import load_recipe
from bridgevlm.recipes.vlm import VlmRecipe, fill_world, run_vlm
from bridgevlm.train.trainability import Trainability

REPO = Path(__file__).resolve().parents[2]
RECIPES = {"partial_lora": "configs/shapes/partial_lora.yaml", "gated_xattn": "configs/shapes/flamingo.yaml"}
TINY = {"partial_lora": {"rank": 4, "alpha": 4.0},
        "gated_xattn": {"num_latents": 4, "resampler_layers": 1, "resampler_heads": 2, "resampler_head_dim": 8,
                        "heads": 2, "head_dim": 8}}


@pytest.mark.parametrize("kind", RECIPES)
def test_shipped_recipe_parses(kind):
    task, recipe = load_recipe(REPO / RECIPES[kind], ["world=w"])
    assert task == "vlm" and recipe.model.connector.kind == kind
    assert [stage.name for stage in recipe.stages] == ["align", "instruct"]
    assert all(stage.trainable == Trainability(vision="frozen", connector="full", llm="frozen")
               for stage in recipe.stages)
    filled = fill_world(recipe)
    assert filled.stages[0].data.path == "w/captions/train.json" and filled.eval.world == "w"


@pytest.mark.parametrize("kind", RECIPES)
def test_two_stages_train_save_reload_and_evaluate(kind, vlm_parts, shapes_world, tmp_path, single_thread):
    raw = yaml.safe_load((REPO / RECIPES[kind]).read_text())
    raw.pop("task")
    model = raw["model"]
    model.update(vision={**model["vision"], "path": vlm_parts["vision"]["path"]}, llm=vlm_parts["llm"])
    model["connector"][kind].update(TINY[kind])
    for stage in raw["stages"]:
        stage["train"].update(batch_size=4, max_steps=2, eval_every=0, log_every=1)
    raw["eval"].update(limit_per_family=1, progress_limit_per_family=1)
    recipe = from_dict(VlmRecipe, {**raw, "world": str(shapes_world)})
    result = run_vlm(recipe, tmp_path, progress=False)
    assert [info["steps"] for info in result["stages"].values()] == [2, 2]
    for name in ("01_align", "02_instruct"):
        weights = load_file(tmp_path / name / "model/weights.safetensors")
        assert weights and all(key.startswith("connector.") for key in weights)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["vqa"]["held_in_mean"] <= 1.0 and 0.0 <= metrics["blind"]["held_in_mean"] <= 1.0
    reloaded = load_vlm(result["model"])
    assert reloaded.config.connector.kind == kind
    again = evaluate_vqa_on_world(reloaded, shapes_world, "test", limit_per_family=1, generation=recipe.eval.generation)
    assert again == metrics["vqa"]
