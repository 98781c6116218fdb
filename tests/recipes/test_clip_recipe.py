import json

import pytest
import torch
from transformers import AutoTokenizer, CLIPModel

from bridgevlm.config import load_config
from bridgevlm.data.images import ImageProcessor
from bridgevlm.eval.clip_eval import evaluate_clip_on_world
from bridgevlm.models.contrastive import ContrastiveModel
from bridgevlm.recipes.clip import ClipRecipe, run_clip

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 3


@pytest.fixture(scope="module")
def clip_run(shapes_world, world_tokenizer_dir, tiny, tmp_path_factory):
    recipe = tiny.clip(shapes_world, world_tokenizer_dir, max_steps=STEPS)
    run_dir = tmp_path_factory.mktemp("clip_run")
    return recipe, run_dir, run_clip(recipe, run_dir, progress=False)


def test_model_dir_loads_with_plain_transformers(clip_run, world_tokenizer_dir):
    recipe, run_dir, _ = clip_run
    model = CLIPModel.from_pretrained(run_dir / "model")
    assert model.config.vision_config.image_size == recipe.model.image_size
    assert model.config.vision_config.patch_size == recipe.model.patch_size
    assert model.config.text_config.hidden_size == recipe.model.text_hidden
    assert model.config.projection_dim == recipe.model.projection_dim
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    original = AutoTokenizer.from_pretrained(world_tokenizer_dir)
    assert tokenizer.get_vocab() == original.get_vocab()
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id


def test_saved_model_is_the_trained_one(clip_run, shapes_world):
    recipe, run_dir, result = clip_run
    clip = ContrastiveModel.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    processor = ImageProcessor(size=clip.clip.config.vision_config.image_size)
    again = evaluate_clip_on_world(clip, tokenizer, processor, shapes_world, recipe.eval_split)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == result["metrics"]
    for key, value in saved.items():
        assert again[key] == pytest.approx(value, abs=1e-6), key
    # the latest checkpoint's trainable weights are the saved model's
    from safetensors.torch import load_file

    state = load_file(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    params = dict(clip.named_parameters())
    assert state, "the checkpoint holds no weights"
    for name, tensor in state.items():
        torch.testing.assert_close(params[name], tensor, msg=name)


def test_metrics(clip_run):
    _, run_dir, result = clip_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("zeroshot_accuracy", "recall_at_1", "recall_at_5", "text_recall_at_1",
                "zeroshot_colour_accuracy", "zeroshot_shape_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["recall_at_1"] <= metrics["recall_at_5"] <= metrics["recall_at_10"]
    assert metrics["zeroshot_examples"] >= 1
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert result["steps"] == STEPS

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "loss" in line]
    assert [line["step"] for line in train_lines] == list(range(1, STEPS + 1))
    assert all(line["loss"] > 0 and "logit_scale" in line for line in train_lines)
    evals = [line for line in lines if any(k.startswith("eval/") for k in line)]
    assert [line["step"] for line in evals] == [STEPS]
    assert 0.0 <= evals[0]["eval/zeroshot_accuracy"] <= 1.0


def test_config_yaml_reloads_as_the_recipe(clip_run):
    recipe, run_dir, _ = clip_run
    reloaded = load_config(ClipRecipe, run_dir / "config.yaml")
    assert isinstance(reloaded, ClipRecipe)
    assert reloaded == recipe
