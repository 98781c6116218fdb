"""CROME through the `vlm` recipe: the four Shapes stages on a tiny world (each trains the part of the
connector it names, the adapter-only stage saves only the adapter), the whole-bridge variant of the
last stage, and the Shapes and paper recipe files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bridgevlm.config import load_layered_yaml, to_dict
from bridgevlm.data.shapes.families import HELD_IN
from bridgevlm.models.assemble import build_vlm, load_vlm
from bridgevlm.models.blip2_stage1 import load_stage1_qformer
from bridgevlm.models.connectors.gated_adapter import adapter_parameter_count
from bridgevlm.recipes.registry import load_recipe, run_recipe_file
from bridgevlm.train.loop import seed_everything

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[2]
STEPS = 3  # the adapter's W_u starts at zero and the warm-up's first lr is 0: W_d, W_g learn from step 3
BOTTLENECK = 4
STAGES = ("01_generative", "02_pretrain", "03_instruct", "04_task")


def _tiny_recipes(directory: Path, qformer_parts: dict, world: Path) -> tuple[Path, Path]:
    """configs/shapes/crome.yaml on the tiny parts with seconds-long stages, and the whole-bridge variant
    beside it (its `extends: crome.yaml` then names the tiny one)."""
    recipe = load_layered_yaml(REPO / "configs/shapes/crome.yaml")
    model = recipe["model"]
    model.update(vision=qformer_parts["vision"], llm=qformer_parts["llm"])
    model["connector"].update(init=qformer_parts["connector"]["init"], adapter={"bottleneck": BOTTLENECK})
    recipe["world"] = str(world)
    for stage in recipe["stages"]:
        stage["train"].update(batch_size=4, max_steps=STEPS, eval_every=0, log_every=1)
        stage["data"].pop("samples_per_epoch", None)
    recipe["eval"].update(limit_per_family=1, progress_limit_per_family=1)
    (directory / "crome.yaml").write_text(yaml.safe_dump(recipe))
    shutil.copy(REPO / "configs/shapes/crome_bridge_finetune.yaml", directory / "crome_bridge_finetune.yaml")
    return directory / "crome.yaml", directory / "crome_bridge_finetune.yaml"


def _params(directory: Path) -> dict[str, torch.Tensor]:
    return dict(load_vlm(directory).model.named_parameters())


def _moved(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_the_crome_stages_train_what_they_name_and_the_last_saves_only_the_adapter(
        qformer_parts, stage1_run, shapes_world, tmp_path):
    crome, variant = _tiny_recipes(tmp_path, qformer_parts, shapes_world)
    result = run_recipe_file(crome, [], tmp_path / "run", progress=False)
    run = tmp_path / "run"
    seed_everything(0)  # as run_vlm does before building the first stage's model
    start = dict(build_vlm(load_recipe(crome)[1].model).model.named_parameters())
    generative, pretrain, instruct, task = (_params(run / f"{name}/model") for name in STAGES)
    connector = {name for name in pretrain if name.startswith("connector.")}
    adapter = {name for name in connector if name.startswith("connector.adapter.")}
    projection = {name for name in connector if name.startswith("connector.visual.language_projection.")}
    qformer = {name for name in connector if name.startswith("connector.visual.qformer.")}
    assert len(adapter) == 5 and len(projection) == 2

    # The Q-Former starts as stage 1 left it; (0) trains it and the projection, the adapter stays the identity
    stage1 = load_stage1_qformer(stage1_run / "model").state_dict()
    assert all(torch.equal(start[name], stage1[name.removeprefix("connector.visual.qformer.")]) for name in qformer)
    moved = _moved(start, generative)
    assert moved <= qformer | projection and moved & qformer and projection <= moved
    # (a) the projection and the adapter train; the Q-Former stays as (0) left it. (Captions in the plain
    # template have no user text to copy, so the text branch's gradient is zero there: only weight decay
    # moves it, but it stays in the graph, as DDP needs of every trainable parameter.)
    assert _moved(generative, pretrain) == adapter | projection
    # (b) the whole bridge trains, Q-Former included; (c) the adapter alone, everything else bit-identical
    assert any(name.startswith("connector.visual.qformer.") for name in _moved(pretrain, instruct))
    assert _moved(pretrain, instruct) <= connector
    assert _moved(instruct, task) == adapter  # instructions: the text branch trains too
    saved = load_file(run / "04_task/model/weights.safetensors")
    assert set(saved) == adapter
    assert yaml.safe_load((run / "04_task/model/vlm.yaml").read_text())["base"] == "../../03_instruct/model"

    summaries = [json.loads((run / f"{name}/summary.json").read_text()) for name in STAGES]
    sizes = [s["trainable_parameters"] for s in summaries]

    def count(names: set[str]) -> int:
        return sum(pretrain[name].numel() for name in names)

    assert sizes == [count(qformer | projection), count(adapter | projection), count(connector), count(adapter)]
    assert sizes[3] == adapter_parameter_count(32, BOTTLENECK)  # the tiny LLM is 32 wide
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["vqa"]["held_in"]["shape"] <= 1.0 and result["model"].endswith("04_task/model")

    # The comparison: stage (c) fine-tunes the whole bridge instead, from the same three stages.
    other = tmp_path / "bridge"
    other.mkdir()
    for name in STAGES[:3]:  # finished stages are skipped
        shutil.copytree(run / name, other / name)
    run_recipe_file(variant, [], other, progress=False)
    assert json.loads((other / "04_task/summary.json").read_text())["trainable_parameters"] == count(connector)
    assert set(load_file(other / "04_task/model/weights.safetensors")) == connector
    assert "base" not in yaml.safe_load((other / "04_task/model/vlm.yaml").read_text())
    assert "shape" in json.loads((other / "metrics.json").read_text())["vqa"]["held_in"]


def _trains(stage) -> tuple:
    t = stage.trainable
    return t.vision, t.connector, t.llm, t.connector_parts


def test_the_shapes_crome_recipe_and_its_whole_bridge_variant_parse():
    task, crome = load_recipe(REPO / "configs/shapes/crome.yaml", ["world=w"])
    connector = crome.model.connector
    assert task == "vlm" and connector.kind == "gated_adapter" and connector.init and connector.qformer.text_input
    assert (connector.adapter.bottleneck, connector.adapter.activation) == (32, "silu")
    assert [(s.name, s.init) for s in crome.stages] == [("generative", "base"), ("pretrain", "previous"),
                                                        ("instruct", "previous"), ("task", "previous")]
    assert [_trains(s) for s in crome.stages] == [
        ("frozen", "full", "frozen", ["visual.qformer", "visual.language_projection"]),
        ("frozen", "full", "frozen", ["visual.language_projection", "adapter"]),
        ("frozen", "full", "frozen", []),
        ("frozen", "full", "frozen", ["adapter"])]
    generative, pretrain, instruct, finetune = crome.stages
    for captions in (generative, pretrain):
        assert captions.data.path == "{world}/captions/train.json" and captions.data.template is None  # the LM's own
    assert [s.path for s in instruct.data.sources] == [f"{{world}}/tasks/{f}/train.json" for f in HELD_IN]
    assert instruct.train.batch_size == 16 and finetune.data.path == "{world}/tasks/shape/train.json"
    assert all(s.cache_vision_features for s in crome.stages) and crome.eval.rank_candidates

    task, bridge = load_recipe(REPO / "configs/shapes/crome_bridge_finetune.yaml", ["world=w"])
    assert _trains(bridge.stages[3]) == ("frozen", "full", "frozen", [])
    bridge.stages[3].trainable.connector_parts = ["adapter"]
    assert to_dict(bridge) == to_dict(crome)  # otherwise the same recipe


def test_the_crome_paper_recipe_parses():
    task, paper = load_recipe(REPO / "configs/crome/vicuna7b.yaml", ["model.connector.init=runs/s1"])
    connector = paper.model.connector
    assert task == "vlm" and connector.kind == "gated_adapter" and connector.qformer.text_input
    assert connector.init == "runs/s1" and "vicuna-7b" in paper.model.llm
    assert adapter_parameter_count(4096, connector.adapter.bottleneck) == 5_242_880  # ≈ 5M at Vicuna-7B's width
    assert [_trains(s) for s in paper.stages] == [
        ("frozen", "full", "frozen", ["visual.language_projection", "adapter"]),
        ("frozen", "full", "frozen", []),
        ("frozen", "full", "frozen", ["adapter"])]
    for stage in paper.stages:  # AdamW (0.9, 0.999), wd 0.05, 1000-step warm-up 1e-8 -> 1e-5, cosine to 0
        optim, schedule = stage.train.optim, stage.train.schedule
        assert (optim.lr, optim.weight_decay, optim.betas) == (1e-5, 0.05, (0.9, 0.999)), stage.name
        assert (schedule.kind, schedule.warmup_steps, optim.lr * schedule.warmup_start_factor,
                schedule.min_lr_ratio) == ("cosine", 1000, pytest.approx(1e-8), 0.0), stage.name
    pretrain, instruct, _ = paper.stages
    assert pretrain.data.path.endswith("blip_laion_cc_sbu_558k.json") and pretrain.data.template == "plain"
    assert (pretrain.train.batch_size * pretrain.train.grad_accum, pretrain.train.epochs) == (32, 5)
    assert instruct.train.batch_size * instruct.train.grad_accum == 16
    assert len(instruct.data.sources) == 13 and all(s.weight == 1.0 for s in instruct.data.sources)  # √-balanced
