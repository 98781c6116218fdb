"""Image<->text retrieval with a BLIP-2 stage-1 Q-Former: rank by ITC, then re-rank the top k by ITM.

ITC needs one Q-Former pass per image and per text; ITM needs one per (image, text) pair, so it
re-scores only the k best ITC candidates of each query, as BLIP-2's evaluation does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from ..data.captions import encode_text, pad_texts
from ..models.blip2_pretrain import query_text_similarity
from .metrics import retrieval_recall


class RetrievalModel(Protocol):
    """What the evaluation needs (QFormerPretrainer has it)."""

    def vision_features(self, batch: dict) -> torch.Tensor: ...
    def encode_image(self, vision_features: torch.Tensor) -> torch.Tensor: ...  # [B, Q, E]
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...  # [B, E]
    def match_logits(self, vision_features: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor: ...  # [B, 2]


@dataclass
class QFormerRetrievalConfig:
    rerank_top_k: int = 128  # ITC candidates per query that ITM re-scores (BLIP-2's k_test)
    batch_size: int = 64  # images, texts or pairs per Q-Former pass
    add_itc_to_itm: bool = True  # re-ranked score = ITM match logit + ITC similarity, as BLIP-2's evaluation
    ks: tuple[int, ...] = (1, 5, 10)

    def __post_init__(self):
        if self.rerank_top_k < 1 or self.batch_size < 1:
            raise ValueError("rerank_top_k and batch_size must be >= 1")


def _chunks(count: int, size: int):
    return (slice(start, min(start + size, count)) for start in range(0, count, size))


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def vision_features_of(model: RetrievalModel, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Pixel values [I, 3, H, W] through the model's frozen tower, or features [I, N, Dv] as they are."""
    if images.dim() == 3:
        return images
    if images.dim() != 4:
        raise ValueError(f"images of shape {tuple(images.shape)}; expected pixels [I, 3, H, W] or features [I, N, Dv]")
    device = _device(model)
    return torch.cat([model.vision_features({"pixel_values": images[part].to(device)}).cpu()
                      for part in _chunks(len(images), batch_size)])


@torch.no_grad()
def itc_similarity(model: RetrievalModel, features: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[I, T]: the best query-[CLS] cosine for every image-text pair."""
    device = _device(model)
    images = torch.cat([model.encode_image(features[part].to(device)).cpu()
                        for part in _chunks(len(features), batch_size)])  # [I, Q, E]
    texts = torch.cat([model.encode_text(input_ids[part].to(device), attention_mask[part].to(device)).cpu()
                       for part in _chunks(len(input_ids), batch_size)])  # [T, E]
    return torch.cat([query_text_similarity(images[part], texts) for part in _chunks(len(images), batch_size)])


@torch.no_grad()
def itm_rerank(model: RetrievalModel, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               similarity: torch.Tensor, cfg: QFormerRetrievalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-score each image's top-k texts and each text's top-k images (by ITC `similarity` [I, T])
    with ITM -> image->text scores [I, T] and text->image scores [T, I]. In each row the re-scored
    candidates rank first, by their new score; the others follow in ITC order."""
    num_images, num_texts = similarity.shape
    texts_of_image = similarity.topk(min(cfg.rerank_top_k, num_texts), dim=1).indices  # [I, k]
    images_of_text = similarity.t().topk(min(cfg.rerank_top_k, num_images), dim=1).indices  # [T, k']
    pair_images = torch.cat([torch.arange(num_images).repeat_interleave(texts_of_image.shape[1]),
                             images_of_text.flatten()])
    pair_texts = torch.cat([texts_of_image.flatten(),
                            torch.arange(num_texts).repeat_interleave(images_of_text.shape[1])])
    # A pair in both directions' top k is scored once.
    unique, position = torch.unique(pair_images * num_texts + pair_texts, return_inverse=True)
    scores = torch.empty(len(unique))
    device = _device(model)
    for part in _chunks(len(unique), cfg.batch_size):
        image, text = unique[part] // num_texts, unique[part] % num_texts
        logits = model.match_logits(features[image].to(device), input_ids[text].to(device),
                                    attention_mask[text].to(device))
        scores[part] = logits[:, 1].float().cpu()
    pair_scores = scores[position]
    if cfg.add_itc_to_itm:
        pair_scores = pair_scores + similarity[pair_images, pair_texts]
    split = texts_of_image.numel()
    image_to_text = _ranked_first(similarity, texts_of_image, pair_scores[:split].view_as(texts_of_image))
    text_to_image = _ranked_first(similarity.t(), images_of_text, pair_scores[split:].view_as(images_of_text))
    return image_to_text, text_to_image


def _ranked_first(base: torch.Tensor, chosen: torch.Tensor, chosen_scores: torch.Tensor) -> torch.Tensor:
    """base [R, C] with columns `chosen` [R, k] set to `chosen_scores` and every other entry
    shifted below them, in its base order (each row's base maximum is among the chosen)."""
    floor = chosen_scores.amin(dim=1, keepdim=True) - 1
    scores = base - base.amax(dim=1, keepdim=True) + floor
    return scores.scatter(1, chosen, chosen_scores)


def qformer_retrieval(model: RetrievalModel, images: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, positives: torch.Tensor,
                      cfg: QFormerRetrievalConfig | None = None) -> dict[str, float]:
    """Recall@k both ways, by ITC and after ITM re-ranking.

    images: pixels [I, 3, H, W] or vision features [I, N, Dv]; texts [T, L] as the model reads
    them; positives [I, T] bool (text j describes image i; every image and text needs one).
    Returns `itc_recall_at_k`, `itm_recall_at_k` (image -> text) and `itc_text_recall_at_k`,
    `itm_text_recall_at_k` (text -> image)."""
    cfg = cfg or QFormerRetrievalConfig()
    if positives.shape != (len(images), len(input_ids)):
        raise ValueError(f"positives is {tuple(positives.shape)}; expected [images, texts] = "
                         f"[{len(images)}, {len(input_ids)}]")
    was_training = model.training
    model.eval()
    try:
        features = vision_features_of(model, images, cfg.batch_size)
        similarity = itc_similarity(model, features, input_ids, attention_mask, cfg.batch_size)
        image_to_text, text_to_image = itm_rerank(model, features, input_ids, attention_mask, similarity, cfg)
    finally:
        model.train(was_training)
    results = {}
    for name, forward, backward in (("itc", similarity, similarity.t()), ("itm", image_to_text, text_to_image)):
        results.update({f"{name}_recall_at_{k}": v for k, v in retrieval_recall(forward, positives, cfg.ks).items()})
        results.update({f"{name}_text_recall_at_{k}": v
                        for k, v in retrieval_recall(backward, positives.t(), cfg.ks).items()})
    return results


def caption_retrieval(model: RetrievalModel, tokenizer, images: torch.Tensor, captions: Sequence[str],
                      max_text_length: int, cfg: QFormerRetrievalConfig | None = None) -> dict[str, float]:
    """`qformer_retrieval` over image-caption pairs (captions[i] describes images[i]). Identical
    captions become one candidate whose positives are all the images they describe."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; give one caption per image")
    unique = sorted(set(captions))
    column = {caption: j for j, caption in enumerate(unique)}
    input_ids, attention_mask = pad_texts([encode_text(tokenizer, c, max_text_length) for c in unique],
                                          tokenizer.pad_token_id)
    positives = torch.zeros(len(captions), len(unique), dtype=torch.bool)
    positives[torch.arange(len(captions)), torch.tensor([column[c] for c in captions])] = True
    return qformer_retrieval(model, images, input_ids, attention_mask, positives, cfg)
