"""VisionTower: which hidden layers it returns, and how several are joined."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from bridgevlm.config import ConfigError, from_dict
from bridgevlm.models.vision import VisionTower, VisionTowerConfig


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48,
                              num_hidden_layers=3, num_attention_heads=2)
    return CLIPVisionModel(config).eval()


def test_one_layer_is_that_hidden_state_without_the_cls_token(clip):
    pixels = torch.randn(2, 3, 32, 32)
    tower = VisionTower(clip, feature_layer=-2, select="patch")
    with torch.no_grad():
        hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert torch.equal(tower(pixels), hidden[-2][:, 1:])
    assert tower.feature_size == 24 and tower.num_tokens == 16


def test_several_layers_are_concatenated_along_channels_in_the_order_given(clip):
    pixels = torch.randn(2, 3, 32, 32)
    tower = VisionTower(clip, feature_layer=[-1, 1], select="full")
    with torch.no_grad():
        hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
        features = tower(pixels)
    assert features.shape == (2, 17, 48) and tower.feature_size == 48
    assert torch.equal(features[..., :24], hidden[-1]) and torch.equal(features[..., 24:], hidden[1])


def test_bad_layer_lists_are_named(clip):
    with pytest.raises(ValueError, match="empty list"):
        VisionTower(clip, feature_layer=[])
    with pytest.raises(ValueError, match="feature_layer 7 is out of range for a 3-layer"):
        VisionTower(clip, feature_layer=[-2, 7])


def test_config_takes_an_int_or_a_list_of_ints():
    assert from_dict(VisionTowerConfig, {"path": "x", "feature_layer": [-2, -1]}).feature_layer == [-2, -1]
    with pytest.raises(ConfigError, match="feature_layer"):
        from_dict(VisionTowerConfig, {"path": "x", "feature_layer": "-2"})
