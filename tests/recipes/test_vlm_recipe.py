"""The staged VLM recipe on a tiny world: stage 1 (captions, connector) then stage 2 (instructions, LoRA)."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from bridgevlm.config import from_dict
from bridgevlm.models.assemble import load_vlm
from bridgevlm.recipes.vlm import VlmRecipe, run_vlm


def _recipe(vlm_parts, world, steps=3):
    train = {"batch_size": 4, "max_steps": steps, "log_every": 1, "optim": {"lr": 1e-3}}
    data = {"image_folder": str(world / "images"), "max_length": 256}
    return from_dict(VlmRecipe, {
        "model": vlm_parts,
        "stages": [
            {"name": "align", "trainable": {"connector": "full"},
             "data": {**data, "path": str(world / "captions/train.json"), "template": "plain"}, "train": train},
            {"name": "instruct", "trainable": {"connector": "full", "llm": "lora"}, "lora": {"rank": 4},
             "data": {**data, "path": str(world / "instruct/train.json")},
             "train": {**train, "optim": {"lr": 1e-3, "part_lrs": {"connector.": 2e-4}}}},
        ],
        "eval": {"world": str(world), "limit_per_family": 2},
    })


def test_two_stages_train_save_evaluate_and_skip_when_done(vlm_parts, shapes_world, tmp_path, single_thread):
    recipe = _recipe(vlm_parts, shapes_world)
    result = run_vlm(recipe, tmp_path, progress=False)
    assert set(result["stages"]) == {"align", "instruct"}
    for name in ("01_align", "02_instruct"):
        assert (tmp_path / name / "model" / "vlm.yaml").is_file()
    align = load_file(tmp_path / "01_align/model/weights.safetensors")
    assert align and all(k.startswith("connector.") for k in align)
    instruct = load_file(tmp_path / "02_instruct/model/weights.safetensors")
    assert any("lora_" in k for k in instruct) and all(k.startswith("connector.") or "lora_" in k for k in instruct)
    assert 0 < result["stages"]["align"]["data"]["supervised_share"] < 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    world = json.loads((shapes_world / "world.json").read_text())
    assert set(metrics["vqa"]["held_in"]) == set(world["held_in"]) and set(metrics["vqa"]["held_out"]) == set(world["held_out"])
    for key in ("held_in_mean", "held_out_mean"):
        assert 0.0 <= metrics["vqa"][key] <= 1.0 and 0.0 <= metrics["blind"][key] <= 1.0
    again = run_vlm(recipe, tmp_path, progress=False)  # finished stages are not trained again
    assert all(info["skipped"] for info in again["stages"].values()) and again["metrics"] == metrics
    assert again["stages"]["align"]["steps"] == 3 and again["stages"]["align"]["history"]
    assert load_vlm(result["model"]).model.lora_parts


def test_a_stage_can_start_from_a_saved_model(vlm_parts, shapes_world, tmp_path, single_thread):
    first = run_vlm(_only_first(vlm_parts, shapes_world), tmp_path / "a", progress=False)
    recipe = _recipe(vlm_parts, shapes_world)
    recipe.stages = recipe.stages[1:]
    recipe.stages[0].init = first["model"]
    recipe.eval.world = ""
    result = run_vlm(recipe, tmp_path / "b", progress=False)
    assert (tmp_path / "b/01_instruct/model/vlm.yaml").is_file() and result["metrics"] == {}


def _only_first(vlm_parts, world):
    recipe = _recipe(vlm_parts, world)
    recipe.stages = recipe.stages[:1]
    recipe.eval.world = ""
    return recipe


def test_bad_stage_data_is_named(vlm_parts, shapes_world, tmp_path, single_thread):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x1", "image": "train/train_000000.png",
                                "conversations": [{"from": "human", "value": "no tag"}, {"from": "gpt", "value": "a"}]}]))
    recipe = _recipe(vlm_parts, shapes_world)
    recipe.stages[0].data.path = str(bad)
    with pytest.raises(ValueError, match=r"bad\.json: sample 0 \(id 'x1'\): has 0 <image> tag"):
        run_vlm(recipe, tmp_path / "run", progress=False)


def test_gradient_checkpointing_gives_the_same_gradients(vlm_parts, shapes_world, tmp_path, single_thread):
    import torch

    from bridgevlm.data.conversations import ConversationDataset, ImageSource, PadCollator
    from bridgevlm.data.formats import read_conversations
    from bridgevlm.data.templates import get_template
    from bridgevlm.models.assemble import VlmConfig, build_vlm
    from bridgevlm.models.lora import LoraSettings
    from bridgevlm.train.trainability import Trainability, apply_trainability

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        loaded = build_vlm(from_dict(VlmConfig, vlm_parts))
        apply_trainability(loaded.model, Trainability(llm="full"), LoraSettings())
        if checkpointing:
            loaded.model.llm.set_activation_checkpointing(True)
        records = read_conversations(shapes_world / "instruct/train.json")[:4]
        data = ConversationDataset(records, loaded.tokenizer, get_template("vicuna_v1"), 512,
                                   images=ImageSource(shapes_world / "images", loaded.processor, loaded.placeholder))
        batch = PadCollator(loaded.tokenizer.pad_token_id, loaded.processor)([data[i] for i in range(4)])
        loaded.model.train()
        loaded.model(batch).loss_sum.backward()
        grads.append({n: p.grad.clone() for n, p in loaded.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("llm.") for n in grads[0])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_image_samples_longer_than_max_length_are_named(vlm_parts, shapes_world, tmp_path, single_thread):
    recipe = _recipe(vlm_parts, shapes_world)
    recipe.stages[0].data.max_length = 10  # fewer than the 16 image tokens of one image
    with pytest.raises(ValueError, match=r"captions/train\.json: sample 0 \(id 'train_000000'\): first exchange alone has \d+ tokens, more than max_length 10"):
        run_vlm(recipe, tmp_path / "run", progress=False)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_torchrun_trains_and_saves_once(vlm_parts, shapes_world, tmp_path, strategy):
    import os
    import socket
    import subprocess
    import sys

    import yaml

    from bridgevlm.config import to_dict

    recipe = _recipe(vlm_parts, shapes_world, steps=2)
    recipe.eval.world = ""
    for stage in recipe.stages:
        stage.train.distributed = strategy
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"task": "vlm", **to_dict(recipe)}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(port), "-m", "bridgevlm.cli", "train", str(path),
                             "--out", str(tmp_path / "run"), "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("01_align", "02_instruct"):
        assert (tmp_path / "run" / name / "model" / "weights.safetensors").is_file()
        lines = (tmp_path / "run" / name / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2  # rank 0 alone logs: one line per step
    assert load_vlm(tmp_path / "run/02_instruct/model").model.lora_parts


def test_a_feature_cached_stage_trains_exactly_as_an_uncached_one(vlm_parts, shapes_world, tmp_path, single_thread):
    weights = []
    for cached in (False, True):
        recipe = _only_first(vlm_parts, shapes_world)
        recipe.stages[0].cache_vision_features = cached
        run_vlm(recipe, tmp_path / str(cached), progress=False)
        weights.append(load_file(tmp_path / str(cached) / "01_align/model/weights.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert (weights[0][name] - weights[1][name]).abs().max() <= 1e-6, name
    assert list((tmp_path / "True/feature_cache").iterdir())
    recipe = _only_first(vlm_parts, shapes_world)
    recipe.stages[0].cache_vision_features = True
    recipe.stages[0].trainable.vision = "full"
    with pytest.raises(ValueError, match="cache_vision_features needs trainable.vision: frozen"):
        run_vlm(recipe, tmp_path / "bad", progress=False)
