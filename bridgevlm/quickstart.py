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
from .models.assemble import load_vlm
from .recipes.vlm import Stage, VlmRecipe, evaluate_on_world, fill_world, run_vlm, stage_dir
from .report import Report, Section, markdown_table, plot_curves

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# The repository's recipe; an installed package falls back to the copy saved with the shipped backbones.
DEFAULT_RECIPE = CONFIGS / "shapes" / "backbones.yaml"
if not DEFAULT_RECIPE.is_file():
    DEFAULT_RECIPE = SHIPPED / "recipe.yaml"
SHAPES = CONFIGS / "shapes"
# The recipe each bridge runs, by name; QuickstartOptions.recipes (--bridge-recipe NAME=PATH) replaces any.
RECIPES = {
    "llava": SHAPES / "llava.yaml",
    "blip2_stage1": SHAPES / "blip2_stage1.yaml",  # the Q-Former that InstructBLIP and CROME start from
    "instructblip": SHAPES / "instructblip.yaml",
    # InstructBLIP's ablation: multitask baselines, evaluated with instructions as it is
    "multitask_plain": SHAPES / "instructblip_ablation" / "multitask_plain.yaml",
    "multitask_prefix": SHAPES / "instructblip_ablation" / "multitask_prefix.yaml",
    "crome": SHAPES / "crome.yaml",
    "crome_bridge_finetune": SHAPES / "crome_bridge_finetune.yaml",  # CROME's control: stage (c) on the whole bridge
    "partial_lora": SHAPES / "partial_lora.yaml",
    "flamingo": SHAPES / "flamingo.yaml",
}
ABLATIONS = ("multitask_plain", "multitask_prefix")
# what --bridge names, in the order they run, and each one's title in the report
BRIDGES = {"llava": "LLaVA", "qformer": "InstructBLIP", "crome": "CROME", "partial_lora": "Partial LoRA",
           "flamingo": "Flamingo"}


@dataclass
class QuickstartOptions:
    out: Path
    from_scratch: bool = False
    budget: float = 1.0  # scales training steps of every stage that trains
    backbones: Path = SHIPPED
    recipe: Path = DEFAULT_RECIPE
    # the bridges trained after the backbones (BRIDGES): llava (LLaVA-1.5's MLP), qformer (BLIP-2 stage 1,
    # then InstructBLIP), crome (BLIP-2 stage 1, then CROME's three stages), partial_lora, flamingo
    bridges: tuple[str, ...] = ("llava",)
    # the papers' controls for the bridges trained: InstructBLIP's ablation (multitask training on plain
    # and on [Task:Dataset]-tagged inputs) and InstructBLIP with BLIP-2 stage 1 skipped; CROME's task
    # fine-tuning of the whole bridge against the adapter alone
    studies: bool = False
    recipes: dict[str, Path] = field(default_factory=dict)  # by RECIPES name; the rest are RECIPES'
    progress: bool = True

    def __post_init__(self):
        unknown = [b for b in self.bridges if b not in BRIDGES]
        if unknown:
            raise ValueError(f"unknown bridge(s) {', '.join(unknown)}; valid: {', '.join(BRIDGES)}")
        unknown = [name for name in self.recipes if name not in RECIPES]
        if unknown:
            raise ValueError(f"unknown recipe name(s) {', '.join(unknown)}; valid: {', '.join(RECIPES)}")
        self.recipes = {**RECIPES, **{name: Path(path) for name, path in self.recipes.items()}}
        self.bridges = tuple(b for b in BRIDGES if b in self.bridges)  # the order they run in


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

    # 4. The bridges, each through its own recipes; the report gains a section per bridge (and per study),
    #    then a table that sets them side by side.
    run = _BridgeRun(options, report, out, backbones, world_dir)
    lines = summary(clip_metrics, lm_metrics)
    for bridge in options.bridges:
        lines += "\n" + _RUNNERS[bridge](run)
        report.write()
    if len(run.trained) > 1:
        _comparison_section(run)
    if run.trained:
        lines += _try_it(next(iter(run.trained.values()))["model"], world_dir)
    report.add_timing("total", time.time() - started)
    json_path, md_path = report.write()
    _say(options, "\n" + lines + f"\n\nReport: {md_path}\n        {json_path}")
    return report.data


@dataclass
class _BridgeRun:
    """What the bridges of one quickstart share: its options, report, directories, BLIP-2 stage 1 (made
    once for every Q-Former bridge) and the bridges trained so far (report name -> run summary)."""
    options: QuickstartOptions
    report: Report
    out: Path
    backbones: Path
    world_dir: Path
    stage1_seconds: float | None = None
    trained: dict[str, dict] = field(default_factory=dict)

    def recipe(self, name: str) -> VlmRecipe:
        return load_vlm_recipe(self.options.recipes[name], self.backbones, self.world_dir, self.options.budget)

    def qformer_recipe(self, name: str) -> VlmRecipe:
        """A Q-Former bridge's recipe starting from this quickstart's BLIP-2 stage 1 (run here first)."""
        _blip2_stage1(self)
        recipe = self.recipe(name)
        recipe.model.connector.init = str(self.out / "blip2_stage1")
        return recipe


def load_backbone_recipe(path: Path, budget: float) -> BackboneRecipe:
    """The backbone recipe with every stage's steps multiplied by `budget`."""
    task, recipe = load_recipe(path)
    if task != "backbones":
        raise ConfigError(f"{path}: --from-scratch needs a recipe with task: backbones, got task: {task}")
    for sub in (recipe.clip, recipe.lm):
        sub.train.max_steps = max(1, round(sub.train.max_steps * budget))
    return recipe


def _train_bridge(run: _BridgeRun, recipe: VlmRecipe, source: Path, name: str, title: str, what: str) -> dict:
    """Run a vision-language recipe into out/<name>; its metrics, timing and section go into the report and
    it joins the bridges compared. Returns the run's result with its flat metrics under "flat"."""
    _say(run.options, f"{title} on the backbones: {len(recipe.stages)} stages "
                      f"({', '.join(s.name for s in recipe.stages)}) from {source}")
    step_start = time.time()
    result = run_vlm(recipe, run.out / name, progress=run.options.progress)
    run.report.add_timing(f"{name} (train + evaluate)", time.time() - step_start)
    result["flat"] = flat = vlm_metrics(result["metrics"])
    run.report.add_metrics(name, flat)
    _vlm_section(run.report, run.out, result, flat, title, name, what)
    run.trained[title] = result
    return result


def _run_llava(run: _BridgeRun) -> str:
    """LLaVA-1.5: an MLP aligned on captions, then instruction-tuned with the LM on the held-in families."""
    result = _train_bridge(run, run.recipe("llava"), run.options.recipes["llava"], "llava", "LLaVA",
                           "LLaVA-1.5 recipe on the backbones: test-scene accuracy per family")
    return vlm_summary("LLaVA", result["flat"])


def _blip2_stage1(run: _BridgeRun) -> None:
    """BLIP-2 stage 1 on the captions into out/blip2_stage1, with its retrieval section; once per quickstart."""
    if run.stage1_seconds is not None:
        return
    path = run.options.recipes["blip2_stage1"]
    stage1 = load_stage1_recipe(path, run.backbones, run.world_dir, run.options.budget)
    _say(run.options, f"BLIP-2 stage 1 on the backbones: {stage1.train.max_steps} steps of ITC + ITM + ITG from {path}")
    step_start = time.time()
    stage1_result = run_blip2_stage1(stage1, run.out / "blip2_stage1", progress=run.options.progress)
    run.stage1_seconds = time.time() - step_start
    run.report.add_timing("blip2 stage 1 (train + evaluate)", run.stage1_seconds)
    retrieval = stage1_result["metrics"]
    run.report.add_metrics("blip2_stage1", retrieval)
    rows = [[f"{label} R@{k}", retrieval.get(f"itc_{key}recall_at_{k}", "n/a"), retrieval.get(f"itm_{key}recall_at_{k}", "n/a")]
            for label, key in (("image->text", ""), ("text->image", "text_")) for k in (1, 5)]
    run.report.add_section(Section("BLIP-2 stage 1", (
        f"Q-Former pre-training on the frozen tower ({stage1.train.max_steps} steps), retrieval on the "
        f"{stage1.eval.split} captions: ITC alone, and its top {stage1.eval.retrieval.rerank_top_k} re-ranked by ITM. "
        "InstructBLIP and CROME start from this Q-Former."),
        [markdown_table(["retrieval", "ITC", "ITC + ITM re-ranked"], rows)]))
    _say(run.options, f"BLIP-2 stage 1 image->text R@1: ITC {retrieval.get('itc_recall_at_1', float('nan')):.3f}, "
                      f"ITC+ITM {retrieval.get('itm_recall_at_1', float('nan')):.3f}")


def _run_qformer(run: _BridgeRun) -> str:
    """InstructBLIP from BLIP-2 stage 1 (the generative stage, then instruction tuning), and with
    --studies the paper's ablation and the stage-1 control."""
    recipe = run.qformer_recipe("instructblip")
    result = _train_bridge(
        run, recipe, run.options.recipes["instructblip"], "instructblip", "InstructBLIP",
        "InstructBLIP recipe (Q-Former from BLIP-2 stage 1, frozen tower and LM): test-scene accuracy per family")
    lines = vlm_summary("InstructBLIP", result["flat"])
    if run.options.studies:
        lines += "\n" + _qformer_studies(run, recipe, result["flat"])
    return lines


def _run_crome(run: _BridgeRun) -> str:
    """CROME from BLIP-2 stage 1: (0) generative, (a) pre-training, (b) instruction tuning, (c) task
    fine-tuning of the adapter alone; with --studies, (c) on the whole bridge as well."""
    recipe = run.qformer_recipe("crome")
    result = _train_bridge(
        run, recipe, run.options.recipes["crome"], "crome", "CROME",
        "CROME recipe (Q-Former from BLIP-2 stage 1, the gated cross-modal adapter before the frozen LM; "
        "the last stage fine-tunes the adapter alone on one family): test-scene accuracy per family")
    lines = vlm_summary("CROME", result["flat"])
    if run.options.studies:
        lines += "\n" + _crome_study(run, recipe, result)
    return lines


def _in_llm_runner(name: str, what: str):
    def runner(run: _BridgeRun) -> str:
        title = BRIDGES[name]
        result = _train_bridge(run, run.recipe(name), run.options.recipes[name], name, title,
                               f"{what}: test-scene accuracy per family")
        return vlm_summary(title, result["flat"])
    return runner


_RUNNERS = {
    "llava": _run_llava,
    "qformer": _run_qformer,
    "crome": _run_crome,
    "partial_lora": _in_llm_runner("partial_lora", "XComposer2's Partial LoRA (LoRA on the frozen LM at the "
                                                   "visual tokens only)"),
    "flamingo": _in_llm_runner("flamingo", "Flamingo (a perceiver resampler and gated cross-attention "
                                           "blocks in the frozen LM)"),
}


def _try_it(model: str | Path, world_dir: Path) -> str:
    return (f"\n\nTry it:  bridgevlm chat {model} --image {world_dir / 'images/test/test_000000.png'}"
            f"\n   or:  bridgevlm serve {model} --image-root {world_dir / 'images'}   (a chat page at "
            f"http://127.0.0.1:8000/, an OpenAI-compatible API at /v1)")


def _qformer_studies(run: _BridgeRun, base: VlmRecipe, base_flat: dict) -> str:
    """InstructBLIP's ablation and BLIP-2's stage-1 control, each against the InstructBLIP run in
    out/instructblip (`base`, `base_flat`), as report tables. Returns the terminal summary."""
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
    return "\n".join([f"Ablation held-out mean: " + "   ".join(f"{label} {flat['held_out_mean']:.3f}"
                                                                for label, flat in runs.items()),
                      f"Stage 1 skipped: held-in {no_stage1['held_in_mean']:.3f}, held-out "
                      f"{no_stage1['held_out_mean']:.3f} (from stage 1: {base_flat['held_in_mean']:.3f}, "
                      f"{base_flat['held_out_mean']:.3f})"])


def _crome_study(run: _BridgeRun, base: VlmRecipe, base_result: dict) -> str:
    """CROME's claim for its last stage: fine-tuning the adapter alone on a task, against fine-tuning the
    whole bridge on the same data from the same instruction-tuned model, and against not fine-tuning at
    all. A report table of the task's family, the means and the parameters each trains."""
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


def _run_study(run: _BridgeRun, run_dir: Path, recipe: VlmRecipe, name: str) -> dict:
    _say(run.options, f"Study {name}: {len(recipe.stages)} stage(s) ({', '.join(s.name for s in recipe.stages)})")
    step_start = time.time()
    result = run_vlm(recipe, run_dir, progress=run.options.progress)
    run.report.add_timing(f"{name} (train + evaluate)", time.time() - step_start)
    result["flat"] = vlm_metrics(result["metrics"])
    run.report.add_metrics(name, result["flat"])
    return result


def _comparison_section(run: _BridgeRun) -> None:
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
        note = (f" InstructBLIP and CROME also start from BLIP-2 stage 1 ({run.stage1_seconds / 60:.1f} minutes, "
                "made once and shared).")
    run.report.add_section(Section("Bridges compared", (
        "Every bridge trained here on the same backbones and world, evaluated on the same test questions; "
        "*blind* asks them without the image. Trainable parameters per stage; training minutes summed over "
        "the bridge's stages." + note), [
        markdown_table(["bridge", "held-in mean", "blind", "held-out mean", "blind", "trainable parameters",
                        "training minutes"], rows)]))


def _count(parameters: int) -> str:
    return f"{parameters / 1e6:.2f}M" if parameters >= 100_000 else f"{parameters:,}"


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
