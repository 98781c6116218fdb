"""`bridgevlm quickstart`: the whole pipeline on the embedded default, on a CPU, in minutes.

World -> backbones (shipped, or made from scratch) -> evaluation -> the bridges (bridges.py), with the
papers' controls on request (studies.py) -> one report, to which each step adds its sections.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import ConfigError, from_dict, to_dict
from ..data.shapes.world import WorldConfig, build_world, load_world_description
from ..recipes.backbones import BackboneRecipe, evaluate_backbones, load_manifest, make_backbones
from ..recipes.registry import load_recipe
from ..report import Report, Section, markdown_table, plot_curves
from .bridges import RUNNERS, BridgeRun, comparison_section, load_stage1_recipe, load_vlm_recipe, try_it, vlm_metrics
from .options import ABLATIONS, BRIDGES, DEFAULT_RECIPE, RECIPES, QuickstartOptions, say
from .studies import STUDIES

__all__ = ["ABLATIONS", "BRIDGES", "DEFAULT_RECIPE", "RECIPES", "QuickstartOptions", "load_backbone_recipe",
           "load_stage1_recipe", "load_vlm_recipe", "run_quickstart", "vlm_metrics"]


def run_quickstart(options: QuickstartOptions) -> dict:
    out = Path(options.out)
    report = Report(out, "bridgevlm quickstart")
    started = time.time()

    # 1. The backbones to use: the shipped ones, or a fresh set made by the same recipe.
    if options.from_scratch:
        recipe = load_backbone_recipe(options.recipe, options.budget)
        step_start = time.time()
        say(options, f"Making the backbones from scratch (recipe {options.recipe}); this takes a while.")
        manifest = make_backbones(recipe, out / "backbones", world_dir=out / "world", progress=options.progress,
                                  command=f"bridgevlm quickstart --from-scratch --budget {options.budget}")
        backbones = out / "backbones"
        report.add_timing("backbones (from scratch)", time.time() - step_start)
    else:
        backbones = Path(options.backbones)
        manifest = load_manifest(backbones)

    # 2. The world: the one the backbones were made on, so its test scenes were never trained on.
    step_start = time.time()
    world_dir = out / "world"
    world_cfg = from_dict(WorldConfig, manifest["world"], "manifest.json")
    if (world_dir / "world.json").is_file():
        existing = load_world_description(world_dir)["config"]
        if existing != to_dict(world_cfg):
            raise ConfigError(f"{world_dir} holds a world made with {existing}, but the backbones were made on "
                              f"{to_dict(world_cfg)}; use a new --out directory")
    else:
        say(options, f"Generating the Shapes world in {world_dir}")
        build_world(world_dir, world_cfg, progress=options.progress)
    report.add_timing("world", time.time() - step_start)
    report.set("world", json.loads((world_dir / "world.json").read_text())["splits"])

    # 3. Evaluate the backbones on the test scenes.
    step_start = time.time()
    say(options, "Evaluating the backbones on test scenes: CLIP zero-shot and retrieval, LM text questions")
    metrics = evaluate_backbones(backbones, world_dir, "test", manifest.get("lm_template", "vicuna_v1_nosys"))
    clip_metrics, lm_metrics = metrics["clip"], metrics["lm"]
    report.add_metrics("clip", clip_metrics)
    report.add_metrics("lm", lm_metrics)
    report.add_timing("evaluate backbones", time.time() - step_start)

    backbone_sections(report, out, backbones, manifest, clip_metrics, lm_metrics)
    report.write()  # the backbone half is on disk even if a later stage fails

    # 4. The bridges, each through its own recipes; the report gains a section per bridge (and per study),
    #    then a table that sets them side by side.
    run = BridgeRun(options, report, out, backbones, world_dir)
    lines = summary(clip_metrics, lm_metrics)
    for bridge in options.bridges:
        lines += "\n" + RUNNERS[bridge](run)
        if options.studies and bridge in STUDIES:
            lines += "\n" + STUDIES[bridge](run)
        report.write()
    if len(run.trained) > 1:
        comparison_section(run)
    if run.trained:
        lines += try_it(next(iter(run.trained.values()))["model"], world_dir)
    report.add_timing("total", time.time() - started)
    json_path, md_path = report.write()
    say(options, "\n" + lines + f"\n\nReport: {md_path}\n        {json_path}")
    return report.data


def load_backbone_recipe(path: Path, budget: float) -> BackboneRecipe:
    """The backbone recipe with every stage's steps multiplied by `budget`."""
    task, recipe = load_recipe(path)
    if task != "backbones":
        raise ConfigError(f"{path}: --from-scratch needs a recipe with task: backbones, got task: {task}")
    for sub in (recipe.clip, recipe.lm):
        sub.train.max_steps = max(1, round(sub.train.max_steps * budget))
    return recipe


def summary(clip: dict, lm: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"CLIP  zero-shot accuracy {clip.get('zeroshot_accuracy', float('nan')):.3f}   "
             f"image->text R@1 {clip['recall_at_1']:.3f}",
             f"LM    text QA accuracy {lm['text_qa_accuracy']:.3f}   answer perplexity {lm['perplexity']:.3f}"]
    families = sorted(k.split(".", 1)[1] for k in lm if k.startswith("text_qa."))
    lines.append("      " + "  ".join(f"{family} {lm['text_qa.' + family]:.2f}" for family in families))
    return "\n".join(lines)


def backbone_sections(report: Report, out: Path, backbones: Path, manifest: dict, clip: dict, lm: dict) -> None:
    families = sorted(k.split(".", 1)[1] for k in lm if k.startswith("text_qa."))
    clip_rows = [[name, clip.get(key, "n/a")] for name, key in (
        ("zero-shot accuracy (colour+shape)", "zeroshot_accuracy"), ("  colour", "zeroshot_colour_accuracy"),
        ("  shape", "zeroshot_shape_accuracy"), ("image->text Recall@1", "recall_at_1"),
        ("image->text Recall@5", "recall_at_5"), ("text->image Recall@1", "text_recall_at_1"))]
    lm_rows = [[family, lm[f"text_qa.{family}"]] for family in families]
    lm_rows += [["**mean**", lm["text_qa_accuracy"]], ["answer perplexity", lm["perplexity"]]]
    figures = []
    history_path = backbones / "history.json"
    if history_path.is_file():
        history = json.loads(history_path.read_text())
        for name in history:  # clip (and clip_finetune when the recipe has it), lm
            points = [h for h in history[name] if "loss" in h]
            if points:
                figure = plot_curves(out / "figures" / f"{name}_loss.png",
                                     {name: ([p["step"] for p in points], [p["loss"] for p in points])},
                                     "step", "training loss", f"{name} pretraining loss", log_y=True)
                figures.append(str(figure.relative_to(out)))
    text = (f"Backbones from `{backbones}`, made by `{manifest.get('command', '?')}` "
            f"(seeds {manifest.get('seed')}, training time {manifest.get('train_seconds')} s).")
    report.add_section(Section("Backbones", text, [
        markdown_table(["CLIP metric (test scenes)", "value"], clip_rows),
        markdown_table(["LM text QA family (test scenes)", "accuracy"], lm_rows),
    ], figures))
