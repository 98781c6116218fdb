"""BLIP-2 stage 2 and InstructBLIP through the `vlm` recipe on a tiny world: start from a stage-1 run,
train only the connector, feed instructions in training and evaluation; the recipe files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bridgevlm.config import from_dict, to_dict
from bridgevlm.data.shapes.families import HELD_IN
from bridgevlm.data.formats import read_conversations
from bridgevlm.data.instructions import without_image_tags
from bridgevlm.models.assemble import build_vlm, load_vlm
from bridgevlm.models.blip2_stage1 import load_stage1_qformer
from bridgevlm.recipes.registry import load_recipe
from bridgevlm.recipes.vlm import VlmRecipe, run_vlm

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _recipe(qformer_parts, world, text_input: bool, data: dict, evaluate: bool = False) -> VlmRecipe:
    """One stage that trains only the connector, whose Q-Former starts from the stage-1 run."""
    return from_dict(VlmRecipe, {
        "model": {**qformer_parts, "connector": {**qformer_parts["connector"], "qformer": {"text_input": text_input}}},
        "stages": [{"name": "bridge", "init": "base",
                    "trainable": {"vision": "frozen", "connector": "full", "llm": "frozen"},
                    "data": {"image_folder": str(world / "images"), "max_length": 256, **data},
                    "train": {"batch_size": 4, "max_steps": STEPS, "log_every": 1, "optim": {"lr": 1e-2}}}],
        "eval": {"world": str(world) if evaluate else "", "limit_per_family": 1},
    })


def test_stage2_trains_only_the_connector_from_the_stage1_qformer(qformer_parts, shapes_world, stage1_run, tmp_path,
                                                                   connector_calls):
    recipe = _recipe(qformer_parts, shapes_world, text_input=False,
                     data={"path": str(shapes_world / "captions/train.json"), "template": "plain"})
    result = run_vlm(recipe, tmp_path, progress=False)
    assert len(connector_calls) == STEPS and connector_calls == [None] * STEPS  # BLIP-2: the image alone
    saved = load_file(tmp_path / "01_bridge/model/weights.safetensors")
    assert saved and all(name.startswith("connector.") for name in saved)
    assert not (tmp_path / "01_bridge/model/qformer_tokenizer").exists()
    trained = load_vlm(result["model"]).model
    pretrained = build_vlm(recipe.model).model
    for part in ("vision", "llm"):  # frozen: exactly the pretrained weights
        before, after = getattr(pretrained, part).state_dict(), getattr(trained, part).state_dict()
        assert all(torch.equal(before[name], after[name]) for name in before), part
    stage1 = load_stage1_qformer(stage1_run / "model").state_dict()
    qformer = trained.connector.qformer.state_dict()
    moved = [name for name, tensor in qformer.items() if not torch.equal(tensor, stage1[name])]
    assert "query_tokens" in moved and len(moved) > len(qformer) // 2  # the Q-Former trains from its stage-1 start


def test_an_instructblip_stage_feeds_each_images_instruction_to_training_and_evaluation(
        qformer_parts, shapes_world, tmp_path, connector_calls):
    recipe = _recipe(qformer_parts, shapes_world, text_input=True,
                     data={"path": str(shapes_world / "instruct/train.json")}, evaluate=True)
    result = run_vlm(recipe, tmp_path, progress=False)
    loaded = load_vlm(result["model"])
    assert (tmp_path / "01_bridge/model/qformer_tokenizer").is_dir() and loaded.instruction_tokenizer() is not None
    texts = connector_calls.texts(loaded.qformer_tokenizer)
    assert all(call is not None for call in texts)
    # training: each image's instruction is the first user turn of its conversation, without the tag
    first_turns = {without_image_tags(r["conversations"][0]["value"])
                   for r in read_conversations(shapes_world / "instruct/train.json")}
    trained = [text for call in texts[:STEPS] for text in call]
    assert len(trained) == STEPS * 4 and set(trained) <= first_turns
    # evaluation: the question asked, family by family
    families = json.loads((shapes_world / "world.json").read_text())["families"]
    questions = [item["question"] for family in families
                 for item in json.loads((shapes_world / f"eval/test/{family}.json").read_text())[:1]]
    evaluated = [text for call in texts[STEPS:] for text in call]
    assert sorted(evaluated) == sorted(questions)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["vqa"]["held_in_mean"] <= 1.0 and 0.0 <= metrics["vqa"]["held_out_mean"] <= 1.0


def test_the_shapes_and_paper_recipes_parse():
    task, blip2 = load_recipe(REPO / "configs/shapes/blip2.yaml", ["world=w", "model.connector.init=runs/s1"])
    connector = blip2.model.connector
    assert task == "vlm" and connector.kind == "qformer" and connector.init == "runs/s1"
    assert not connector.qformer.text_input and blip2.model.vision.select == "full"
    assert [(s.init, s.trainable.vision, s.trainable.connector, s.trainable.llm) for s in blip2.stages] == [
        ("base", "frozen", "full", "frozen")]
    assert blip2.stages[0].data.template == "plain" and blip2.stages[0].data.path == "{world}/captions/train.json"

    task, instruct = load_recipe(REPO / "configs/shapes/instructblip.yaml", ["world=w"])
    assert task == "vlm" and instruct.model.connector.qformer.text_input and instruct.model.connector.init
    assert [s.init for s in instruct.stages] == ["base", "previous"]
    assert all((s.trainable.vision, s.trainable.connector, s.trainable.llm) == ("frozen", "full", "frozen")
               for s in instruct.stages)
    sources = instruct.stages[1].data.sources
    assert [s.path for s in sources] == [f"{{world}}/tasks/{f}/train.json" for f in HELD_IN] and instruct.world == "w"
    assert instruct.eval.rank_candidates and not any(s.prefix for s in sources)
    # the ablation's multitask baselines differ from instruction tuning in their instruct data only
    for variant, prefixed in (("multitask_plain", False), ("multitask_prefix", True)):
        task, baseline = load_recipe(REPO / f"configs/shapes/instructblip_ablation/{variant}.yaml", ["world=w"])
        data = baseline.stages[1].data
        assert [s.path for s in data.sources] == [f"{{world}}/tasks_plain/{f}/train.json" for f in HELD_IN]
        assert [s.prefix for s in data.sources] == [f"[{f}:Shapes]" if prefixed else "" for f in HELD_IN]
        data.sources = sources
        assert to_dict(baseline) == to_dict(instruct)

    task, paper = load_recipe(REPO / "configs/blip2/stage2_opt.yaml")
    stage = paper.stages[0]
    assert task == "vlm" and paper.model.connector.init and not paper.model.connector.qformer.text_input
    assert (stage.trainable.vision, stage.trainable.connector, stage.trainable.llm) == ("frozen", "full", "frozen")
    optim, schedule = stage.train.optim, stage.train.schedule
    assert (optim.lr, optim.weight_decay, optim.betas) == (1e-4, 0.05, (0.9, 0.98))
    assert (schedule.kind, schedule.warmup_steps, stage.train.max_steps) == ("cosine", 2000, 80_000)
    assert stage.train.precision == "bf16" and paper.model.vision.feature_layer == -2
    generation = paper.eval.generation  # zero-shot VQA: "Question: {} Answer:", 5 beams, short answers favoured
    assert paper.eval.template == "blip2_vqa" and (generation.num_beams, generation.length_penalty) == (5, -1.0)


def test_the_instructblip_and_flant5_paper_recipes_parse():
    task, vicuna = load_recipe(REPO / "configs/instructblip/vicuna7b.yaml", ["model.connector.init=runs/s1"])
    stage = vicuna.stages[0]
    assert task == "vlm" and vicuna.model.connector.qformer.text_input and vicuna.model.template == "blip2_instruction"
    assert (stage.trainable.vision, stage.trainable.connector, stage.trainable.llm) == ("frozen", "full", "frozen")
    assert len(stage.data.sources) == 13 and len({s.name for s in stage.data.sources}) == 13  # the held-in datasets
    optim, schedule = stage.train.optim, stage.train.schedule
    assert (optim.lr, optim.weight_decay, stage.train.max_steps) == (1e-5, 0.05, 60_000)
    # 1000-step linear warm-up from 1e-8 to 1e-5, then cosine to 0
    assert (schedule.kind, schedule.warmup_steps, optim.lr * schedule.warmup_start_factor, schedule.min_lr_ratio) == (
        "cosine", 1000, pytest.approx(1e-8), 0.0)
    assert vicuna.eval.rank_candidates and vicuna.eval.template == "blip2_vqa_short"
    assert vicuna.eval.generation.num_beams == 5

    task, flant5 = load_recipe(REPO / "configs/instructblip/flant5xl.yaml")
    assert flant5.model.llm == "google/flan-t5-xl"
    assert flant5.stages[0].train.batch_size * flant5.stages[0].train.grad_accum == 192  # the paper's batch for 3B
    flant5.model.llm, flant5.stages[0].train = vicuna.model.llm, stage.train
    flant5.model.connector.init = vicuna.model.connector.init
    assert to_dict(flant5) == to_dict(vicuna)  # otherwise the same recipe

    task, blip2_t5 = load_recipe(REPO / "configs/blip2/stage2_flant5.yaml")
    _, blip2_opt = load_recipe(REPO / "configs/blip2/stage2_opt.yaml")
    assert blip2_t5.model.llm == "google/flan-t5-xl" and blip2_t5.eval.template == "blip2_vqa_short"
    blip2_t5.model.llm, blip2_t5.eval.template = blip2_opt.model.llm, blip2_opt.eval.template
    assert to_dict(blip2_t5) == to_dict(blip2_opt)
