"""The papers' controls that `bridgevlm quickstart --studies` adds to a bridge it trained: InstructBLIP's
ablation and BLIP-2's stage-1 claim, CROME's task fine-tuning of the adapter alone against the whole
bridge. Each runs a variant of the bridge's recipe and reports a table beside it."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from ..config import to_dict
from ..models.assemble import load_vlm
from ..recipes.vlm import Stage, VlmRecipe, evaluate_on_world, fill_world, run_vlm, stage_dir
from ..report import Section, markdown_table
from .bridges import BridgeRun, vlm_metrics
from .options import ABLATIONS, say


def qformer_studies(run: BridgeRun) -> str:
    """InstructBLIP's ablation and BLIP-2's stage-1 control, each against the InstructBLIP run in
    out/instructblip, as report tables. Returns the terminal summary."""
    base, base_flat = run.trained["InstructBLIP"]["recipe"], run.trained["InstructBLIP"]["flat"]
    runs = {"instruction tuning": base_flat}
    for name in ABLATIONS:
        recipe = run.recipe(name)
        recipe.model.connector.init = base.model.connector.init
        _reuse_shared_stages(recipe, base, run.out / "instructblip")
        runs[name.replace("_", " ")] = _run_study(run, run.out / f"ablation_{name}", recipe, name)["flat"]
    skipped = copy.deepcopy(base)
    skipped.model.connector.init_weights = False  # the same Q-Former, its stage-1 weights left out
    no_stage1 = _run_study(run, run.out / "instructblip_no_stage1", skipped, "instructblip_no_stage1")["flat"]

    held_out = sorted(k for k in base_flat if k.startswith("held_out."))
    ablation_rows = [[label, *(flat[k] for k in held_out), flat["held_out_mean"], flat["held_in_mean"]]
                     for label, flat in runs.items()]
    stage1_rows = [[label, flat["held_in_mean"], flat["held_out_mean"]]
                   for label, flat in (("from BLIP-2 stage 1", base_flat), ("stage 1 skipped", no_stage1))]
    run.report.add_section(Section("InstructBLIP studies", (
        "The ablation: the same held-in datasets and mixture trained as instructions (varied templates), "
        "as plain questions (one fixed phrasing), or as plain questions behind a `[Task:Dataset]` tag; all "
        "evaluated with instructions on the held-out families. And BLIP-2's claim that stage 1 matters: the "
        "same recipe from a Q-Former with stage 1's architecture and tokenizer but fresh weights."), [
        markdown_table(["training", *(k.split(".", 1)[1] for k in held_out), "held-out mean", "held-in mean"],
                       ablation_rows),
        markdown_table(["InstructBLIP Q-Former", "held-in mean", "held-out mean"], stage1_rows)]))
    return "\n".join(["Ablation held-out mean: " + "   ".join(f"{label} {flat['held_out_mean']:.3f}"
                                                                for label, flat in runs.items()),
                      f"Stage 1 skipped: held-in {no_stage1['held_in_mean']:.3f}, held-out "
                      f"{no_stage1['held_out_mean']:.3f} (from stage 1: {base_flat['held_in_mean']:.3f}, "
                      f"{base_flat['held_out_mean']:.3f})"])


def crome_study(run: BridgeRun) -> str:
    """CROME's claim for its last stage: fine-tuning the adapter alone on a task, against fine-tuning the
    whole bridge on the same data from the same instruction-tuned model, and against not fine-tuning at
    all. A report table of the task's family, the means and the parameters each trains."""
    base_result = run.trained["CROME"]
    base = base_result["recipe"]
    variant = run.recipe("crome_bridge_finetune")
    variant.model.connector.init = base.model.connector.init
    _reuse_shared_stages(variant, base, run.out / "crome")
    whole = _run_study(run, run.out / "crome_bridge_finetune", variant, "crome_bridge_finetune")

    # the instruction-tuned model both fine-tunings start from, evaluated as the runs are
    step_start = time.time()
    instructed = stage_dir(run.out / "crome", len(base.stages) - 2, base.stages[-2]) / "model"
    before = vlm_metrics(evaluate_on_world(load_vlm(instructed), fill_world(base).eval, blind_baseline=False))
    run.report.add_timing("crome_instructed (evaluate)", time.time() - step_start)
    run.report.add_metrics("crome_instructed", before)

    family = _task_family(fill_world(base).stages[-1], run.world_dir)
    column = [f"held_in.{family}"] if family else []
    rows = [[label, trains, f"{parameters:,}", *(flat[k] for k in column), flat["held_in_mean"], flat["held_out_mean"]]
            for label, trains, parameters, flat in (
                ("instruction-tuned, no task fine-tuning", "nothing", 0, before),
                ("task fine-tuning: the adapter alone", "adapter", _last_stage(base_result)["trainable_parameters"],
                 base_result["flat"]),
                ("task fine-tuning: the whole bridge", "Q-Former, projection, adapter",
                 _last_stage(whole)["trainable_parameters"], whole["flat"]))]
    run.report.add_section(Section("CROME task fine-tuning", (
        f"Stage (c) fine-tunes on one family's data ({family or 'see the recipe'}), starting from the same "
        "instruction-tuned model: CROME trains the gated adapter alone, the control the whole bridge. Test "
        "scenes, held-in and held-out means over every family."), [
        markdown_table(["CROME", "trains", "trainable parameters", *([family] if family else []),
                        "held-in mean", "held-out mean"], rows)]))
    return (f"CROME task fine-tuning on {family or 'its family'}: "
            + "   ".join(f"{label} {flat[column[0]] if column else flat['held_in_mean']:.3f}"
                         for label, flat in (("none", before), ("adapter", base_result["flat"]),
                                             ("whole bridge", whole["flat"]))))


def _task_family(stage: Stage, world_dir: Path) -> str | None:
    """The held-in family whose training file a stage reads (tasks/<family>/train.json), if it is one."""
    families = json.loads((world_dir / "world.json").read_text())["held_in"]
    name = Path(stage.data.path).parent.name if stage.data.path else ""
    return name if name in families else None


def _last_stage(result: dict) -> dict:
    return list(result["stages"].values())[-1]


def _run_study(run: BridgeRun, run_dir: Path, recipe: VlmRecipe, name: str) -> dict:
    say(run.options, f"Study {name}: {len(recipe.stages)} stage(s) ({', '.join(s.name for s in recipe.stages)})")
    step_start = time.time()
    result = run_vlm(recipe, run_dir, progress=run.options.progress)
    run.report.add_timing(f"{name} (train + evaluate)", time.time() - step_start)
    result["flat"] = vlm_metrics(result["metrics"])
    run.report.add_metrics(name, result["flat"])
    return result


def _reuse_shared_stages(recipe: VlmRecipe, base: VlmRecipe, base_run: Path) -> None:
    """Drop the leading stages `recipe` shares with `base` (same model, identical stage configs) and start
    the first remaining one from the model `base_run` trained there: a variant that differs only in its
    last stage trains only that."""
    if to_dict(recipe.model) != to_dict(base.model):
        return
    shared = 0
    while (shared < min(len(recipe.stages), len(base.stages)) - 1
           and to_dict(recipe.stages[shared]) == to_dict(base.stages[shared])):
        shared += 1
    if shared:
        recipe.stages = recipe.stages[shared:]
        recipe.stages[0].init = str(stage_dir(base_run, shared - 1, base.stages[shared - 1]) / "model")


# the bridge (a --bridge name) each study follows
STUDIES = {"qformer": qformer_studies, "crome": crome_study}
