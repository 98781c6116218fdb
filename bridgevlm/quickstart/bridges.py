"""The bridges `bridgevlm quickstart` trains on the backbones, each through its own recipes, with a
report section each and a table that compares them."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..recipes.blip2 import Blip2Stage1Recipe, run_blip2_stage1
from ..recipes.registry import load_recipe
from ..recipes.vlm import VlmRecipe, run_vlm
from ..report import Report, Section, markdown_table, plot_curves
from .options import BRIDGES, QuickstartOptions, say


@dataclass
class BridgeRun:
    """What the bridges of one quickstart share: its options, report, directories, BLIP-2 stage 1 (made
    once for every Q-Former bridge) and the bridges trained so far (report name -> run summary)."""
    options: QuickstartOptions
    report: Report
    out: Path
    backbones: Path
    world_dir: Path
    stage1_seconds: float | None = None  # BLIP-2 stage 1's training time (over every run that made it)
    trained: dict[str, dict] = field(default_factory=dict)

    def recipe(self, name: str) -> VlmRecipe:
        return load_vlm_recipe(self.options.recipes[name], self.backbones, self.world_dir, self.options.budget)

    def qformer_recipe(self, name: str) -> VlmRecipe:
        """A Q-Former bridge's recipe starting from this quickstart's BLIP-2 stage 1 (run here first)."""
        _blip2_stage1(self)
        recipe = self.recipe(name)
        recipe.model.connector.init = str(self.out / "blip2_stage1")
        return recipe


def _train_bridge(run: BridgeRun, recipe: VlmRecipe, source: Path, name: str, title: str, what: str) -> dict:
    """Run a vision-language recipe into out/<name>; its metrics, timing and section go into the report and
    it joins the bridges compared. Returns the run's result with its flat metrics under "flat" and the
    recipe under "recipe"."""
    say(run.options, f"{title} on the backbones: {len(recipe.stages)} stages "
                     f"({', '.join(s.name for s in recipe.stages)}) from {source}")
    step_start = time.time()
    result = run_vlm(recipe, run.out / name, progress=run.options.progress)
    run.report.add_timing(f"{name} (train + evaluate)", time.time() - step_start)
    result["flat"] = flat = vlm_metrics(result["metrics"])
    result["recipe"] = recipe  # what the studies vary
    run.report.add_metrics(name, flat)
    _vlm_section(run.report, run.out, result, flat, title, name, what)
    run.trained[title] = result
    return result


def _run_llava(run: BridgeRun) -> str:
    """LLaVA-1.5: an MLP aligned on captions, then instruction-tuned with the LM on the held-in families."""
    result = _train_bridge(run, run.recipe("llava"), run.options.recipes["llava"], "llava", "LLaVA",
                           "LLaVA-1.5 recipe on the backbones: test-scene accuracy per family")
    return vlm_summary("LLaVA", result["flat"])


def _blip2_stage1(run: BridgeRun) -> None:
    """BLIP-2 stage 1 on the captions into out/blip2_stage1, with its retrieval section; once per quickstart."""
    if run.stage1_seconds is not None:
        return
    path = run.options.recipes["blip2_stage1"]
    stage1 = load_stage1_recipe(path, run.backbones, run.world_dir, run.options.budget)
    say(run.options, f"BLIP-2 stage 1 on the backbones: {stage1.train.max_steps} steps of ITC + ITM + ITG from {path}")
    step_start = time.time()
    stage1_result = run_blip2_stage1(stage1, run.out / "blip2_stage1", progress=run.options.progress)
    run.report.add_timing("blip2 stage 1 (train + evaluate)", time.time() - step_start)
    # from its log, as the stages' own times are: a rerun that finds it done takes no time
    log = run.out / "blip2_stage1" / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    run.stage1_seconds = sum(record.get("seconds", 0.0) for record in records if "loss" in record)
    retrieval = stage1_result["metrics"]
    run.report.add_metrics("blip2_stage1", retrieval)
    rows = [[f"{label} R@{k}", retrieval.get(f"itc_{key}recall_at_{k}", "n/a"), retrieval.get(f"itm_{key}recall_at_{k}", "n/a")]
            for label, key in (("image->text", ""), ("text->image", "text_")) for k in (1, 5)]
    run.report.add_section(Section("BLIP-2 stage 1", (
        f"Q-Former pre-training on the frozen tower ({stage1.train.max_steps} steps), retrieval on the "
        f"{stage1.eval.split} captions: ITC alone, and its top {stage1.eval.retrieval.rerank_top_k} re-ranked by ITM. "
        "InstructBLIP and CROME start from this Q-Former."),
        [markdown_table(["retrieval", "ITC", "ITC + ITM re-ranked"], rows)]))
    say(run.options, f"BLIP-2 stage 1 image->text R@1: ITC {retrieval.get('itc_recall_at_1', float('nan')):.3f}, "
                     f"ITC+ITM {retrieval.get('itm_recall_at_1', float('nan')):.3f}")


def _run_qformer(run: BridgeRun) -> str:
    """InstructBLIP from BLIP-2 stage 1: the generative stage, then instruction tuning."""
    recipe = run.qformer_recipe("instructblip")
    result = _train_bridge(
        run, recipe, run.options.recipes["instructblip"], "instructblip", "InstructBLIP",
        "InstructBLIP recipe (Q-Former from BLIP-2 stage 1, frozen tower and LM): test-scene accuracy per family")
    return vlm_summary("InstructBLIP", result["flat"])


def _run_crome(run: BridgeRun) -> str:
    """CROME from BLIP-2 stage 1: (0) generative, (a) pre-training, (b) instruction tuning, (c) task
    fine-tuning of the adapter alone."""
    recipe = run.qformer_recipe("crome")
    result = _train_bridge(
        run, recipe, run.options.recipes["crome"], "crome", "CROME",
        "CROME recipe (Q-Former from BLIP-2 stage 1, the gated cross-modal adapter before the frozen LM; "
        "the last stage fine-tunes the adapter alone on one family): test-scene accuracy per family")
    return vlm_summary("CROME", result["flat"])


def _in_llm_runner(name: str, what: str):
    def runner(run: BridgeRun) -> str:
        title = BRIDGES[name]
        result = _train_bridge(run, run.recipe(name), run.options.recipes[name], name, title,
                               f"{what}: test-scene accuracy per family")
        return vlm_summary(title, result["flat"])
    return runner


RUNNERS = {
    "llava": _run_llava,
    "qformer": _run_qformer,
    "crome": _run_crome,
    "partial_lora": _in_llm_runner("partial_lora", "XComposer2's Partial LoRA (LoRA on the frozen LM at the "
                                                   "visual tokens only)"),
    "flamingo": _in_llm_runner("flamingo", "Flamingo (a perceiver resampler and gated cross-attention "
                                           "blocks in the frozen LM)"),
}


def try_it(model: str | Path, world_dir: Path) -> str:
    return (f"\n\nTry it:  bridgevlm chat {model} --image {world_dir / 'images/test/test_000000.png'}"
            f"\n   or:  bridgevlm serve {model} --image-root {world_dir / 'images'}   (a chat page at "
            f"http://127.0.0.1:8000/, an OpenAI-compatible API at /v1)")


def comparison_section(run: BridgeRun) -> None:
    """The bridges trained, side by side: accuracy, the blind baseline, what each stage trains, minutes."""
    rows = []
    for title, result in run.trained.items():
        flat = result["flat"]
        stages = result["stages"]
        minutes = sum(info.get("seconds", 0.0) for info in stages.values()) / 60
        rows.append([title, flat["held_in_mean"], flat.get("blind.held_in_mean", "n/a"), flat["held_out_mean"],
                     flat.get("blind.held_out_mean", "n/a"),
                     ", ".join(f"{name} {_count(info['trainable_parameters'])}" for name, info in stages.items()),
                     f"{minutes:.1f}"])
    note = ""
    if run.stage1_seconds is not None:
        note = (f" InstructBLIP and CROME also start from BLIP-2 stage 1 ({run.stage1_seconds / 60:.1f} training "
                "minutes, made once and shared).")
    run.report.add_section(Section("Bridges compared", (
        "Every bridge trained here on the same backbones and world, evaluated on the same test questions; "
        "*blind* asks them without the image. Trainable parameters per stage; training minutes summed over "
        "the bridge's stages." + note), [
        markdown_table(["bridge", "held-in mean", "blind", "held-out mean", "blind", "trainable parameters",
                        "training minutes"], rows)]))


def _count(parameters: int) -> str:
    return f"{parameters / 1e6:.2f}M" if parameters >= 100_000 else f"{parameters:,}"


def load_stage1_recipe(path: Path, backbones: Path, world: Path, budget: float) -> Blip2Stage1Recipe:
    """The BLIP-2 stage-1 recipe reading these backbones' tower and tokenizer, steps scaled by `budget`."""
    task, recipe = _load_task(path, "blip2_stage1", "BLIP-2 stage 1")
    recipe.world = str(world)
    recipe.vision.path = str(Path(backbones) / "clip")
    recipe.tokenizer = str(Path(backbones) / "tokenizer")
    recipe.train.max_steps = max(1, round(recipe.train.max_steps * budget))
    return recipe


def _load_task(path: Path, task_name: str, what: str):
    if not Path(path).is_file():
        raise ConfigError(f"{what} recipe not found: {path} (run from a clone of the repository, or pass one)")
    task, recipe = load_recipe(path)
    if task != task_name:
        raise ConfigError(f"{path}: the {what} stages need a recipe with task: {task_name}, got task: {task}")
    return task, recipe


def load_vlm_recipe(path: Path, backbones: Path, world: Path, budget: float) -> VlmRecipe:
    """A vision-language recipe on these backbones and this world, every stage's steps scaled by `budget`."""
    task, recipe = _load_task(path, "vlm", "vision-language")
    recipe.world = str(world)
    recipe.model.vision.path = str(Path(backbones) / "clip")
    recipe.model.llm = str(Path(backbones) / "lm")
    for stage in recipe.stages:
        stage.train.max_steps = max(1, round(stage.train.max_steps * budget))
    return recipe


def vlm_metrics(metrics: dict) -> dict:
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


def vlm_summary(title: str, flat: dict) -> str:
    text = (f"{title} held-in mean {flat['held_in_mean']:.3f}   held-out mean {flat['held_out_mean']:.3f}")
    if "blind.held_in_mean" in flat:
        text += (f"   (blind: {flat['blind.held_in_mean']:.3f} / {flat['blind.held_out_mean']:.3f})")
    families = sorted(k for k in flat if k.startswith(("held_in.", "held_out.")))
    return text + "\n      " + "  ".join(f"{k.split('.', 1)[1]} {flat[k]:.2f}" for k in families)


def _vlm_section(report: Report, out: Path, result: dict, flat: dict, title: str, name: str, what: str) -> None:
    """A bridge's report section: accuracy per family (and blind), its stages, its accuracy curve."""
    rows = []
    for group in ("held_in", "held_out"):
        for metric in sorted(k for k in flat if k.startswith(group + ".")):
            family = metric.split(".", 1)[1]
            rows.append([family, group.replace("_", "-"), flat[metric], flat.get(f"blind.{metric}", "n/a")])
        rows.append([f"**{group.replace('_', '-')} mean**", "", flat[f"{group}_mean"],
                     flat.get(f"blind.{group}_mean", "n/a")])
    stage_rows = [[name, info["steps"], round(info["seconds"], 1), info["final_loss"],
                   info["data"]["samples"], info["data"]["supervised_share"]]
                  for name, info in result["stages"].items()]
    figures = []
    curve = _accuracy_curve(result["stages"])
    if curve:
        figure = plot_curves(out / "figures" / f"{name}_accuracy.png", curve, "training minutes",
                             "val accuracy", f"{title} accuracy while training")
        figures.append(str(figure.relative_to(out)))
    report.set(f"{name}_curve", {group: {"minutes": xs, "accuracy": ys} for group, (xs, ys) in curve.items()})
    text = f"{what}; *blind* asks the same questions without the image. Model: `{result['model']}`."
    tables = [markdown_table(["family", "group", "accuracy", "blind"], rows)]
    if stage_rows:
        tables.append(markdown_table(["stage", "steps", "train seconds", "final loss", "samples",
                                      "supervised share"], stage_rows))
    report.add_section(Section(title, text, tables, figures))


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
