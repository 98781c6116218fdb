"""Q-Former retrieval: exact recalls on hand-built ITC/ITM scores, re-ranking, and a tiny real model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bridgevlm.eval.qformer_retrieval as qr
from bridgevlm.eval.metrics import retrieval_recall
from bridgevlm.eval.qformer_retrieval import QFormerRetrievalConfig, itm_rerank, qformer_retrieval
from bridgevlm.models.blip2_pretrain import Blip2PretrainConfig, QFormerPretrainer, query_text_similarity
from bridgevlm.models.connectors.qformer import QFormer, QFormerConfig

pytestmark = pytest.mark.usefixtures("single_thread")

# ITC prefers the wrong text for images 0 and 2, and the wrong image for texts 0 and 1.
ITC = torch.tensor([[0.5, 0.9, 0.1],
                    [0.2, 0.8, 0.3],
                    [0.7, 0.1, 0.6]])


class TableModel(nn.Module):
    """Images and texts are their indices; ITC similarity and ITM logits come from tables.

    Image i's two queries split ITC[i] between them, so the similarity is the max over queries."""

    def __init__(self, itc: torch.Tensor, itm: torch.Tensor):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        low = torch.where(torch.arange(itc.shape[1]) % 2 == 0, itc, itc - 1)
        high = torch.where(torch.arange(itc.shape[1]) % 2 == 1, itc, itc - 1)
        self.image_embeds = torch.stack([low, high], dim=1)  # [I, 2, T]
        self.itm = itm
        self.scored = []

    def vision_features(self, batch):
        raise AssertionError("the tests give vision features")

    def encode_image(self, features):  # features [B, 1, 1] hold the image index
        return self.image_embeds[features[:, 0, 0].long()]

    def encode_text(self, input_ids, attention_mask):  # one-hot: similarity = the image's table entry
        return torch.eye(self.image_embeds.shape[-1])[input_ids[:, 0]]

    def match_logits(self, features, input_ids, attention_mask):
        images, texts = features[:, 0, 0].long(), input_ids[:, 0]
        self.scored += list(zip(images.tolist(), texts.tolist()))
        return torch.stack([torch.zeros(len(texts)), self.itm[images, texts]], dim=1)


def evaluate(itm: torch.Tensor, **cfg) -> tuple[dict, TableModel]:
    model = TableModel(ITC, itm)
    features = torch.arange(3.0).view(3, 1, 1)
    ids = torch.arange(3).view(3, 1)
    results = qformer_retrieval(model, features, ids, torch.ones_like(ids), torch.eye(3, dtype=torch.bool),
                                QFormerRetrievalConfig(ks=(1, 2), **cfg))
    return results, model


def test_itm_reranking_fixes_what_itc_ranks_wrong():
    results, model = evaluate(5 * torch.eye(3), rerank_top_k=2, batch_size=2)
    assert results == pytest.approx({
        "itc_recall_at_1": 1 / 3, "itc_recall_at_2": 1.0, "itc_text_recall_at_1": 1 / 3, "itc_text_recall_at_2": 1.0,
        "itm_recall_at_1": 1.0, "itm_recall_at_2": 1.0, "itm_text_recall_at_1": 1.0, "itm_text_recall_at_2": 1.0})
    # Only each query's top 2 by ITC are scored, and a pair in both directions' top 2 only once.
    image_top = {(i, t) for i in range(3) for t in ITC[i].topk(2).indices.tolist()}
    text_top = {(i, t) for t in range(3) for i in ITC[:, t].topk(2).indices.tolist()}
    assert sorted(model.scored) == sorted(image_top | text_top)
    trained = TableModel(ITC, 5 * torch.eye(3)).train()
    qformer_retrieval(trained, torch.arange(3.0).view(3, 1, 1), torch.arange(3).view(3, 1),
                      torch.ones(3, 1, dtype=torch.long), torch.eye(3, dtype=torch.bool))
    assert trained.training  # the evaluation puts the model back in its mode


def test_candidates_outside_the_top_k_keep_their_itc_order():
    results, _ = evaluate(5 * torch.eye(3), rerank_top_k=1)
    # With k = 1 the re-scored candidate is ITC's own first choice: ITC's ranking is unchanged.
    for k in (1, 2):
        assert results[f"itm_recall_at_{k}"] == results[f"itc_recall_at_{k}"]
        assert results[f"itm_text_recall_at_{k}"] == results[f"itc_text_recall_at_{k}"]


def test_itc_similarity_is_added_to_the_itm_score_by_default():
    weak = 0.3 * torch.eye(3)  # image 0: ITM 0.3 + ITC 0.5 = 0.8 loses to 0 + 0.9
    assert evaluate(weak, rerank_top_k=3)[0]["itm_recall_at_1"] == pytest.approx(2 / 3)
    assert evaluate(weak, rerank_top_k=3, add_itc_to_itm=False)[0]["itm_recall_at_1"] == 1.0


def test_only_the_top_k_are_rescored():
    itm = torch.zeros(3, 3)
    itm[0, 2] = 2.0  # ITM would pair image 0 with text 2, which ITC ranks last both ways

    def rerank(k):
        return itm_rerank(TableModel(ITC, itm), torch.arange(3.0).view(3, 1, 1), torch.arange(3).view(3, 1),
                          torch.ones(3, 1, dtype=torch.long), ITC,
                          QFormerRetrievalConfig(rerank_top_k=k, add_itc_to_itm=False))

    image_to_text, text_to_image = rerank(2)
    assert image_to_text.shape == text_to_image.shape == (3, 3)
    assert image_to_text[0, 2] < image_to_text[0, :2].min()
    assert text_to_image[2, 0] < text_to_image[2, 1:].min()
    image_to_text, text_to_image = rerank(3)
    assert image_to_text[0].argmax().item() == 2 and text_to_image[2].argmax().item() == 0


def tiny_pretrainer() -> QFormerPretrainer:
    torch.manual_seed(0)
    qformer = QFormer(QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                                    num_query_tokens=4, vision_width=24, vocab_size=400, max_position_embeddings=16,
                                    dropout=0.0, lm_head="tied"))
    return QFormerPretrainer(None, qformer, Blip2PretrainConfig(embed_dim=16, max_text_length=12, dec_token_id=399))


def test_a_tiny_qformer_end_to_end_and_batch_size_does_not_matter():
    model = tiny_pretrainer()
    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 5, 24, generator=g)
    ids = torch.randint(2, 399, (6, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 3:] = 0
    positives = torch.eye(6, dtype=torch.bool)
    small, large = (qformer_retrieval(model, features, ids, mask, positives,
                                      QFormerRetrievalConfig(rerank_top_k=3, batch_size=size)) for size in (2, 64))
    assert small == pytest.approx(large)
    assert set(small) == {f"{m}_{d}recall_at_{k}" for m in ("itc", "itm") for d in ("", "text_") for k in (1, 5, 10)}
    with torch.no_grad():
        similarity = query_text_similarity(model.encode_image(features), model.encode_text(ids, mask))
    expected = retrieval_recall(similarity, positives)
    assert all(small[f"itc_recall_at_{k}"] == pytest.approx(v) for k, v in expected.items())
    assert model.training  # the evaluation puts it back in training mode


def test_caption_retrieval_merges_identical_captions(tokenizer, monkeypatch):
    seen = {}

    def capture(model, images, input_ids, attention_mask, positives, cfg=None):
        seen.update(ids=input_ids, mask=attention_mask, positives=positives)
        return {}

    monkeypatch.setattr(qr, "qformer_retrieval", capture)
    captions = ["a red circle", "a blue square", "a red circle", "the quick brown fox"]
    qr.caption_retrieval(tiny_pretrainer(), tokenizer, torch.zeros(4, 5, 24), captions, max_text_length=12)
    unique = sorted(set(captions))
    expected = torch.zeros(4, 3, dtype=torch.bool)
    for image, caption in enumerate(captions):
        expected[image, unique.index(caption)] = True
    assert torch.equal(seen["positives"], expected)
    assert (seen["ids"][:, 0] == tokenizer.bos_token_id).all()  # BOS is the summary ([CLS]) token
    assert seen["ids"].shape[1] <= 12
    with pytest.raises(ValueError, match="one caption per image"):
        qr.caption_retrieval(tiny_pretrainer(), tokenizer, torch.zeros(3, 5, 24), captions, max_text_length=12)


def test_pixels_go_through_the_frozen_tower():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from bridgevlm.models.vision import VisionTower

    torch.manual_seed(0)
    tower = VisionTower(CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=24,
                                                         intermediate_size=48, num_hidden_layers=2,
                                                         num_attention_heads=2)))
    model = tiny_pretrainer()
    model = QFormerPretrainer(tower, model.qformer, model.config)
    pixels = torch.randn(4, 3, 32, 32)
    ids = torch.randint(2, 399, (4, 5))
    args = (ids, torch.ones_like(ids), torch.eye(4, dtype=torch.bool), QFormerRetrievalConfig(batch_size=3))
    with torch.no_grad():
        features = tower(pixels)
    assert qformer_retrieval(model, pixels, *args) == pytest.approx(qformer_retrieval(model, features, *args))
    with pytest.raises(ValueError, match="expected pixels"):
        qformer_retrieval(model, pixels[:, None], *args)
