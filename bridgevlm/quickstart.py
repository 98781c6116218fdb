"""`bridgevlm quickstart`: the whole pipeline on the embedded default, on a CPU, in minutes.

World -> backbones (shipped, or made from scratch) -> evaluation -> report. Later stages add their
own sections to the same report.
"""
from __future__ import annotations

import json
import time
import copy
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, from_dict, to_dict
from .data.shapes.world import WorldConfig, build_world, load_world_description
from .recipes.backbones import SHIPPED, BackboneRecipe, evaluate_backbones, load_manifest, make_backbones
from .recipes.blip2 import Blip2Stage1Recipe, run_blip2_stage1
from .recipes.registry import load_recipe
from .recipes.vlm import VlmRecipe, run_vlm, stage_dir
from .report import Report, Section, markdown_table, plot_curves

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# The repository's recipe; an installed package falls back to the copy saved with the shipped backbones.
DEFAULT_RECIPE = CONFIGS / "shapes" / "backbones.yaml"
if not DEFAULT_RECIPE.is_file():
    DEFAULT_RECIPE = SHIPPED / "recipe.yaml"
LLAVA_RECIPE = CONFIGS / "shapes" / "llava.yaml"
QFORMER_STAGE1_RECIPE = CONFIGS / "shapes" / "blip2_stage1.yaml"
INSTRUCTBLIP_RECIPE = CONFIGS / "shapes" / "instructblip.yaml"
ABLATION_RECIPES = {  # InstructBLIP's ablation: multitask baselines, evaluated with instructions as it is
    "multitask_plain": CONFIGS / "shapes" / "instructblip_ablation" / "multitask_plain.yaml",
    "multitask_prefix": CONFIGS / "shapes" / "instructblip_ablation" / "multitask_prefix.yaml",
}
BRIDGES = ("llava", "qformer")


@dataclass
class QuickstartOptions:
    out: Path
    from_scratch: bool = False
    budget: float = 1.0  # scales training steps of every stage that trains
    backbones: Path = SHIPPED
    recipe: Path = DEFAULT_RECIPE
    llava_recipe: Path = LLAVA_RECIPE
    qformer_stage1_recipe: Path = QFORMER_STAGE1_RECIPE
    instructblip_recipe: Path = INSTRUCTBLIP_RECIPE
    # the bridges trained after the backbones: llava (LLaVA-1.5's MLP), qformer (BLIP-2 stage 1, then InstructBLIP)
    bridges: tuple[str, ...] = ("llava",)
    # with the qformer bridge, also the papers' controls: InstructBLIP's ablation (multitask training on
    # plain and on [Task:Dataset]-tagged inputs) and InstructBLIP with BLIP-2 stage 1 skipped
    qformer_studies: bool = False
    ablation_recipes: dict[str, Path] = field(default_factory=lambda: dict(ABLATION_RECIPES))
    progress: bool = True

    def __post_init__(self):
        unknown = [b for b in self.bridges if b not in BRIDGES]
        if unknown:
            raise ValueError(f"unknown bridge(s) {', '.join(unknown)}; valid: {', '.join(BRIDGES)}")


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

    # 4. The bridges: LLaVA aligns an MLP on captions, then instruction-tunes on the held-in families;
    #    the Q-Former learns to read the tower (BLIP-2 stage 1), then generates and follows instructions.
    lines = summary(clip_metrics, lm_metrics)
    if "llava" in options.bridges:
        recipe = load_vlm_recipe(options.llava_recipe, backbones, world_dir, options.budget)
        result, llava = _train_bridge(options, report, out, recipe, options.llava_recipe, "LLaVA", "llava",
                                      "LLaVA-1.5 recipe on the backbones: test-scene accuracy per family")
        lines += "\n" + vlm_summary("LLaVA", llava)
        lines += _try_it(result["model"], world_dir)
    if "qformer" in options.bridges:
        lines += "\n" + _run_qformer(options, report, out, backbones, world_dir)
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


def _train_bridge(options: QuickstartOptions, report: Report, out: Path, recipe: VlmRecipe, source: Path,
                  title: str, name: str, what: str) -> tuple[dict, dict]:
    """Run a vision-language recipe into out/<name>; its metrics, timing and section go into the report.
    Returns the run's result and its flat metrics."""
    _say(options, f"{title} on the backbones: {len(recipe.stages)} stages "
                  f"({', '.join(s.name for s in recipe.stages)}) from {source}")
    step_start = time.time()
    result = run_vlm(recipe, out / name, progress=options.progress)
    report.add_timing(f"{name} (train + evaluate)", time.time() - step_start)
    flat = vlm_metrics(result["metrics"])
    report.add_metrics(name, flat)
    _vlm_section(report, out, result, flat, title, name, what)
    return result, flat


def _run_qformer(options: QuickstartOptions, report: Report, out: Path, backbones: Path, world_dir: Path) -> str:
    """BLIP-2 stage 1 on the captions, then InstructBLIP (the generative stage and instruction tuning)
    from its Q-Former; both sections go into the report. Returns the terminal summary."""
    stage1 = load_stage1_recipe(options.qformer_stage1_recipe, backbones, world_dir, options.budget)
    _say(options, f"BLIP-2 stage 1 on the backbones: {stage1.train.max_steps} steps of ITC + ITM + ITG "
                  f"from {options.qformer_stage1_recipe}")
    step_start = time.time()
    stage1_result = run_blip2_stage1(stage1, out / "blip2_stage1", progress=options.progress)
    report.add_timing("blip2 stage 1 (train + evaluate)", time.time() - step_start)
    retrieval = stage1_result["metrics"]
    report.add_metrics("blip2_stage1", retrieval)
    rows = [[f"{label} R@{k}", retrieval.get(f"itc_{key}recall_at_{k}", "n/a"), retrieval.get(f"itm_{key}recall_at_{k}", "n/a")]
            for label, key in (("image->text", ""), ("text->image", "text_")) for k in (1, 5)]
    report.add_section(Section("BLIP-2 stage 1", (
        f"Q-Former pre-training on the frozen tower ({stage1.train.max_steps} steps), retrieval on the "
        f"{stage1.eval.split} captions: ITC alone, and its top {stage1.eval.retrieval.rerank_top_k} re-ranked by ITM."),
        [markdown_table(["retrieval", "ITC", "ITC + ITM re-ranked"], rows)]))

    recipe = load_vlm_recipe(options.instructblip_recipe, backbones, world_dir, options.budget)
    recipe.model.connector.init = str(out / "blip2_stage1")
    result, instructblip = _train_bridge(
        options, report, out, recipe, options.instructblip_recipe, "InstructBLIP", "instructblip",
        "InstructBLIP recipe (Q-Former from BLIP-2 stage 1, frozen tower and LM): test-scene accuracy per family")
    lines = ""
    if options.qformer_studies:
        lines = "\n" + _qformer_studies(options, report, out, recipe, instructblip)
    return (f"BLIP-2 stage 1 image->text R@1: ITC {retrieval.get('itc_recall_at_1', float('nan')):.3f}, "
            f"ITC+ITM {retrieval.get('itm_recall_at_1', float('nan')):.3f}\n"
            + vlm_summary("InstructBLIP", instructblip)
            + lines
            + _try_it(result["model"], world_dir))


def _try_it(model: str | Path, world_dir: Path) -> str:
    return (f"\n\nTry it:  bridgevlm chat {model} --image {world_dir / 'images/test/test_000000.png'}"
            f"\n   or:  bridgevlm serve {model} --image-root {world_dir / 'images'}   (a chat page at "
            f"http://127.0.0.1:8000/, an OpenAI-compatible API at /v1)")


def _qformer_studies(options: QuickstartOptions, report: Report, out: Path, base: VlmRecipe, base_flat: dict) -> str:
    """InstructBLIP's ablation and BLIP-2's stage-1 control, each against the InstructBLIP run in
    out/instructblip (`base`, `base_flat`), as report tables. Returns the terminal summary."""
    backbones, world = Path(base.model.llm).parent, Path(base.world)
    runs = {"instruction tuning": base_flat}
    for name, path in options.ablation_recipes.items():
        recipe = load_vlm_recipe(path, backbones, world, options.budget)
        recipe.model.connector.init = base.model.connector.init
        _reuse_shared_stages(recipe, base, out / "instructblip")
        runs[name.replace("_", " ")] = _run_study(options, report, out / f"ablation_{name}", recipe, name)
    skipped = copy.deepcopy(base)
    skipped.model.connector.init_weights = False  # the same Q-Former, its stage-1 weights left out
    no_stage1 = _run_study(options, report, out / "instructblip_no_stage1", skipped, "instructblip_no_stage1")

    held_out = sorted(k for k in base_flat if k.startswith("held_out."))
    ablation_rows = [[label, *(flat[k] for k in held_out), flat["held_out_mean"], flat["held_in_mean"]]
                     for label, flat in runs.items()]
    stage1_rows = [[label, flat["held_in_mean"], flat["held_out_mean"]]
                   for label, flat in (("from BLIP-2 stage 1", base_flat), ("stage 1 skipped", no_stage1))]
    report.add_section(Section("InstructBLIP studies", (
        "The ablation: the same held-in datasets and mixture trained as instructions (varied templates), "
        "as plain questions (one fixed phrasing), or as plain questions behind a `[Task:Dataset]` tag; all "
        "evaluated with instructions on the held-out families. And BLIP-2's claim that stage 1 matters: the "
        "same recipe from a Q-Former with stage 1's architecture and tokenizer but fresh weights."), [
        markdown_table(["training", *(k.split(".", 1)[1] for k in held_out), "held-out mean", "held-in mean"],
                       ablation_rows),
        markdown_table(["InstructBLIP Q-Former", "held-in mean", "held-out mean"], stage1_rows)]))
    return "\n".join([f"Ablation held-out mean: " + "   ".join(f"{label} {flat['held_out_mean']:.3f}"
                                                                for label, flat in runs.items()),
                      f"Stage 1 skipped: held-in {no_stage1['held_in_mean']:.3f}, held-out "
                      f"{no_stage1['held_out_mean']:.3f} (from stage 1: {base_flat['held_in_mean']:.3f}, "
                      f"{base_flat['held_out_mean']:.3f})"])


def _run_study(options: QuickstartOptions, report: Report, run_dir: Path, recipe: VlmRecipe, name: str) -> dict:
    _say(options, f"Study {name}: {len(recipe.stages)} stage(s) ({', '.join(s.name for s in recipe.stages)})")
    step_start = time.time()
    result = run_vlm(recipe, run_dir, progress=options.progress)
    report.add_timing(f"{name} (train + evaluate)", time.time() - step_start)
    flat = vlm_metrics(result["metrics"])
    report.add_metrics(name, flat)
    return flat


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


def _say(options: QuickstartOptions, message: str) -> None:
    if options.progress:
        print(message, flush=True)
