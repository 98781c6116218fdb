"""BLIP-2 stage 1: a Q-Former learns to read a frozen vision tower from image-caption pairs (ITC, ITM
and ITG), is evaluated by image<->text retrieval, and is saved for stage 2 to start from.

`run_dir/model` is a stage-1 model directory (models/blip2_stage1.py): `load_stage1_qformer(dir)`
rebuilds the Q-Former from it alone, and a `vlm` recipe's `connector.init` starts stage 2 from it.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import follow_fields, save_config, to_dict
from ..data.captions import caption_pairs, encode_text, pad_texts
from ..data.feature_cache import FeatureCache
from ..data.images import ImageProcessor, load_image
from ..eval.qformer_retrieval import QFormerRetrievalConfig, caption_retrieval
from ..io import write_json
from ..models.blip2_pretrain import Blip2PretrainConfig, QFormerPretrainer
from ..models.blip2_stage1 import load_text_tokenizer, save_stage1
from ..models.connectors.qformer import QFormer, QFormerConfig
from ..models.vision import VisionTower, VisionTowerConfig
from ..train.distributed import DistContext, barrier, init_distributed
from ..train.loop import TrainConfig, seed_everything, train_stage
from .backbones import SHIPPED


def _embedded_qformer() -> QFormerConfig:
    """Sized for the embedded 128-wide tower on one CPU core, about 0.6 s a step at batch 32
    (QFormerConfig's defaults stay BLIP-2's). Shapes captions are at most 56 tokens."""
    return QFormerConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, num_query_tokens=8,
                         max_position_embeddings=64, lm_head="tied")


@dataclass
class RetrievalEval:
    split: str = "val"  # retrieval on <world>/captions/<split>.json; empty: no evaluation
    retrieval: QFormerRetrievalConfig = field(default_factory=lambda: QFormerRetrievalConfig(rerank_top_k=16))


@dataclass
class Blip2Stage1Recipe:
    world: str = ""  # data root: `captions` and `image_folder` are relative to it
    # Caption files (LLaVA pre-training records or COCO captions); every (image, caption) pair is a sample.
    captions: list[str] = field(default_factory=lambda: ["captions/train.json", "captions_short/train.json"])
    image_folder: str = "images"
    vision: VisionTowerConfig = field(default_factory=lambda: VisionTowerConfig(
        path=str(SHIPPED / "clip"), feature_layer=-2, select="full"))  # BLIP-2 reads every token of layer -2
    # vocab_size and pad_token_id follow the tokenizer, vision_width the tower: leave them unset.
    qformer: QFormerConfig = field(default_factory=_embedded_qformer)
    bert: str | None = None  # a local BERT directory (safetensors) to initialise the Q-Former from, as BLIP-2
    tokenizer: str | None = None  # None: `bert`'s own tokenizer, or the shipped one without `bert`
    # dec_token_id and cls_token_id follow the tokenizer: leave them unset.
    objectives: Blip2PretrainConfig = field(default_factory=lambda: Blip2PretrainConfig(embed_dim=128,
                                                                                        max_text_length=64))
    # The tower is frozen: encode each image once into <run>/feature_cache and read it every epoch.
    cache_vision_features: bool = True
    eval: RetrievalEval = field(default_factory=RetrievalEval)
    train: TrainConfig = field(default_factory=TrainConfig)


# ------------------------------------------------------------------------------------------------
# Text, data and model
# ------------------------------------------------------------------------------------------------

def tokenizer_path(recipe: Blip2Stage1Recipe) -> str:
    return recipe.tokenizer or recipe.bert or str(SHIPPED / "tokenizer")


def build_pretrainer(recipe: Blip2Stage1Recipe, tokenizer, vision: nn.Module | None,
                     vision_width: int) -> QFormerPretrainer:
    """A fresh (or BERT-initialised) Q-Former with its stage-1 heads. The vocabulary is the
    tokenizer's plus [DEC] at id len(tokenizer), which no text token can take."""
    qformer_cfg, objectives = pretrainer_configs(recipe, tokenizer, vision_width)
    if recipe.bert:
        _check_bert_vocabulary(recipe.bert, len(tokenizer))
        qformer = QFormer.from_bert(recipe.bert, qformer_cfg)
    else:
        qformer = QFormer(qformer_cfg)
    return QFormerPretrainer(vision, qformer, objectives)


def pretrainer_configs(recipe: Blip2Stage1Recipe, tokenizer,
                       vision_width: int) -> tuple[QFormerConfig, Blip2PretrainConfig]:
    """The recipe's Q-Former and objectives configs with the fields that follow the tokenizer and the
    tower filled in: the architecture a stage-1 run of `recipe` trains and saves."""
    size = len(tokenizer)
    qformer_cfg = follow_fields(recipe.qformer, "qformer", {
        "vocab_size": (size + 1, f"the tokenizer: {size} tokens + [DEC]"),
        "pad_token_id": (tokenizer.pad_token_id, "the tokenizer's padding"),
        "vision_width": (vision_width, "the vision tower's width")})
    objectives = follow_fields(recipe.objectives, "objectives", {
        "dec_token_id": (size, "the tokenizer: [DEC] comes after its last token"),
        "cls_token_id": (tokenizer.bos_token_id, "the tokenizer's first token of every text")})
    return qformer_cfg, objectives


def _check_bert_vocabulary(bert: str, tokenizer_size: int) -> None:
    config = Path(bert) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"bert: {config} does not exist; give a local BERT directory")
    vocab = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
    if vocab != tokenizer_size:
        raise ValueError(f"BERT at {bert} has {vocab} word embeddings but the tokenizer has {tokenizer_size} "
                         "tokens; use BERT's own tokenizer (leave `tokenizer` unset)")


class CaptionSamples(Dataset):
    """Image-caption pairs as QFormerPretrainer reads them: the image's cached tower features
    [N, Dv] (or uint8 pixels without a cache), the tokenised caption, and an id shared by every
    caption of the same image (so they are never each other's hard negatives)."""

    def __init__(self, pairs: Sequence[tuple[str, str]], image_folder: Path, tokenizer, max_text_length: int,
                 features: FeatureCache | None, processor: ImageProcessor):
        self.pairs, self.image_folder = list(pairs), Path(image_folder)
        self.tokenizer, self.max_text_length = tokenizer, max_text_length
        self.features, self.processor = features, processor
        ids: dict[str, int] = {}
        self.image_ids = [ids.setdefault(image, len(ids)) for image, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image, caption = self.pairs[index]
        path = self.image_folder / image
        sample = {"text_ids": encode_text(self.tokenizer, caption, self.max_text_length),
                  "image_id": self.image_ids[index]}
        if self.features is not None:
            sample["features"] = self.features.get(path)
        else:
            sample["pixels"] = self.processor.to_uint8(load_image(path, sample=str(index)))
        return sample


@dataclass
class CaptionCollator:
    pad_token_id: int
    processor: ImageProcessor  # normalises pixels once per batch

    def __call__(self, samples: Sequence[dict]) -> dict:
        ids, mask = pad_texts([s["text_ids"] for s in samples], self.pad_token_id)
        batch = {"input_ids": ids, "attention_mask": mask,
                 "image_ids": torch.tensor([s["image_id"] for s in samples])}
        if "features" in samples[0]:
            batch["vision_features"] = torch.stack([s["features"] for s in samples])  # [B, N, Dv]
        else:
            batch["pixel_values"] = self.processor.normalize(torch.stack([s["pixels"] for s in samples]))
        return batch


def _filled_cache(tower: VisionTower, processor: ImageProcessor, paths: Sequence[Path], root: Path,
                  dist: DistContext, progress: bool) -> FeatureCache:
    """Rank 0 encodes what is missing; the others wait and read."""
    cache = FeatureCache.for_tower(root, tower, processor)
    if dist.is_main:
        cache.fill(sorted({str(p) for p in paths}), tower, processor, progress=progress)
    barrier()
    return cache


def _eval_images(paths: Sequence[Path], cache: FeatureCache | None, processor: ImageProcessor) -> torch.Tensor:
    """Cached features [I, N, Dv], or normalised pixels [I, 3, H, W] for the model's tower."""
    if cache is not None:
        return torch.stack([cache.get(p) for p in paths])
    return processor.batch([load_image(p) for p in paths])


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def run_blip2_stage1(recipe: Blip2Stage1Recipe, run_dir: str | Path, progress: bool = True) -> dict:
    """Train the Q-Former with `train_stage` (resuming from run_dir/checkpoints), evaluate
    retrieval on `eval.split`, save run_dir/model and run_dir/metrics.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(to_dict(recipe), run_dir / "config.yaml")
    dist = init_distributed()
    tokenizer = load_text_tokenizer(tokenizer_path(recipe))
    tower = VisionTower.from_pretrained(recipe.vision)
    processor = ImageProcessor.from_pretrained(recipe.vision.path, image_size=tower.image_size)

    world = Path(recipe.world)
    images = world / recipe.image_folder
    pairs = [pair for name in recipe.captions for pair in caption_pairs(world / name)]
    eval_pairs = caption_pairs(world / "captions" / f"{recipe.eval.split}.json") if recipe.eval.split else []
    eval_paths = [images / image for image, _ in eval_pairs]
    cache = None
    if recipe.cache_vision_features:
        cache = _filled_cache(tower, processor, [images / image for image, _ in pairs] + eval_paths,
                              run_dir / "feature_cache", dist, progress)

    seed_everything(recipe.train.seed)  # before building: initial weights depend on it
    model = build_pretrainer(recipe, tokenizer, None if cache else tower, tower.feature_size)
    max_length = model.config.max_text_length
    dataset = CaptionSamples(pairs, images, tokenizer, max_length, cache, processor)
    evaluate = None
    if eval_pairs:  # every rank passes it (the loop waits for rank 0's evaluation); only rank 0 calls it
        eval_images = functools.cache(lambda: _eval_images(eval_paths, cache, processor))

        def evaluate(trained, step):
            metrics = caption_retrieval(trained, tokenizer, eval_images(), [c for _, c in eval_pairs], max_length,
                                        recipe.eval.retrieval)
            return {name: float(value) for name, value in metrics.items()}

    result = train_stage(model, dataset, CaptionCollator(tokenizer.pad_token_id, processor), recipe.train, run_dir,
                         eval_fn=evaluate, dist=dist, config_to_save=to_dict(recipe), progress=progress)
    summary = {"steps": result.steps, "history": result.history, "model": str(run_dir / "model")}
    if not dist.is_main:  # rank 0 saves and evaluates; the others are done
        return {"metrics": {}, **summary}
    save_stage1(model, recipe.vision, tokenizer, run_dir / "model")
    metrics = _final_evaluation(result.history, result.steps)
    if metrics is None and evaluate is not None:  # the run was already finished: nothing was evaluated
        metrics = evaluate(model, result.steps)
    write_json(run_dir / "metrics.json", metrics or {})
    return {"metrics": metrics or {}, **summary}


def _final_evaluation(history: list[dict], step: int) -> dict | None:
    """The evaluation the loop ran at the last step, if it ran one (no need to repeat it)."""
    for record in reversed(history):
        evaluated = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
        if evaluated and record["step"] == step:
            return evaluated
    return None

