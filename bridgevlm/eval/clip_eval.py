"""Zero-shot classification and image<->text retrieval for contrastive models."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..data.captions import caption_pairs, encode_text, pad_texts
from ..data.images import ImageProcessor, load_image
from ..models.contrastive import ContrastiveModel, zero_shot_classifier
from .metrics import classification_accuracy, retrieval_recall

# Prompt ensemble for zero-shot classification, in the style of CLIP's templates: for data that does not
# say how it words a class (a world's `class_prompts` does).
ZERO_SHOT_TEMPLATES = ("a {}.", "a small {}.", "a large {}.", "a photo of a {}.", "a picture of a {}.",
                       "an image with a {}.", "a drawing of a {}.")


@torch.no_grad()
def embed_images(model: ContrastiveModel, processor: ImageProcessor, paths: Sequence[Path], batch_size: int = 128) -> torch.Tensor:
    chunks = []
    for start in range(0, len(paths), batch_size):
        pixels = torch.stack([processor.to_uint8(load_image(p)) for p in paths[start:start + batch_size]])
        chunks.append(model.encode_images(processor.normalize(pixels).to(_device(model))).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def embed_texts(model: ContrastiveModel, tokenizer, texts: Sequence[str], max_length: int | None = None,
                batch_size: int = 256) -> torch.Tensor:
    max_length = max_length or model.max_text_length
    chunks = []
    for start in range(0, len(texts), batch_size):
        ids, mask = pad_texts([encode_text(tokenizer, t, max_length) for t in texts[start:start + batch_size]],
                              tokenizer.pad_token_id)
        chunks.append(model.encode_texts(ids.to(_device(model)), mask.to(_device(model))).cpu())
    return torch.cat(chunks)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def zero_shot(model, tokenizer, processor, image_paths, labels: Sequence[str], classnames: Sequence[str],
              templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> dict:
    """Accuracy of classifying each image into `classnames` by prompt-ensemble similarity."""
    model.eval()
    weights = zero_shot_classifier(model, tokenizer, classnames, templates).cpu()
    predictions = (embed_images(model, processor, image_paths) @ weights.t()).argmax(-1)
    index = {name: i for i, name in enumerate(classnames)}
    return {"zeroshot_accuracy": classification_accuracy(predictions, [index[label] for label in labels]),
            "predictions": [classnames[i] for i in predictions.tolist()]}


def retrieval(model, tokenizer, processor, image_paths, captions: Sequence[str]) -> dict:
    """Recall@1/5/10 both ways. Identical caption strings all count as correct for an image."""
    model.eval()
    images = embed_images(model, processor, image_paths)
    unique = sorted(set(captions))
    texts = embed_texts(model, tokenizer, unique)
    column = {c: i for i, c in enumerate(unique)}
    positives = torch.zeros(len(captions), len(unique), dtype=torch.bool)
    positives[torch.arange(len(captions)), torch.tensor([column[c] for c in captions])] = True
    similarity = images @ texts.t()
    image_to_text = retrieval_recall(similarity, positives)
    # text -> image: each unique caption's positives are all the images it describes
    text_to_image = retrieval_recall(similarity.t(), positives.t())
    out = {f"recall_at_{k}": v for k, v in image_to_text.items()}
    out.update({f"text_recall_at_{k}": v for k, v in text_to_image.items()})
    return out


def evaluate_clip_on_world(model, tokenizer, processor, world_dir: str | Path, split: str = "test") -> dict:
    """The world's zero-shot classification (colour+shape classes, prompted in the world's own caption
    forms when world.json lists them as `class_prompts`) and caption retrieval metrics."""
    world_dir = Path(world_dir)
    world = json.loads((world_dir / "world.json").read_text(encoding="utf-8"))
    items = json.loads((world_dir / "eval" / split / "classify.json").read_text(encoding="utf-8"))
    images = world_dir / "images"
    pairs = caption_pairs(world_dir / "captions" / f"{split}.json")
    result = retrieval(model, tokenizer, processor, [images / p for p, _ in pairs], [c for _, c in pairs])
    if not items:  # a tiny world may have no single-object scene in this split
        return result
    result.update(zero_shot(model, tokenizer, processor, [images / it["image"] for it in items],
                       [it["label"] for it in items], world["classes"],
                       world.get("class_prompts") or ZERO_SHOT_TEMPLATES))
    predicted = result.pop("predictions")
    labels = [it["label"] for it in items]
    result["zeroshot_colour_accuracy"] = sum(p.split()[0] == t.split()[0] for p, t in zip(predicted, labels)) / len(labels)
    result["zeroshot_shape_accuracy"] = sum(p.split()[1] == t.split()[1] for p, t in zip(predicted, labels)) / len(labels)
    result["zeroshot_examples"] = len(labels)
    return result
