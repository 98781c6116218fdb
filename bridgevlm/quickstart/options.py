"""What `bridgevlm quickstart` runs: its options and the recipes each bridge trains by."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..recipes.backbones import SHIPPED

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
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


def say(options: QuickstartOptions, message: str) -> None:
    if options.progress:
        print(message, flush=True)
