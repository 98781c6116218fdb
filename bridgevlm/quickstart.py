"""`bridgevlm quickstart`: the whole pipeline on the embedded default, on a CPU, in minutes.

World -> backbones (shipped, or made from scratch) -> evaluation -> report. Later stages add their
own sections to the same report.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, from_dict, to_dict
from .data.shapes.world import WorldConfig, build_world, load_world_description
from .recipes.backbones import SHIPPED, BackboneRecipe, evaluate_backbones, load_manifest, make_backbones
from .recipes.registry import load_recipe
from .recipes.vlm import VlmRecipe, run_vlm
from .report import Report, Section, markdown_table, plot_curves

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# The repository's recipe; an installed package falls back to the copy saved with the shipped backbones.
DEFAULT_RECIPE = CONFIGS / "shapes" / "backbones.yaml"
if not DEFAULT_RECIPE.is_file():
    DEFAULT_RECIPE = SHIPPED / "recipe.yaml"
LLAVA_RECIPE = CONFIGS / "shapes" / "llava.yaml"


@dataclass
class QuickstartOptions:
    out: Path
    from_scratch: bool = False
    budget: float = 1.0  # scales training steps of every stage that trains
    backbones: Path = SHIPPED
    recipe: Path = DEFAULT_RECIPE
    llava_recipe: Path = LLAVA_RECIPE
    llava: bool = True  # run the LLaVA stages after the backbones
    progress: bool = True


def run_quickstart(options: QuickstartOptions) -> dict:
    out = Path(options.out)
    report = Report(out, "bridgevlm quickstart")
    started = time.time()

    # 1. The backbones to use: the shipped ones, or a fresh set made by the same recipe.
    if options.from_scratch:
        recipe = load_backbone_recipe(options.recipe, options.budget)
        step_start = time.time()
        _say(options, f"Making the backbones from scratch (recipe {options.recipe}); this takes a while.")
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
        _say(options, f"Generating the Shapes world in {world_dir}")
        build_world(world_dir, world_cfg, progress=options.progress)
    report.add_timing("world", time.time() - step_start)
    report.set("world", json.loads((world_dir / "world.json").read_text())["splits"])

    # 3. Evaluate the backbones on the test scenes.
    step_start = time.time()
    _say(options, "Evaluating the backbones on test scenes: CLIP zero-shot and retrieval, LM text questions")
    metrics = evaluate_backbones(backbones, world_dir, "test", manifest.get("lm_template", "vicuna_v1_nosys"))
    clip_metrics, lm_metrics = metrics["clip"], metrics["lm"]
    report.add_metrics("clip", clip_metrics)
    report.add_metrics("lm", lm_metrics)
    report.add_timing("evaluate backbones", time.time() - step_start)

    _backbone_sections(report, out, backbones, manifest, clip_metrics, lm_metrics)
    report.write()  # the backbone half is on disk even if a later stage fails

    # 4. LLaVA: align the connector on captions, then instruction-tune on the held-in families.
    lines = summary(clip_metrics, lm_metrics)
    if options.llava:
        recipe = load_llava_recipe(options.llava_recipe, backbones, world_dir, options.budget)
        _say(options, f"LLaVA on the shipped backbones: {len(recipe.stages)} stages "
                      f"({', '.join(s.name for s in recipe.stages)}) from {options.llava_recipe}")
        step_start = time.time()
        result = run_vlm(recipe, out / "llava", progress=options.progress)
        report.add_timing("llava (train + evaluate)", time.time() - step_start)
        llava = llava_metrics(result["metrics"])
        report.add_metrics("llava", llava)
        _llava_section(report, out, result, llava)
        lines += "\n" + llava_summary(llava)
        lines += f"\n\nTry it:  bridgevlm chat {result['model']} --image {world_dir / 'images/test/test_000000.png'}"
    report.add_timing("total", time.time() - started)
    json_path, md_path = report.write()
    _say(options, "\n" + lines + f"\n\nReport: {md_path}\n        {json_path}")
    return report.data


def load_backbone_recipe(path: Path, budget: float) -> BackboneRecipe:
    """The backbone recipe with every stage's steps multiplied by `budget`."""
    task, recipe = load_recipe(path)
    if task != "backbones":
        raise ConfigError(f"{path}: --from-scratch needs a recipe with task: backbones, got task: {task}")
    for sub in (recipe.clip, recipe.lm):
        sub.train.max_steps = max(1, round(sub.train.max_steps * budget))
    return recipe


def load_llava_recipe(path: Path, backbones: Path, world: Path, budget: float) -> VlmRecipe:
    """The LLaVA recipe on these backbones and this world, every stage's steps scaled by `budget`."""
    if not Path(path).is_file():
        raise ConfigError(f"LLaVA recipe not found: {path} (run from a clone of the repository, or pass one)")
    task, recipe = load_recipe(path)
    if task != "vlm":
        raise ConfigError(f"{path}: the LLaVA stages need a recipe with task: vlm, got task: {task}")
    recipe.world = str(world)
    recipe.model.vision.path = str(Path(backbones) / "clip")
    recipe.model.llm = str(Path(backbones) / "lm")
    for stage in recipe.stages:
        stage.train.max_steps = max(1, round(stage.train.max_steps * budget))
    return recipe


def llava_metrics(metrics: dict) -> dict:
    """Flat metrics: held_in.<family>, held_out.<family>, their means, and the same under blind.*."""
    flat = {}
    for prefix, key in (("", "vqa"), ("blind.", "blind")):
        result = metrics.get(key)
        if not result:
            continue
        for group in ("held_in", "held_out"):
            for family, value in result[group].items():
                flat[f"{prefix}{group}.{family}"] = value
            flat[f"{prefix}{group}_mean"] = result[f"{group}_mean"]
    return flat


def llava_summary(llava: dict) -> str:
    text = (f"LLaVA held-in mean {llava['held_in_mean']:.3f}   held-out mean {llava['held_out_mean']:.3f}")
    if "blind.held_in_mean" in llava:
        text += (f"   (blind: {llava['blind.held_in_mean']:.3f} / {llava['blind.held_out_mean']:.3f})")
    families = sorted(k for k in llava if k.startswith(("held_in.", "held_out.")))
    return text + "\n      " + "  ".join(f"{k.split('.', 1)[1]} {llava[k]:.2f}" for k in families)


def _llava_section(report: Report, out: Path, result: dict, llava: dict) -> None:
    rows = []
    for group in ("held_in", "held_out"):
        for key in sorted(k for k in llava if k.startswith(group + ".")):
            family = key.split(".", 1)[1]
            rows.append([family, group.replace("_", "-"), llava[key], llava.get(f"blind.{key}", "n/a")])
        rows.append([f"**{group.replace('_', '-')} mean**", "", llava[f"{group}_mean"],
                     llava.get(f"blind.{group}_mean", "n/a")])
    stage_rows = [[name, info["steps"], round(info["seconds"], 1), info["final_loss"],
                   info["data"]["samples"], info["data"]["supervised_share"]]
                  for name, info in result["stages"].items()]
    figures = []
    curve = _accuracy_curve(result["stages"])
    if curve:
        figure = plot_curves(out / "figures" / "llava_accuracy.png", curve, "training minutes",
                             "val accuracy", "LLaVA accuracy while training")
        figures.append(str(figure.relative_to(out)))
    report.set("llava_curve", {name: {"minutes": xs, "accuracy": ys} for name, (xs, ys) in curve.items()})
    text = (f"LLaVA-1.5 recipe on the backbones: test-scene accuracy per family; *blind* asks the same "
            f"questions without the image. Model: `{result['model']}`.")
    tables = [markdown_table(["family", "group", "accuracy", "blind"], rows)]
    if stage_rows:
        tables.append(markdown_table(["stage", "steps", "train seconds", "final loss", "samples",
                                      "supervised share"], stage_rows))
    report.add_section(Section("LLaVA", text, tables, figures))


def _accuracy_curve(stages: dict) -> dict:
    """held-in / held-out val accuracy against cumulative training minutes over the stages."""
    minutes, points = 0.0, {"held-in": ([], []), "held-out": ([], [])}
    for info in stages.values():
        for record in info.get("history", []):
            minutes += record.get("seconds", 0.0) / 60 if "loss" in record else 0.0
            for name, key in (("held-in", "eval/held_in_mean"), ("held-out", "eval/held_out_mean")):
                if key in record:
                    points[name][0].append(round(minutes, 3))
                    points[name][1].append(record[key])
    return {name: xy for name, xy in points.items() if xy[0]}


def summary(clip: dict, lm: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"CLIP  zero-shot accuracy {clip.get('zeroshot_accuracy', float('nan')):.3f}   "
             f"image->text R@1 {clip['recall_at_1']:.3f}",
             f"LM    text QA accuracy {lm['text_qa_accuracy']:.3f}   answer perplexity {lm['perplexity']:.3f}"]
    families = sorted(k.split(".", 1)[1] for k in lm if k.startswith("text_qa."))
    lines.append("      " + "  ".join(f"{family} {lm['text_qa.' + family]:.2f}" for family in families))
    return "\n".join(lines)


def _backbone_sections(report: Report, out: Path, backbones: Path, manifest: dict, clip: dict, lm: dict) -> None:
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
        for name in ("clip", "lm"):
            points = [h for h in history.get(name, []) if "loss" in h]
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


def _say(options: QuickstartOptions, message: str) -> None:
    if options.progress:
        print(message, flush=True)
