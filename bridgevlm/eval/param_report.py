"""Parameter efficiency of a recipe: what each stage trains against everything the model holds, by part.

The model is built from configs on the meta device (models/meta_build.py: no weights read or
allocated, so paper-size recipes are counted offline in a second), and each stage's `trainable` is
applied with the training loop's own `apply_trainability`, stage after stage as `run_vlm` chains
them (LoRA injected in one stage stays in the next), so the counts are those a run would train.

Parts: `vision`, the connector's parts (`connector.<child>`, or the `parts` a connector declares, e.g.
CROME's `visual.qformer`, `visual.language_projection`, `adapter`: the names `connector_parts` takes),
`llm`, and `<part> LoRA` for the LoRA adapters a stage adds to a pretrained part. A `blip2_stage1`
recipe is one stage: the frozen tower, the Q-Former and its ITC/ITM heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import follow_fields
from ..loading import find_model_dir
from ..models.assemble import CONFIG_FILE
from ..models.blip2_pretrain import QFormerPretrainer
from ..models.blip2_stage1 import Stage1Config, load_text_tokenizer
from ..models.connectors import QFormer
from ..models.meta_build import MetaVlm, Stage1Source, build_vlm_meta, load_vlm_meta, resolve_architecture
from ..models.vision import VisionTower
from ..recipes.blip2 import Blip2Stage1Recipe, pretrainer_configs, tokenizer_path
from ..recipes.registry import load_recipe
from ..recipes.vlm import VlmRecipe
from ..train.trainability import apply_trainability

LORA = "LoRA"


@dataclass
class PartCount:
    part: str
    trainable: int
    total: int


@dataclass
class StageCount:
    name: str
    parts: list[PartCount]

    @property
    def trainable(self) -> int:
        return sum(p.trainable for p in self.parts)

    @property
    def total(self) -> int:
        return sum(p.total for p in self.parts)


@dataclass
class RecipeReport:
    recipe: str
    task: str  # vlm | blip2_stage1
    model: dict[str, str]  # vision, connector, llm: what the recipe names
    stages: list[StageCount]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "task": self.task, "model": self.model, "notes": self.notes,
                "stages": [{"name": s.name, "trainable": s.trainable, "total": s.total,
                            "trainable_percent": percent(s.trainable, s.total),
                            "parts": [vars(p) for p in s.parts]} for s in self.stages]}


def percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


# ------------------------------------------------------------------------------------------------
# Counting
# ------------------------------------------------------------------------------------------------

def module_part_names(module: nn.Module) -> list[str]:
    """The dotted parts a module's parameters are grouped by: those it declares (`parts`), else its
    children that hold parameters and its own parameters."""
    declared = getattr(module, "parts", None)
    if declared:
        return list(declared)
    children = [name for name, child in module.named_children() if any(True for _ in child.parameters())]
    return children + [name for name, _ in module.named_parameters(recurse=False)]


def vlm_part_names(model: nn.Module) -> list[str]:
    return ["vision", *(f"connector.{name}" for name in module_part_names(model.connector)), "llm"]


def count_parameters(model: nn.Module, parts: Sequence[str]) -> list[PartCount]:
    """Trainable and total parameters of each of `parts` (dotted module paths; a parameter counts in
    the longest that holds it, else under its first name), LoRA adapters (`lora_` in the name, as
    `apply_trainability` tells them) apart as `<part> LoRA`. Shared parameters count once."""
    ordered = sorted(parts, key=len, reverse=True)
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        part = next((p for p in ordered if name == p or name.startswith(f"{p}.")), name.split(".", 1)[0])
        if "lora_" in name:
            part = f"{part} {LORA}"
        row = counts.setdefault(part, [0, 0])
        row[0] += param.numel() if param.requires_grad else 0
        row[1] += param.numel()
    order = [p for base in parts for p in (base, f"{base} {LORA}")]
    keys = [p for p in order if p in counts] + [p for p in counts if p not in order]
    return [PartCount(key, *counts[key]) for key in keys]


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------

def vlm_report(recipe: VlmRecipe, stage1: Stage1Source | None = None) -> tuple[list[StageCount], list[str]]:
    """Each stage's counts, the stages chained as `run_vlm` chains them, and notes on what was assumed."""
    if not recipe.stages:
        raise ValueError("the recipe has no stages")
    notes: list[str] = []
    built: MetaVlm | None = None
    stages = []
    for stage in recipe.stages:
        if stage.init == "base" or (stage.init == "previous" and built is None):
            built = build_vlm_meta(recipe.model, stage1=stage1)
        elif stage.init != "previous":
            built = _saved_or_recipe(recipe, stage.init, stage.name, stage1, notes)
        notes += [note for note in built.notes if note not in notes]
        with torch.device("meta"):  # LoRA adapters are made where the model is
            apply_trainability(built.model, stage.trainable, stage.lora)
        stages.append(StageCount(stage.name, count_parameters(built.model, vlm_part_names(built.model))))
    return stages, notes


def _saved_or_recipe(recipe: VlmRecipe, init: str, stage: str, stage1: Stage1Source | None,
                     notes: list[str]) -> MetaVlm:
    try:
        directory = find_model_dir(init)
    except FileNotFoundError:
        directory = None
    if directory is not None and (directory / CONFIG_FILE).is_file():
        return load_vlm_meta(directory)
    notes.append(f"stage {stage} starts from {init}, which is not a bridgevlm model here: counted as the "
                 f"recipe's model")
    return build_vlm_meta(recipe.model, stage1=stage1)


def stage1_configs(recipe: Blip2Stage1Recipe, vision_width: int, notes: list[str]):
    """(Q-Former config, objectives config) a stage-1 run of `recipe` would train: the vocabulary
    follows its tokenizer when that is a local directory, else the recipe's qformer.vocab_size stands."""
    path = tokenizer_path(recipe)
    if Path(path).is_dir():
        return pretrainer_configs(recipe, load_text_tokenizer(path), vision_width)
    notes.append(f"the stage-1 tokenizer {path} is not a local directory: the Q-Former's vocabulary is the "
                 f"recipe's qformer.vocab_size ({recipe.qformer.vocab_size}; BERT's 30522 + [DEC] by default)")
    qformer = follow_fields(recipe.qformer, "qformer", {"vision_width": (vision_width, "the vision tower's width")})
    return qformer, recipe.objectives


def _stage1_tower(recipe: Blip2Stage1Recipe, notes: list[str]) -> VisionTower:
    arch = resolve_architecture(recipe.vision.path, "vision.path")
    notes += [arch.note(recipe.vision.path)] if arch.note(recipe.vision.path) else []
    with torch.device("meta"):
        return VisionTower.from_config(recipe.vision, arch.config)


def stage1_report(recipe: Blip2Stage1Recipe) -> tuple[list[StageCount], list[str]]:
    """BLIP-2 stage 1 as one stage: the tower frozen, the Q-Former and heads trained (what no enabled
    objective reaches frozen, as QFormerPretrainer does)."""
    notes: list[str] = []
    tower = _stage1_tower(recipe, notes)
    qformer_cfg, objectives = stage1_configs(recipe, tower.feature_size, notes)
    with torch.device("meta"):
        model = QFormerPretrainer(tower, QFormer(qformer_cfg), objectives)
    return [StageCount("stage1", count_parameters(model, module_part_names(model)))], notes


def stage1_source(path: str | Path, overrides: Sequence[str] = ()) -> Stage1Source:
    """The stage-1 Q-Former a `blip2_stage1` recipe file would train, to stand in for a missing
    `connector.init` (with where it comes from, for notes and errors)."""
    task, recipe = load_recipe(path, overrides)
    if task != "blip2_stage1":
        raise ValueError(f"{path} is a {task!r} recipe; a Q-Former's sizes come from a 'blip2_stage1' recipe")
    notes: list[str] = []
    qformer_cfg, objectives = stage1_configs(recipe, _stage1_tower(recipe, notes).hidden_size, notes)
    return Stage1Config(qformer_cfg, objectives, recipe.vision), f"the stage-1 recipe {path}"


def report_recipe(path: str | Path, overrides: Sequence[str] = (),
                  stage1: Stage1Source | None = None) -> RecipeReport:
    """The parameter report of a `vlm` or `blip2_stage1` recipe file with dotted overrides."""
    task, recipe = load_recipe(path, overrides)
    if task == "vlm":
        stages, notes = vlm_report(recipe, stage1)
        model = {"vision": recipe.model.vision.path, "connector": recipe.model.connector.kind, "llm": recipe.model.llm}
        if any(n.startswith("connector.init") for n in notes) and stage1 is None:
            notes.append("give a finished stage-1 run as model.connector.init, or a stage-1 recipe with "
                         "`bridgevlm params --stage1 RECIPE`, for the Q-Former it would start from")
    elif task == "blip2_stage1":
        stages, notes = stage1_report(recipe)
        model = {"vision": recipe.vision.path, "connector": "qformer (BLIP-2 stage 1)"}
    else:
        raise ValueError(f"{path} is a {task!r} recipe; parameters are counted for 'vlm' and 'blip2_stage1' "
                         f"recipes")
    return RecipeReport(str(path), task, model, stages, notes)


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def compact(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def share(part: int, whole: int) -> str:
    return f"{percent(part, whole):.3g}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(row):
        cells = [f"{row[0]:<{widths[0]}}"] + [f"{cell:>{w}}" for cell, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(row) for row in rows)]


def format_report(report: RecipeReport) -> str:
    """The stage table (trainable, total, share) and the breakdown (each part's size and what each
    stage trains of it), then the notes."""
    model = ", ".join(f"{key} {value}" for key, value in report.model.items())
    lines = [f"{report.recipe} ({report.task}: {model})", ""]
    lines += _table(["stage", "trainable", "total", "trainable %"],
                    [[s.name, f"{s.trainable:,} ({compact(s.trainable)})", f"{s.total:,} ({compact(s.total)})",
                      share(s.trainable, s.total)] for s in report.stages])
    sizes: dict[str, int] = {}
    for stage in report.stages:  # a part's size: in the last stage that has it (LoRA appears when injected)
        sizes.update({p.part: p.total for p in stage.parts})
    trained = [{p.part: p.trainable for p in s.parts} for s in report.stages]
    rows = [[part, f"{size:,}", *(f"{t[part]:,}" if part in t else "-" for t in trained)]
            for part, size in sizes.items()]
    lines += ["", *_table(["part", "parameters", *(f"{s.name} trains" for s in report.stages)], rows)]
    if report.notes:
        lines += ["", "notes:", *(f"  - {note}" for note in report.notes)]
    return "\n".join(lines)
