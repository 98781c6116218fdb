"""The frozen-tower feature cache: exact features, content-keyed, invalidated by weights or preprocessing."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from bridgevlm.config import from_dict
from bridgevlm.data.feature_cache import FEATURES, INDEX, FeatureCache
from bridgevlm.data.images import ImageLoadError
from bridgevlm.models.assemble import VlmConfig, build_vlm
from bridgevlm.models.vision import VisionTower


@pytest.fixture
def parts(vlm_parts, single_thread):
    torch.manual_seed(0)
    loaded = build_vlm(from_dict(VlmConfig, vlm_parts))
    return loaded.model.vision, loaded.processor


def _images(folder, colours):
    folder.mkdir(exist_ok=True)
    paths = []
    for i, colour in enumerate(colours):
        path = folder / f"{i}.png"
        Image.new("RGB", (40, 30), colour).save(path)
        paths.append(str(path))
    return paths


def test_cached_features_equal_the_tower_and_each_image_is_encoded_once(parts, tmp_path):
    tower, processor = parts
    paths = _images(tmp_path / "img", [(255, 0, 0), (0, 255, 0), (255, 0, 0)])  # 0 and 2 share content
    cache = FeatureCache.for_tower(tmp_path / "cache", tower, processor)
    assert cache.fill(paths, tower, processor, batch_size=2, progress=False) == 2
    with torch.no_grad():
        expected = tower(processor.normalize(torch.stack([processor.to_uint8(Image.open(p).convert("RGB"))
                                                          for p in paths])))
    for path, features in zip(paths, expected):
        assert torch.equal(cache.get(path), features)
    assert cache.fill(paths, tower, processor, progress=False) == 0
    reopened = FeatureCache(cache.directory)  # a fresh process: keys come from the files' content
    assert torch.equal(reopened.get(paths[1]), expected[1])


def test_fingerprint_changes_with_weights_or_preprocessing(parts, tmp_path):
    tower, processor = parts
    first = FeatureCache.for_tower(tmp_path, tower, processor).directory
    other_aspect = dataclasses.replace(processor, aspect="crop" if processor.aspect == "pad" else "pad")
    assert FeatureCache.for_tower(tmp_path, tower, other_aspect).directory != first
    two_layers = VisionTower(tower.model, feature_layer=[tower.feature_layer, -1], select=tower.select)
    assert FeatureCache.for_tower(tmp_path, two_layers, processor).directory != first
    with torch.no_grad():
        next(tower.parameters()).add_(1e-3)
    assert FeatureCache.for_tower(tmp_path, tower, processor).directory != first


def test_an_interrupted_fill_is_overwritten_and_unknown_images_are_named(parts, tmp_path):
    tower, processor = parts
    paths = _images(tmp_path / "img", [(1, 2, 3), (4, 5, 6)])
    cache = FeatureCache.for_tower(tmp_path / "cache", tower, processor)
    cache.fill(paths[:1], tower, processor, progress=False)
    with open(cache.directory / FEATURES, "ab") as f:  # rows written, index never updated
        f.write(b"\0" * 1000)
    cache.fill(paths, tower, processor, progress=False)
    assert json.loads((cache.directory / INDEX).read_text()) == {k: v for k, v in cache.index.items()}
    with torch.no_grad():
        expected = tower(processor.normalize(processor.to_uint8(Image.open(paths[1]).convert("RGB"))[None]))[0]
    assert torch.equal(cache.get(paths[1]), expected)
    other = _images(tmp_path / "other", [(9, 9, 9)])[0]
    with pytest.raises(KeyError, match="not in the feature cache"):
        cache.get(other)
    with pytest.raises(ImageLoadError, match="missing.png"):
        cache.fill([str(tmp_path / "missing.png")], tower, processor, progress=False)
