import json

import pytest
import torch
import torch.nn.functional as F

import bridgevlm.eval.clip_eval as clip_eval
from bridgevlm.eval.clip_eval import ZERO_SHOT_TEMPLATES, evaluate_clip_on_world, retrieval, zero_shot

# No model runs here: the embeddings are fixed tensors looked up by image path / text.
TEXTS = {"a red circle": [1.0, 0.0, 0.0], "a blue square": [0.0, 1.0, 0.0], "a green star": [0.0, 0.0, 1.0]}


class _Model:
    def eval(self):
        return self


def _patch_embeddings(monkeypatch, images: dict, texts: dict | None = None):
    calls = {}

    def embed_images(model, processor, paths, batch_size=128):
        calls["images"] = [str(p) for p in paths]
        return torch.tensor([images[str(p)] for p in paths])

    def embed_texts(model, tokenizer, strings, max_length=96, batch_size=256):
        calls["texts"] = list(strings)
        return torch.tensor([texts[s] for s in strings])

    monkeypatch.setattr(clip_eval, "embed_images", embed_images)
    monkeypatch.setattr(clip_eval, "embed_texts", embed_texts)
    return calls


def test_retrieval_with_duplicate_captions(monkeypatch):
    images = {"i0": [0.9, 0.1, 0.0],   # caption red circle: nearest red circle         -> hit
              "i1": [0.8, 0.6, 0.0],   # caption blue square: red circle ranks first     -> miss at 1
              "i2": [0.2, 0.1, 0.7],   # caption red circle (a duplicate): green first   -> miss at 1
              "i3": [0.0, 0.3, 0.5]}   # caption green star: nearest green star          -> hit
    captions = ["a red circle", "a blue square", "a red circle", "a green star"]
    calls = _patch_embeddings(monkeypatch, images, TEXTS)
    out = retrieval(_Model(), None, None, list(images), captions)
    assert calls["texts"] == sorted(set(captions))  # each distinct caption embedded once
    # image -> text: 2 of 4 images rank their caption first; 3 candidates, so @5 and @10 are 1.
    assert out["recall_at_1"] == pytest.approx(0.5)
    assert out["recall_at_5"] == out["recall_at_10"] == 1.0
    # text -> image: "a red circle" has two positive images (i0 scores 0.9, the best) -> hit;
    # "a blue square": i1 scores 0.6, the best -> hit; "a green star": i2 (0.7) beats i3 (0.5) -> miss.
    assert out["text_recall_at_1"] == pytest.approx(2 / 3)
    assert out["text_recall_at_5"] == out["text_recall_at_10"] == 1.0
    assert set(out) == {"recall_at_1", "recall_at_5", "recall_at_10",
                        "text_recall_at_1", "text_recall_at_5", "text_recall_at_10"}


def test_retrieval_counts_every_image_of_a_duplicate_caption(monkeypatch):
    # The distinct captions are the candidates: "a red circle" (shared by i0 and i1), "a green star".
    images = {"i0": [0.0, 0.9, 0.1],  # red circle 0.0 < green star 0.1 -> miss
              "i1": [1.0, 0.0, 0.0],  # red circle 1.0 -> hit
              "i2": [0.0, 0.2, 0.9]}  # green star 0.9 -> hit
    captions = ["a red circle", "a red circle", "a green star"]
    _patch_embeddings(monkeypatch, images, TEXTS)
    out = retrieval(_Model(), None, None, list(images), captions)
    assert out["recall_at_1"] == pytest.approx(2 / 3)
    # text -> image: "a red circle" ranks i1 first, one of its two images -> hit (with only i0 as
    # its positive it would miss); "a green star" ranks i2 first -> hit.
    assert out["text_recall_at_1"] == pytest.approx(1.0)


def test_zero_shot_accuracy(monkeypatch):
    classnames = ["red circle", "blue square", "green star"]
    weights = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), dim=-1)
    seen = {}

    def classifier(model, tokenizer, names, templates):
        seen["names"], seen["templates"] = list(names), tuple(templates)
        return weights

    monkeypatch.setattr(clip_eval, "zero_shot_classifier", classifier)
    images = {"p0": [2.0, 0.1],    # red circle
              "p1": [0.1, 3.0],    # blue square
              "p2": [-1.0, -0.5],  # green star
              "p3": [0.5, 0.4]}    # red circle (0.5 > 0.4)
    _patch_embeddings(monkeypatch, images)
    labels = ["red circle", "blue square", "blue square", "green star"]
    out = zero_shot(_Model(), None, None, list(images), labels, classnames)
    assert out["predictions"] == ["red circle", "blue square", "green star", "red circle"]
    assert out["zeroshot_accuracy"] == pytest.approx(0.5)
    assert seen == {"names": classnames, "templates": ZERO_SHOT_TEMPLATES}


@pytest.mark.parametrize("class_prompts", [None, ["a small {}.", "There is 1 object. At the top left, a large {}."]])
def test_evaluate_clip_on_world_splits_colour_and_shape(monkeypatch, tmp_path, class_prompts):
    classes = ["red circle", "red square", "blue circle", "blue square"]
    (tmp_path / "eval" / "test").mkdir(parents=True)
    (tmp_path / "captions").mkdir()
    world = {"classes": classes, **({"class_prompts": class_prompts} if class_prompts else {})}
    (tmp_path / "world.json").write_text(json.dumps(world))
    items = [{"id": "a", "image": "test/a.png", "label": "red circle"},
             {"id": "b", "image": "test/b.png", "label": "red circle"},
             {"id": "c", "image": "test/c.png", "label": "blue square"},
             {"id": "d", "image": "test/d.png", "label": "blue circle"}]
    (tmp_path / "eval" / "test" / "classify.json").write_text(json.dumps(items))
    pairs = [{"id": "e", "image": "test/e.png", "conversations": [
                 {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red circle"}]},
             {"id": "f", "image": "test/f.png", "conversations": [
                 {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a green star"}]}]
    (tmp_path / "captions" / "test.json").write_text(json.dumps(pairs))
    prompted = []

    def classifier(model, tokenizer, names, templates):
        prompted.append((list(names), tuple(templates)))
        return torch.eye(4)

    monkeypatch.setattr(clip_eval, "zero_shot_classifier", classifier)
    one_hot = {name: [float(i == j) for j in range(4)] for i, name in enumerate(classes)}
    images = {"a": one_hot["red circle"],   # right
              "b": one_hot["red square"],   # colour right, shape wrong
              "c": one_hot["blue square"],  # right
              "d": one_hot["red square"],   # both wrong
              "e": [1.0, 0.0, 0.0, 0.0], "f": [0.0, 0.0, 1.0, 0.0]}
    images = {str(tmp_path / "images" / "test" / f"{k}.png"): v for k, v in images.items()}
    texts = {"a red circle": [1.0, 0.0, 0.0, 0.0], "a green star": [0.0, 0.0, 0.0, 1.0]}
    _patch_embeddings(monkeypatch, images, texts)
    out = evaluate_clip_on_world(_Model(), None, None, tmp_path, "test")
    assert out["zeroshot_accuracy"] == pytest.approx(0.5)
    assert out["zeroshot_colour_accuracy"] == pytest.approx(0.75)
    assert out["zeroshot_shape_accuracy"] == pytest.approx(0.5)
    assert out["zeroshot_examples"] == 4
    # the world's own caption forms when it lists them, else the generic CLIP-style ensemble
    assert prompted == [(classes, tuple(class_prompts or ZERO_SHOT_TEMPLATES))]
    # e -> "a red circle" (hit); f scores 0 against both captions: a tie counts as a miss.
    assert out["recall_at_1"] == pytest.approx(0.5)
    assert out["text_recall_at_1"] == pytest.approx(0.5)
