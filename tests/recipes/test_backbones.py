import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPModel

from bridgevlm.config import from_dict, to_dict
from bridgevlm.data.shapes.world import WorldConfig
from bridgevlm.recipes.backbones import CHECK_LIMIT, BackboneRecipe, evaluate_backbones, load_manifest, make_backbones
from bridgevlm.recipes.registry import load_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 3  # the tiny_backbones fixture's steps per model


def test_writes_the_backbone_directories_and_records(tiny_backbones):
    for name in ("tokenizer", "clip", "lm", "manifest.json", "history.json", "recipe.yaml", "world/world.json"):
        assert (tiny_backbones / name).exists(), name


def test_backbones_load_with_plain_transformers(tiny_backbones, tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbones / "tokenizer")
    assert len(tokenizer) == tiny.backbone_dict()["tokenizer_vocab_size"]
    clip = CLIPModel.from_pretrained(tiny_backbones / "clip")
    lm = AutoModelForCausalLM.from_pretrained(tiny_backbones / "lm")
    # both speak the shared tokenizer, and carry a copy of it
    assert clip.config.text_config.vocab_size == lm.config.vocab_size == len(tokenizer)
    for name in ("clip", "lm"):
        assert AutoTokenizer.from_pretrained(tiny_backbones / name).get_vocab() == tokenizer.get_vocab()
    assert clip.config.vision_config.hidden_size == tiny.backbone_dict()["clip"]["model"]["vision_hidden"]
    assert lm.config.hidden_size == tiny.backbone_dict()["lm"]["model"]["hidden_size"]
    # the published models are the trained run's models
    trained = {"clip": CLIPModel.from_pretrained(tiny_backbones / "runs" / "clip" / "model"),
               "lm": AutoModelForCausalLM.from_pretrained(tiny_backbones / "runs" / "lm" / "model")}
    for name, model in (("clip", clip), ("lm", lm)):
        other = trained[name].state_dict()
        assert model.state_dict().keys() == other.keys()
        for key, value in model.state_dict().items():
            assert torch.equal(value, other[key]), f"{name}: {key}"
        # ... whose weights are those of the last training checkpoint (the wrapper adds a prefix)
        checkpoint = load_file(tiny_backbones / "runs" / name / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
        prefix = "clip." if name == "clip" else "model."
        params = dict(model.named_parameters())
        assert checkpoint
        for key, value in checkpoint.items():
            assert torch.equal(params[key.removeprefix(prefix)], value), f"{name}: {key}"


def test_manifest(tiny_backbones, tiny):
    manifest = load_manifest(tiny_backbones)
    assert manifest == json.loads((tiny_backbones / "manifest.json").read_text())
    recipe = tiny.backbones()
    assert manifest["command"] == "pytest tiny backbones"
    assert manifest["seed"] == {"world": recipe.world.seed, "clip": recipe.clip.train.seed,
                                "lm": recipe.lm.train.seed, "lm_corpus": recipe.lm.corpus_seed}
    assert from_dict(WorldConfig, manifest["world"]) == recipe.world
    assert set(manifest["train_seconds"]) == {"world", "tokenizer", "clip", "lm"}
    assert all(seconds >= 0 for seconds in manifest["train_seconds"].values())
    assert manifest["steps"] == {"clip": STEPS, "lm": STEPS}
    clip, lm = manifest["val_metrics"]["clip"], manifest["val_metrics"]["lm"]
    assert 0 <= clip["recall_at_1"] <= 1
    assert 0 <= lm["text_qa_accuracy"] <= 1 and lm["perplexity"] > 1
    assert clip == json.loads((tiny_backbones / "runs" / "clip" / "metrics.json").read_text())
    assert lm == json.loads((tiny_backbones / "runs" / "lm" / "metrics.json").read_text())
    # test-split scores are recorded in full and on the first CHECK_LIMIT items per family
    assert set(manifest["test_metrics"]) == set(manifest["check_metrics"]) == {"clip", "lm"}
    assert 0 <= manifest["test_metrics"]["lm"]["text_qa_accuracy"] <= 1


def test_evaluate_backbones_reproduces_the_recorded_check(tiny_backbones):
    manifest = load_manifest(tiny_backbones)
    again = evaluate_backbones(tiny_backbones, tiny_backbones / "world", "test", limit_per_family=CHECK_LIMIT)
    assert again == manifest["check_metrics"]
    assert {"platform", "threads", "torch"} <= set(manifest["machine"])


def test_history_holds_the_training_curves(tiny_backbones):
    history = json.loads((tiny_backbones / "history.json").read_text())
    assert set(history) == {"clip", "lm"}
    for name in ("clip", "lm"):
        losses = [h for h in history[name] if "loss" in h]
        assert [h["step"] for h in losses] == list(range(1, STEPS + 1))
        assert all(h["loss"] > 0 for h in losses)
        assert any(k.startswith("eval/") for h in history[name] for k in h)


def test_recipe_yaml_reloads(tiny_backbones, tiny):
    # A runnable recipe file: `bridgevlm train <dir>/recipe.yaml` re-creates the backbones.
    task, saved = load_recipe(tiny_backbones / "recipe.yaml")
    assert task == "backbones"
    expected = tiny.backbones()
    assert saved.world == expected.world
    assert (saved.tokenizer_vocab_size, saved.tokenizer_corpus_scenes) == (400, 50)
    assert to_dict(saved.clip.model) == to_dict(expected.clip.model)
    assert to_dict(saved.lm.train) == to_dict(expected.lm.train)


def test_load_manifest_of_a_directory_without_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found.*--from-scratch"):
        load_manifest(tmp_path)



def test_a_clip_finetune_continues_from_the_first_clip_and_is_what_ships(tiny_backbones, tiny, tmp_path):
    out = tmp_path / "backbones"
    shutil.copytree(tiny_backbones, out)  # world, tokenizer, clip and lm are done: only the fine-tune runs
    fields = tiny.backbone_dict()
    fields["clip_finetune"] = {"hard_negative_words": [["circle", "square", "triangle", "diamond", "star"]],
                               "train": {**fields["clip"]["train"], "max_steps": 2}}
    manifest = make_backbones(from_dict(BackboneRecipe, fields), out, progress=False, command="pytest finetune")
    finetune = out / "runs" / "clip_finetune"
    # it starts from the first run's model, trains on, and its model is the shipped CLIP
    config = yaml.safe_load((finetune / "config.yaml").read_text())
    assert config["pretrained"] == str(out / "runs" / "clip" / "model") and config["hard_negative_words"]
    first, shipped = (CLIPModel.from_pretrained(d).state_dict() for d in (out / "runs" / "clip" / "model", out / "clip"))
    tuned = CLIPModel.from_pretrained(finetune / "model").state_dict()
    assert all(torch.equal(shipped[k], tuned[k]) for k in tuned)
    assert any(not torch.equal(first[k], tuned[k]) for k in tuned)
    assert manifest["steps"]["clip"] == STEPS + 2 and manifest["steps"]["lm"] == STEPS
    assert manifest["val_metrics"]["clip"] == json.loads((finetune / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert set(history) == {"clip", "clip_finetune", "lm"}
    assert [h["step"] for h in history["clip_finetune"] if "loss" in h] == [1, 2]
