"""Parameter reports: the meta-device model counts what the real one holds, each stage's trainable count
is what `apply_trainability` leaves trainable, architectures resolve offline (local directory, then the
table of public configs), a missing stage-1 run falls back as documented, and `bridgevlm params`
prints tables and JSON."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from bridgevlm.cli import main
from bridgevlm.config import from_dict
from bridgevlm.eval.param_report import (count_parameters, module_part_names, report_recipe, stage1_source,
                                         vlm_part_names, vlm_report)
from bridgevlm.models.assemble import VlmConfig, build_vlm
from bridgevlm.models.blip2_stage1 import load_stage1_pretrainer
from bridgevlm.models.connectors import QFormer, QFormerConfig
from bridgevlm.models.connectors.gated_adapter import adapter_parameter_count
from bridgevlm.models.meta_build import UnknownArchitectureError, build_vlm_meta
from bridgevlm.recipes.vlm import VlmRecipe
from bridgevlm.train.trainability import apply_trainability

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[2]
VICUNA_7B = 6_738_415_616  # LlamaForCausalLM at lmsys/vicuna-7b's public config
XATTN = {"num_latents": 4, "resampler_layers": 1, "resampler_heads": 2, "resampler_head_dim": 8, "every": 1,
         "heads": 2, "head_dim": 8, "ff_mult": 2}
CONNECTORS = {
    "mlp": {"kind": "mlp2x_gelu"},
    "partial_lora": {"kind": "partial_lora", "partial_lora": {"rank": 4}},
    "gated_xattn": {"kind": "gated_xattn", "gated_xattn": XATTN},
}


@pytest.fixture(scope="module")
def t5_own_head(t5_parts, tmp_path_factory) -> dict:
    """`t5_parts` whose checkpoint stores an output head of its own, as FlanT5's does (loaded untied)."""
    out = tmp_path_factory.mktemp("t5_own_head") / "llm"
    shutil.copytree(t5_parts["llm"], out)
    state = load_file(out / "model.safetensors")
    state["lm_head.weight"] = torch.randn(state["shared.weight"].shape)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return {**t5_parts, "llm": str(out)}


def _parts(name: str, vlm_parts: dict, qformer_parts: dict, t5_parts: dict | None = None) -> dict:
    if name in CONNECTORS:
        return {**vlm_parts, "connector": CONNECTORS[name]}
    if name.startswith("t5"):
        return {**t5_parts, "connector": {"kind": "linear"}}
    kind = "qformer" if name.startswith("qformer") else "gated_adapter"
    return {**qformer_parts, "connector": {**qformer_parts["connector"], "kind": kind,
                                           "qformer": {"text_input": name != "qformer_images"},
                                           "adapter": {"bottleneck": 4}}}


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


@pytest.mark.parametrize("name", ["mlp", "qformer", "qformer_images", "gated_adapter", "partial_lora", "gated_xattn",
                                  "t5", "t5_own_head"])
def test_the_meta_model_holds_exactly_the_parameters_of_the_real_one(name, vlm_parts, qformer_parts, request):
    t5 = request.getfixturevalue("t5_own_head" if name == "t5_own_head" else "t5_parts")
    cfg = from_dict(VlmConfig, _parts(name, vlm_parts, qformer_parts, t5))
    real = build_vlm(cfg).model
    if name.startswith("t5"):
        hf = real.llm.model
        assert (hf.lm_head.weight is hf.shared.weight) == (name == "t5")
    meta = build_vlm_meta(cfg).model
    assert all(param.is_meta for param in meta.parameters())
    assert _shapes(meta) == _shapes(real)
    assert count_parameters(meta, vlm_part_names(meta)) == count_parameters(real, vlm_part_names(real))


STAGES = [
    {"name": "bridge", "init": "base", "trainable": {"connector": "full"}},
    {"name": "lora", "trainable": {"vision": "lora", "connector": "full", "llm": "lora"}, "lora": {"rank": 4}},
    {"name": "llm", "trainable": {"connector": "frozen", "llm": "full"}},
    {"name": "fresh", "init": "base", "trainable": {"connector": "full", "llm": "lora"}, "lora": {"rank": 2}},
]
CROME_STAGES = [
    {"name": "pretrain", "init": "base",
     "trainable": {"connector": "full", "connector_parts": ["visual.language_projection", "adapter"]}},
    {"name": "instruct", "trainable": {"connector": "full", "llm": "lora"}, "lora": {"rank": 4}},
    {"name": "task", "trainable": {"connector": "full", "connector_parts": ["adapter"]}},
]


@pytest.mark.parametrize("name,stages", [("mlp", STAGES), ("gated_adapter", CROME_STAGES)])
def test_each_stage_counts_what_apply_trainability_leaves_trainable_on_the_real_model(
        name, stages, vlm_parts, qformer_parts):
    recipe = from_dict(VlmRecipe, {"model": _parts(name, vlm_parts, qformer_parts), "stages": stages})
    counted, _ = vlm_report(recipe)
    real = None
    for stage, count in zip(recipe.stages, counted):
        if stage.init == "base" or real is None:  # as run_vlm starts a stage
            real = build_vlm(recipe.model).model
        apply_trainability(real, stage.trainable, stage.lora)
        assert count.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad), stage.name
        assert count.total == sum(p.numel() for p in real.parameters())
        assert count.parts == count_parameters(real, vlm_part_names(real))
    parts = {p.part: p for p in counted[1].parts}
    assert parts["llm LoRA"].trainable == parts["llm LoRA"].total > 0
    if name == "mlp":
        assert parts["vision LoRA"].trainable > 0
        assert "llm LoRA" in {p.part for p in counted[2].parts}  # kept from the stage before, now frozen
        assert {p.part: p.trainable for p in counted[2].parts}["llm LoRA"] == 0
        assert "vision LoRA" not in {p.part for p in counted[3].parts}  # a fresh model: the adapters are gone
    else:
        task = {p.part: p for p in counted[2].parts}
        assert counted[2].trainable == task["connector.adapter"].total == adapter_parameter_count(32, 4)


def _stage1_recipe_file(stage1_run: Path, directory: Path) -> Path:
    """The recipe `stage1_run` was made with, as a file."""
    recipe = yaml.safe_load((stage1_run / "config.yaml").read_text())
    path = directory / "stage1.yaml"
    path.write_text(yaml.safe_dump({"task": "blip2_stage1", **recipe}))
    return path


def test_a_missing_stage1_run_takes_the_sizes_of_a_stage1_recipe_or_else_the_recipes_qformer(
        qformer_parts, stage1_run, tmp_path):
    stages = [{"name": "instruct", "init": "base"}]
    found = from_dict(VlmRecipe, {"model": _parts("qformer", {}, qformer_parts), "stages": stages})
    missing = from_dict(VlmRecipe, {"model": _parts("qformer", {}, qformer_parts), "stages": stages})
    missing.model.connector.init = str(tmp_path / "no_stage1_run")
    (expected,), notes = vlm_report(found)
    assert notes == []
    # The recipe that made the run stands in for it exactly.
    (from_recipe,), notes = vlm_report(missing, stage1_source(_stage1_recipe_file(stage1_run, tmp_path)))
    assert from_recipe.parts == expected.parts
    assert "no_stage1_run is not here" in notes[0] and "stage1.yaml" in notes[0]
    # Without one: the recipe's connector.qformer, BLIP-2's BERT-base sizes by default.
    (fallback,), notes = vlm_report(missing)
    assert "no_stage1_run is not here" in notes[0] and "12 layers of 768, 32 queries" in notes[0]
    with torch.device("meta"):
        bert_base = QFormer(QFormerConfig(vision_width=32))
    parts = {p.part: p.total for p in fallback.parts}
    assert parts["connector.qformer"] == sum(p.numel() for p in bert_base.parameters())


def test_a_stage1_recipe_counts_the_qformer_and_heads_its_run_trains(stage1_run, tmp_path):
    task_report = report_recipe(_stage1_recipe_file(stage1_run, tmp_path))
    (stage,) = task_report.stages
    real = load_stage1_pretrainer(stage1_run / "model")  # saved without its (frozen, referenced) tower
    parts = [p for p in stage.parts if p.part != "vision"]
    assert parts == count_parameters(real, module_part_names(real))
    vision = next(p for p in stage.parts if p.part == "vision")
    assert vision.trainable == 0 and stage.trainable == sum(p.total for p in parts)


def test_paper_recipes_count_offline_from_the_table_of_public_configs():
    crome = report_recipe(REPO / "configs/crome/vicuna7b.yaml")
    assert any("lmsys/vicuna-7b-v1.1: architecture from bridgevlm's table" in note for note in crome.notes)
    task = crome.stages[-1]
    parts = {p.part: p for p in task.parts}
    assert task.trainable == parts["connector.adapter"].total == adapter_parameter_count(4096, 256) == 5_242_880
    assert parts["llm"].total == VICUNA_7B and parts["llm"].trainable == 0
    lora = report_recipe(REPO / "configs/llava15/stage2_lora.yaml").stages[-1]
    parts = {p.part: p for p in lora.parts}
    # rank 128 on q, k, v, o (4096 -> 4096), gate, up (4096 -> 11008) and down (11008 -> 4096), 32 layers
    assert parts["llm LoRA"].trainable == 32 * 128 * (8 * 4096 + 3 * (4096 + 11008))
    assert parts["connector.layers"].trainable == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    # FlanT5-XL's checkpoint keeps its own output head (32128 x 2048) apart from the input embeddings
    flant5 = report_recipe(REPO / "configs/blip2/stage2_flant5.yaml")
    assert {p.part: p.total for p in flant5.stages[0].parts}["llm"] == 2_849_757_184


def test_a_local_directory_wins_over_the_table(vlm_parts, tmp_path, monkeypatch):
    shutil.copytree(vlm_parts["llm"], tmp_path / "lmsys" / "vicuna-7b-v1.1")
    monkeypatch.chdir(tmp_path)
    report = report_recipe(REPO / "configs/instructblip/vicuna7b.yaml")
    parts = {p.part: p.total for p in report.stages[0].parts}
    tiny = build_vlm(from_dict(VlmConfig, vlm_parts)).model
    assert parts["llm"] == sum(p.numel() for p in tiny.llm.parameters())
    assert not any(note.startswith("lmsys/") for note in report.notes)
    assert any(note.startswith("openai/clip-vit-large-patch14:") for note in report.notes)


def test_an_unknown_hub_id_is_an_error_naming_it(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(UnknownArchitectureError, match=r"model\.llm: 'nobody/no-such-lm-7b' is not a local directory"):
        report_recipe("configs/shapes/llava.yaml", ["model.llm=nobody/no-such-lm-7b"])
    assert main(["params", "configs/shapes/llava.yaml", "model.vision.path=nobody/no-such-vit"]) == 2
    error = capsys.readouterr().err
    assert "model.vision.path: 'nobody/no-such-vit'" in error and "openai/clip-vit-large-patch14" in error


def test_cli_prints_a_table_per_recipe_and_json(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["params", "configs/shapes/llava.yaml", "configs/shapes/crome.yaml",
                 "--stage1", "configs/shapes/blip2_stage1.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.count("trainable %") == 2
    assert "configs/shapes/crome.yaml (vlm:" in out
    for line in ("connector.adapter", "20,480", "pretrain trains", "the stage-1 recipe configs/shapes/blip2_stage1.yaml"):
        assert line in out, line
    # --json, with an override after the options
    assert main(["params", "configs/shapes/llava.yaml", "--json", "model.connector.kind=linear"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert [stage["name"] for stage in report["stages"]] == ["align", "instruct"]
    align = report["stages"][0]
    assert align["parts"][1] == {"part": "connector.layers", "trainable": 128 * 128 + 128, "total": 128 * 128 + 128}
    assert align["trainable"] == 128 * 128 + 128
    assert align["trainable_percent"] == pytest.approx(100 * align["trainable"] / align["total"])


def test_params_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["params", "--help"])
    text = capsys.readouterr().out
    assert "--json" in text and "--stage1" in text and "bridgevlm params configs/" in text
