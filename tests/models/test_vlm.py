"""VisionLanguageModel: splicing, placeholder checks, trainability, save/load/export round trips."""
from __future__ import annotations

import pytest
import torch

from bridgevlm.config import from_dict
from bridgevlm.data.conversations import ConversationDataset, ImageSource, PadCollator
from bridgevlm.data.templates import get_template
from bridgevlm.models.assemble import VlmConfig, build_vlm, export_vlm, load_vlm, save_vlm
from bridgevlm.models.connectors import ConnectorConfig, build_connector
from bridgevlm.models.lora import LoraSettings, has_lora
from bridgevlm.models.vlm import ImageTokenError
from bridgevlm.train.trainability import Trainability, apply_trainability


@pytest.fixture()
def loaded(vlm_parts, single_thread):
    torch.manual_seed(0)
    return build_vlm(from_dict(VlmConfig, vlm_parts))


def _batch(loaded, tmp_path, records):
    from PIL import Image

    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{i}.png")
    source = ImageSource(tmp_path, loaded.processor, loaded.placeholder)
    data = ConversationDataset(records, loaded.tokenizer, get_template("vicuna_v1"), 256, images=source)
    return PadCollator(loaded.tokenizer.pad_token_id, loaded.processor)([data[i] for i in range(len(data))])


RECORDS = [
    {"id": "img0", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                     {"from": "gpt", "value": "red"}]},
    {"id": "text", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]},
    {"id": "img1", "image": "1.png", "conversations": [{"from": "human", "value": "What colour?\n<image>"},
                                                     {"from": "gpt", "value": "blue"}]},
]


def test_connectors_shapes_and_unknown_kind():
    features = torch.randn(2, 5, 16)
    assert build_connector(ConnectorConfig("linear"), 16, 8)(features).shape == (2, 5, 8)
    mlp3 = build_connector(ConnectorConfig("mlp3x_gelu"), 16, 8)
    assert mlp3(features).shape == (2, 5, 8) and sum(isinstance(m, torch.nn.Linear) for m in mlp3.modules()) == 3
    with pytest.raises(ValueError, match="unknown connector 'mlp_gelu'; valid: linear, mlp{N}x_gelu"):
        build_connector(ConnectorConfig("mlp_gelu"), 16, 8)


def test_images_are_spliced_at_their_placeholders_in_a_mixed_batch(loaded, tmp_path):
    model = loaded.model
    assert model.num_image_tokens == 16  # 4x4 patches, CLS dropped
    batch = _batch(loaded, tmp_path, RECORDS)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    is_image = batch["input_ids"] == model.image_token_id
    assert is_image.sum(1).tolist() == [16, 0, 16]
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    visual = model.encode_images(batch["pixel_values"])
    assert torch.equal(embeds[0][is_image[0]], visual[0]) and torch.equal(embeds[2][is_image[2]], visual[1])
    text = model.llm.embed(batch["input_ids"][1:2])
    assert torch.equal(embeds[1], text[0])
    out = model(batch)
    assert torch.isfinite(out.loss_sum) and out.num_targets == (batch["labels"][:, 1:] != -100).sum()


def test_placeholder_mismatch_names_the_sample(loaded, tmp_path):
    batch = _batch(loaded, tmp_path, RECORDS)
    with pytest.raises(ImageTokenError, match=r"placeholders for 2 image\(s\) \('img0': 1, 'text': 0, 'img1': 1\) but 1"):
        loaded.model.embed(batch["input_ids"], batch["pixel_values"][:1], batch["sample_ids"])
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == loaded.model.image_token_id).nonzero()[0]] = 5
    with pytest.raises(ImageTokenError, match="sample 'img0' has 15 image placeholder tokens"):
        loaded.model.embed(ids, batch["pixel_values"], batch["sample_ids"])


def test_trainability_from_data(loaded):
    model = loaded.model
    apply_trainability(model, Trainability(vision="frozen", connector="full", llm="lora"), LoraSettings(rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("connector.") or (n.startswith("llm.") and "lora_" in n) for n in trainable)
    assert any(n.startswith("connector.") for n in trainable) and has_lora(model.llm) and not has_lora(model.vision)
    with pytest.raises(ValueError, match="LoRA is for pretrained parts"):
        apply_trainability(model, Trainability(connector="lora"), LoraSettings())
    with pytest.raises(ValueError, match="other settings"):
        apply_trainability(model, Trainability(llm="lora"), LoraSettings(rank=2))
    with pytest.raises(ValueError, match="match no Linear layer of vision"):
        apply_trainability(model, Trainability(vision="lora"), LoraSettings(rank=4, targets=["nope"]))


def _perturb(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)


def test_save_load_and_export_keep_the_outputs(loaded, tmp_path):
    model = loaded.model
    apply_trainability(model, Trainability(llm="lora"), LoraSettings(rank=4))
    _perturb(model)  # LoRA's B starts at zero: make the adapters matter
    batch = _batch(loaded, tmp_path, RECORDS)
    model.eval()
    with torch.no_grad():
        reference = model(batch).loss_sum
    save_vlm(loaded, tmp_path / "ckpt")
    saved = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(tmp_path / "ckpt/weights.safetensors"))
    assert saved and all(n.startswith("connector.") or "lora_" in n for n in saved)  # only what changed
    again = load_vlm(tmp_path / "ckpt").model.eval()
    with torch.no_grad():
        assert torch.allclose(again(batch).loss_sum, reference, atol=1e-5)
    export_vlm(loaded, tmp_path / "export")
    assert (tmp_path / "export/llm/config.json").is_file() and (tmp_path / "export/vision/preprocessor_config.json").is_file()
    standalone = load_vlm(tmp_path / "export")
    assert not has_lora(standalone.model)
    with torch.no_grad():
        assert torch.allclose(standalone.model.eval()(batch).loss_sum, reference, atol=1e-4)


def test_fully_trained_llm_is_saved_whole(loaded, tmp_path):
    apply_trainability(loaded.model, Trainability(llm="full"), LoraSettings())
    _perturb(loaded.model)
    save_vlm(loaded, tmp_path / "ckpt")
    again = load_vlm(tmp_path / "ckpt").model
    for (name, a), (_, b) in zip(loaded.model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name


def test_image_tag_errors_name_the_sample(loaded, tmp_path):
    bad_tag = [{"id": "s1", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "a"}]}]
    with pytest.raises(ValueError, match=r"sample 0 \(id 's1'\): has 1 <image> tag\(s\) but 0 image\(s\)"):
        _batch(loaded, tmp_path, bad_tag)
    no_tag = [{"id": "s2", "image": "0.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]}]
    with pytest.raises(ValueError, match=r"id 's2'\): has 0 <image> tag\(s\) but 1 image\(s\); add an"):
        _batch(loaded, tmp_path, no_tag)
    missing = [{"id": "s3", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}]
    with pytest.raises(ValueError, match=r"image not found: .*gone\.png \(sample 0 \(id 's3'\)"):
        _batch(loaded, tmp_path, missing)


def test_pooled_connector_averages_grid_cells():
    connector = build_connector(ConnectorConfig("linear", pool=2), 3, 3)
    with torch.no_grad():
        connector.layers[0].weight.copy_(torch.eye(3))
        connector.layers[0].bias.zero_()
    grid = torch.arange(16.0).view(4, 4)  # a 4x4 patch grid, one feature channel repeated 3 times
    features = grid.flatten()[None, :, None].repeat(1, 1, 3)
    out = connector(features)
    assert connector.num_tokens(16) == 4 and out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # means of the 2x2 blocks, in reading order
    with pytest.raises(ValueError, match="square patch grid"):
        connector.num_tokens(17)
    with pytest.raises(ValueError, match="larger than the 1x1"):
        connector.num_tokens(1)


def test_pooled_vlm_splices_fewer_tokens(vlm_parts, tmp_path, single_thread):
    loaded = build_vlm(from_dict(VlmConfig, {**vlm_parts, "connector": {"kind": "mlp2x_gelu", "pool": 2}}))
    assert loaded.model.num_image_tokens == 4
    batch = _batch(loaded, tmp_path, RECORDS)
    assert (batch["input_ids"] == loaded.model.image_token_id).sum(1).tolist() == [4, 0, 4]
    assert torch.isfinite(loaded.model(batch).loss_sum)


def test_several_vision_layers_widen_the_connector_input_and_survive_save_load(vlm_parts, tmp_path, single_thread):
    parts = {**vlm_parts, "vision": {**vlm_parts["vision"], "feature_layer": [-2, -1]}}
    loaded = build_vlm(from_dict(VlmConfig, parts))
    assert loaded.model.connector.layers[0].in_features == 2 * loaded.model.vision.hidden_size
    batch = _batch(loaded, tmp_path, RECORDS)
    loaded.model.eval()
    with torch.no_grad():
        before = loaded.model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        save_vlm(loaded, tmp_path / "saved")
        again = load_vlm(tmp_path / "saved")
        assert again.model.vision.feature_layer == [-2, -1]
        after = again.model.eval().logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert torch.equal(before, after)
