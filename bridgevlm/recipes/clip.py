"""Contrastive (CLIP) training on image-caption pairs, evaluated by zero-shot classification and retrieval."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from ..config import save_config, to_dict
from ..data.captions import ImageCaptionCollator, ImageCaptionDataset, caption_pairs
from ..data.hard_negatives import WordSwapNegatives
from ..data.images import ImageProcessor
from ..eval.clip_eval import evaluate_clip_on_world
from ..io import write_json
from ..models.contrastive import ContrastiveModel, TinyClipConfig, build_tiny_clip
from ..train.distributed import init_distributed
from ..train.loop import TrainConfig, seed_everything, train_stage


@dataclass
class ClipRecipe:
    world: str = ""  # world directory: images/, captions/, eval/
    tokenizer: str = ""  # tokenizer directory (Hugging Face format)
    pretrained: str | None = None  # a CLIPModel directory to start from; None builds `model` from scratch
    model: TinyClipConfig = field(default_factory=TinyClipConfig)
    # Caption files (LLaVA pre-training form) relative to the world; every (image, caption) pair is a sample.
    captions: list[str] = field(default_factory=lambda: ["captions/train.json", "captions_short/train.json"])
    # Word classes for NegCLIP hard negatives (one word swapped within its class); empty: none.
    hard_negative_words: list[list[str]] = field(default_factory=list)
    eval_split: str = "val"
    train: TrainConfig = field(default_factory=TrainConfig)


def run_clip(recipe: ClipRecipe, run_dir: str | Path, progress: bool = True) -> dict:
    """Train, evaluate on `eval_split`, save a `transformers`-loadable CLIPModel to run_dir/model."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(to_dict(recipe), run_dir / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer)
    seed_everything(recipe.train.seed)  # before building: initial weights depend on it
    clip = ContrastiveModel.from_pretrained(recipe.pretrained) if recipe.pretrained else ContrastiveModel(
        build_tiny_clip(recipe.model, tokenizer))
    image_size = clip.clip.config.vision_config.image_size
    processor = ImageProcessor(size=image_size)

    world = Path(recipe.world)
    pairs = [pair for name in recipe.captions for pair in caption_pairs(world / name)]
    negatives = WordSwapNegatives(recipe.hard_negative_words, recipe.train.seed) if recipe.hard_negative_words else None
    dataset = ImageCaptionDataset(pairs, world / "images", tokenizer, processor, recipe.model.max_text_length, negatives)
    collate = ImageCaptionCollator(processor, tokenizer.pad_token_id)

    def evaluate(model, step):
        return _scalars(evaluate_clip_on_world(model, tokenizer, processor, world, recipe.eval_split))

    dist = init_distributed()
    result = train_stage(clip, dataset, collate, recipe.train, run_dir, eval_fn=evaluate, dist=dist,
                         config_to_save=to_dict(recipe), progress=progress)
    if not dist.is_main:  # rank 0 saves and evaluates; the others are done
        return {"metrics": {}, "steps": result.steps, "history": result.history}
    clip.clip.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    metrics = _scalars(evaluate_clip_on_world(clip, tokenizer, processor, world, recipe.eval_split))
    write_json(run_dir / "metrics.json", metrics)
    return {"metrics": metrics, "steps": result.steps, "history": result.history}


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
