"""Staged vision-language training (LLaVA and every bridge after it): a recipe is a list of stages.

Each stage states what trains (`trainable`), on what data, with which optimiser and schedule, and
where it starts (`previous`, `base` or a saved model directory). A finished stage leaves
`<run>/<NN>_<name>/model/`; running the recipe again skips finished stages and resumes an
interrupted one from its last checkpoint.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import save_config, to_dict
from ..data.conversations import PadCollator
from ..data.prefix_lm import PrefixLmCollator
from ..data.feature_cache import FeatureCache
from ..data.templates import get_template
from ..eval.vqa import evaluate_vqa_on_world
from ..infer.generate import GenerationConfig
from ..io import write_json
from ..models.assemble import CONFIG_FILE, LoadedVlm, VlmConfig, build_vlm, load_vlm, save_vlm
from ..models.lora import LoraSettings
from ..train.distributed import DistContext, barrier, init_distributed
from ..train.loop import TrainConfig, seed_everything, train_stage
from ..train.trainability import Trainability, apply_trainability
from .stage_data import SourceRecords, StageData, build_stage_dataset, read_sources

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    name: str = "stage"
    # previous | base (the pretrained parts and a fresh connector, or one starting from model.connector.init)
    # | a saved model directory
    init: str = "previous"
    trainable: Trainability = field(default_factory=Trainability)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: StageData = field(default_factory=StageData)
    gradient_checkpointing: bool = False
    # Encode each image once with the frozen vision tower and read the features from a disk cache
    # (<run>/feature_cache) in every epoch; needs trainable.vision: frozen.
    cache_vision_features: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class WorldEval:
    world: str = ""  # a Shapes world to evaluate on after the last stage; empty: no evaluation
    split: str = "test"
    limit_per_family: int | None = None
    blind_baseline: bool = True  # also ask without the image
    # Answer families that list candidates (yes/no, multiple choice, classification) by the likeliest
    # candidate rather than by generation (InstructBLIP's protocol)
    rank_candidates: bool = False
    template: str | None = None  # the prompt format; None: the model's (e.g. blip2_vqa: "Question: {} Answer:")
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=12))
    # Stages with train.eval_every > 0 evaluate on this many val questions per family as they train
    # (the accuracy-vs-time curve).
    progress_limit_per_family: int = 20


@dataclass
class VlmRecipe:
    world: str = ""  # replaces "{world}" in data and eval paths, so one recipe serves any world directory
    model: VlmConfig = field(default_factory=VlmConfig)
    stages: list[Stage] = field(default_factory=list)
    eval: WorldEval = field(default_factory=WorldEval)


def fill_world(recipe: VlmRecipe) -> VlmRecipe:
    """A copy with "{world}" in data and eval paths replaced by `recipe.world`."""
    recipe = copy.deepcopy(recipe)
    paths = [(stage.data, "path") for stage in recipe.stages] + [(stage.data, "image_folder") for stage in recipe.stages]
    for stage in recipe.stages:
        paths += [(source, name) for source in stage.data.sources for name in ("path", "image_folder")]
    paths.append((recipe.eval, "world"))
    for owner, name in paths:
        value = getattr(owner, name)
        if value and "{world}" in value:
            if not recipe.world:
                raise ValueError(f"{value!r} uses {{world}} but the recipe's world is empty; set world=DIR")
            setattr(owner, name, value.replace("{world}", recipe.world))
    return recipe


def stage_dir(run_dir: Path, index: int, stage: Stage) -> Path:
    return run_dir / f"{index + 1:02d}_{stage.name}"


def _start(recipe: VlmRecipe, stage: Stage, previous: LoadedVlm | None) -> LoadedVlm:
    if stage.init == "base" or (stage.init == "previous" and previous is None):
        return build_vlm(recipe.model)
    if stage.init == "previous":
        return previous
    return load_vlm(stage.init)


def run_stage(loaded: LoadedVlm, stage: Stage, out: Path, progress: bool = True, eval_fn=None,
              dist: DistContext | None = None) -> dict:
    """Train one stage of `loaded` in place and save the result to out/model (rank 0 writes, the
    other ranks wait for it). `eval_fn(model, step)` runs every `stage.train.eval_every` steps."""
    dist = dist or init_distributed()
    model = loaded.model
    apply_trainability(model, stage.trainable, stage.lora)
    trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if stage.gradient_checkpointing:
        model.llm.set_activation_checkpointing(True)
    template = get_template(stage.data.template or loaded.config.template, loaded.tokenizer)
    sources = read_sources(stage.data, stage.name)
    cache = _feature_cache(loaded, stage, sources, out, progress, dist)
    instructions = loaded.instruction_tokenizer()  # InstructBLIP: each image's turn also goes to the Q-Former
    # An encoder-decoder LLM (BLIP-2 with FlanT5) trains on prefix-LM samples: source to encoder, target to decoder.
    encoder_decoder = model.llm.is_encoder_decoder
    data = build_stage_dataset(stage.data, sources, loaded.tokenizer, template, loaded.processor, loaded.placeholder,
                               cache, instructions, dist, encoder_decoder=encoder_decoder, seed=stage.train.seed)
    data_report = data.report
    logger.info("stage %s data: %d samples, %.1f%% of %d tokens supervised%s", stage.name, data_report["samples"],
                100 * data_report["supervised_share"], data_report["tokens"],
                f"; Q-Former instructions of at most {instructions.max_length} tokens" if instructions else "")
    for name, part in data_report.get("sources", {}).items():
        logger.info("  source %s: %d samples, drawn with probability %.3f", name, part["samples"], part["probability"])
    collator = (PrefixLmCollator if encoder_decoder else PadCollator)(
        loaded.tokenizer.pad_token_id, loaded.processor,
        instruction_pad_token_id=instructions.pad_token_id if instructions else 0)
    result = train_stage(model, data.dataset, collator, stage.train, out,
                         eval_fn=eval_fn if stage.train.eval_every else None, dist=dist,
                         config_to_save=to_dict(stage), progress=progress, sampler=data.sampler)
    if stage.gradient_checkpointing:
        model.llm.set_activation_checkpointing(False)
    summary = {"steps": result.steps, "final_loss": result.final_loss, "trainable_parameters": trainable_parameters,
               "data": data_report,
               "seconds": sum(r.get("seconds", 0.0) for r in result.history if "loss" in r)}
    if dist.is_main:
        write_json(out / "summary.json", summary)
        save_vlm(loaded, out / "model")  # last: a complete model directory marks the stage as done
    barrier()
    return {**summary, "history": result.history}


def _feature_cache(loaded: LoadedVlm, stage: Stage, sources: list[SourceRecords], out: Path, progress: bool,
                   dist: DistContext) -> FeatureCache | None:
    """The stage's filled feature cache (rank 0 fills it, the others wait), or None when off."""
    if not stage.cache_vision_features:
        return None
    if stage.trainable.vision != "frozen":
        raise ValueError(f"stage {stage.name!r}: cache_vision_features needs trainable.vision: frozen "
                         f"(it is {stage.trainable.vision!r}); cached features would go stale as the tower trains")
    cache = FeatureCache.for_tower(out.parent / "feature_cache", loaded.model.vision, loaded.processor)
    if dist.is_main:
        paths = sorted({path for source in sources for path in source.image_paths()})
        encoded = cache.fill(paths, loaded.model.vision, loaded.processor, progress=progress)
        logger.info("stage %s: %d image(s) encoded into the feature cache %s, %d already there", stage.name,
                    encoded, cache.directory, len(paths) - encoded)
    barrier()
    return cache


def _finished_stage(out: Path) -> dict:
    """The summary and history a stage left on disk."""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return {**summary, "history": [json.loads(line) for line in lines if line.strip()], "skipped": True}


def _progress_eval(cfg: WorldEval, loaded: LoadedVlm):
    if not cfg.world:
        return None

    def evaluate(model, step):
        result = evaluate_vqa_on_world(loaded, cfg.world, "val", cfg.progress_limit_per_family, **_asking(cfg))
        return {"held_in_mean": result["held_in_mean"], "held_out_mean": result["held_out_mean"]}

    return evaluate


def evaluate_on_world(loaded: LoadedVlm, cfg: WorldEval, blind_baseline: bool | None = None) -> dict:
    """{'vqa': ...} on cfg's world and split, and 'blind' too where `blind_baseline` (default: cfg's) says."""
    ask = dict(split=cfg.split, limit_per_family=cfg.limit_per_family, **_asking(cfg))
    metrics = {"vqa": evaluate_vqa_on_world(loaded, cfg.world, **ask)}
    if cfg.blind_baseline if blind_baseline is None else blind_baseline:
        metrics["blind"] = evaluate_vqa_on_world(loaded, cfg.world, blind=True, **ask)
    return metrics


def _asking(cfg: WorldEval) -> dict:
    """How questions are put: prompt format, decoding, candidate ranking."""
    return {"template": cfg.template, "generation": cfg.generation, "rank_candidates": cfg.rank_candidates}


def run_vlm(recipe: VlmRecipe, run_dir: str | Path, progress: bool = True) -> dict:
    """Run every stage in order (skipping finished ones), then evaluate on the world if one is set."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not recipe.stages:
        raise ValueError("the recipe has no stages")
    recipe = fill_world(recipe)
    save_config(to_dict(recipe), run_dir / "config.yaml")
    dist = init_distributed()
    loaded: LoadedVlm | None = None
    stages: dict[str, dict] = {}
    for index, stage in enumerate(recipe.stages):
        out = stage_dir(run_dir, index, stage)
        if (out / "model" / CONFIG_FILE).is_file():
            logger.info("stage %s is already done (%s)", stage.name, out / "model")
            loaded = load_vlm(out / "model")
            stages[stage.name] = _finished_stage(out)
            continue
        seed_everything(stage.train.seed)  # the fresh connector's initial weights depend on it
        loaded = _start(recipe, stage, loaded)
        stages[stage.name] = run_stage(loaded, stage, out, progress, _progress_eval(recipe.eval, loaded), dist)
    metrics: dict = {}
    if recipe.eval.world and dist.is_main:
        metrics = evaluate_on_world(loaded, recipe.eval)
        write_json(run_dir / "metrics.json", metrics)
    return {"metrics": metrics, "stages": stages, "model": str(stage_dir(run_dir, len(recipe.stages) - 1,
                                                                         recipe.stages[-1]) / "model")}
