"""BLIP-2 and InstructBLIP with an encoder-decoder LLM (a tiny T5) through the `vlm` recipe: prefix-LM
training on captions, then on an instruction mixture, only the connector training; save, reload and
evaluate with generation and candidate ranking."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bridgevlm.config import from_dict
from bridgevlm.data.formats import read_conversations
from bridgevlm.models.assemble import build_vlm, load_vlm
from bridgevlm.models.seq2seq_llm import Seq2SeqLanguageModel
from bridgevlm.recipes.vlm import VlmRecipe, run_vlm

pytestmark = pytest.mark.usefixtures("single_thread")

FROZEN = {"vision": "frozen", "connector": "full", "llm": "frozen"}
TRAIN = {"batch_size": 4, "log_every": 1, "optim": {"lr": 1e-2}}
FAMILIES = ("colour", "dialogue")


def test_a_t5_blip2_trains_its_connector_on_prefix_lm_samples_and_evaluates(t5_parts, qformer_parts, shapes_world,
                                                                            tmp_path, connector_calls):
    recipe = from_dict(VlmRecipe, {
        "model": {**qformer_parts, "llm": t5_parts["llm"], "image_aspect": "crop", "template": "blip2_vqa_short",
                  "connector": {**qformer_parts["connector"], "qformer": {"text_input": True}}},
        "stages": [
            {"name": "generative", "init": "base", "trainable": FROZEN,
             "data": {"path": str(shapes_world / "captions/train.json"), "image_folder": str(shapes_world / "images"),
                      "template": "plain", "max_length": 128},
             "train": {**TRAIN, "max_steps": 2}},
            {"name": "instruct", "init": "previous", "trainable": FROZEN, "cache_vision_features": True,
             "data": {"image_folder": str(shapes_world / "images"), "max_length": 256,
                      "sources": [{"name": f, "path": str(shapes_world / f"tasks/{f}/train.json")} for f in FAMILIES]},
             "train": {**TRAIN, "max_steps": 3}},
        ],
        "eval": {"world": str(shapes_world), "limit_per_family": 1, "rank_candidates": True,
                 "generation": {"max_new_tokens": 4}},
    })
    result = run_vlm(recipe, tmp_path, progress=False)

    for name, steps in (("generative", 2), ("instruct", 3)):
        stage = result["stages"][name]
        losses = [r["loss"] for r in stage["history"] if "loss" in r]
        assert stage["steps"] == steps and len(losses) == steps and all(map(math.isfinite, losses))
    captions = read_conversations(shapes_world / "captions/train.json")
    assert result["stages"]["generative"]["data"]["samples"] == len(captions)  # one split caption per record
    replies = {f: sum(len(r["conversations"]) // 2 for r in read_conversations(shapes_world / f"tasks/{f}/train.json"))
               for f in FAMILIES}
    sources = result["stages"]["instruct"]["data"]["sources"]
    assert {f: sources[f]["samples"] for f in FAMILIES} == replies  # one sample per reply
    # the Q-Former read each image's instruction in training (a caption request, then the questions)
    assert connector_calls[:5] and all(call is not None for call in connector_calls[:5])

    for stage in ("01_generative", "02_instruct"):
        saved = load_file(tmp_path / stage / "model/weights.safetensors")
        assert saved and all(name.startswith("connector.") for name in saved)
    loaded = load_vlm(result["model"])
    assert isinstance(loaded.model.llm, Seq2SeqLanguageModel)
    pretrained = build_vlm(recipe.model).model
    for part in ("vision", "llm"):  # frozen: exactly the pretrained weights
        before, after = getattr(pretrained, part).state_dict(), getattr(loaded.model, part).state_dict()
        assert all(torch.equal(before[name], after[name]) for name in before), part

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for kind in ("vqa", "blind"):
        for group in ("held_in", "held_out"):
            assert metrics[kind][group] and all(0.0 <= v <= 1.0 for v in metrics[kind][group].values())
