"""A VLM connector starting from a BLIP-2 stage-1 model: exact weights, sizes, errors, save/load round trip."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from bridgevlm.config import ConfigError, from_dict
from bridgevlm.models.assemble import VlmConfig, build_vlm, load_vlm, save_vlm
from bridgevlm.models.blip2_stage1 import load_stage1_qformer, load_text_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


def qformer_vlm_config(qformer_parts, init, **qformer) -> VlmConfig:
    """A VLM whose Q-Former connector starts from `init`, with `qformer` settings."""
    return from_dict(VlmConfig, {**qformer_parts, "connector": {"kind": "qformer", "init": str(init), "qformer": qformer}})


@pytest.mark.parametrize("text_input", [True, False])
def test_the_connector_starts_from_exactly_the_stage1_qformer(stage1_run, qformer_parts, text_input):
    loaded = build_vlm(qformer_vlm_config(qformer_parts, stage1_run, text_input=text_input))
    reference = load_stage1_qformer(stage1_run / "model").state_dict()
    own = loaded.model.connector.qformer.state_dict()
    # Everything but the stage-1 LM head (and, without text input, the text side) comes along, bit for bit.
    dropped = {name for name in reference if name.startswith("lm_head.")
               or (not text_input and (name.startswith("embeddings.words") or name.startswith("embeddings.positions")
                                       or ".text_ffn." in name))}
    assert set(own) == set(reference) - dropped and any(".text_ffn." in n for n in own) == text_input
    for name, tensor in own.items():
        assert torch.equal(tensor, reference[name]), name
    # the sizes are the stage-1 model's, and the saved config says so; the queries are the image's tokens
    qformer = loaded.config.connector.qformer
    assert (qformer.hidden_size, qformer.num_layers, qformer.num_query_tokens, qformer.vision_width) == (32, 2, 4, None)
    assert loaded.config.connector.init == str(stage1_run / "model") and loaded.model.num_image_tokens == 4
    # instructions are tokenised with the stage-1 tokenizer, when the Q-Former reads them
    if text_input:
        assert loaded.qformer_tokenizer.get_vocab() == load_text_tokenizer(stage1_run / "model").get_vocab()
        assert loaded.instruction_tokenizer().tokenizer is loaded.qformer_tokenizer
    else:
        assert loaded.qformer_tokenizer is None and loaded.instruction_tokenizer() is None


def test_init_weights_false_takes_the_stage1_architecture_and_tokenizer_but_fresh_weights(stage1_run, qformer_parts,
                                                                                         tmp_path):
    config = qformer_vlm_config(qformer_parts, stage1_run, text_input=True)
    config.connector.init_weights = False
    torch.manual_seed(0)
    loaded = build_vlm(config)
    reference = load_stage1_qformer(stage1_run / "model").state_dict()
    own = loaded.model.connector.qformer.state_dict()
    assert all(own[name].shape == reference[name].shape for name in own)
    # every weight but the layer norms' (ones and zeros at the start either way) is freshly drawn
    assert not any(torch.equal(own[name], reference[name]) for name in own if "layer_norm" not in name)
    assert loaded.qformer_tokenizer.get_vocab() == load_text_tokenizer(stage1_run / "model").get_vocab()
    save_vlm(loaded, tmp_path / "vlm")
    again = load_vlm(tmp_path / "vlm")
    assert again.config.connector.init_weights is False
    assert all(torch.equal(again.model.connector.qformer.state_dict()[k], v) for k, v in own.items())
    with pytest.raises(ValueError, match="init_weights: false .* connector.init names none"):
        from_dict(VlmConfig, {**qformer_parts, "connector": {"kind": "qformer", "init_weights": False}})


def test_a_saved_qformer_vlm_reloads_without_the_stage1_directory(stage1_run, qformer_parts, tmp_path):
    shutil.copytree(stage1_run / "model", tmp_path / "stage1")
    torch.manual_seed(0)
    loaded = build_vlm(qformer_vlm_config(qformer_parts, tmp_path / "stage1"))
    with torch.no_grad():  # as if trained: every connector weight moves away from its start
        for param in loaded.model.connector.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    save_vlm(loaded, tmp_path / "vlm")
    shutil.rmtree(tmp_path / "stage1")  # the saved model holds the whole connector
    again = load_vlm(tmp_path / "vlm")
    assert set(load_file(tmp_path / "vlm/weights.safetensors")) == {
        f"connector.{name}" for name, _ in loaded.model.connector.named_parameters()}
    before, after = loaded.model.state_dict(), again.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert again.config == loaded.config and again.qformer_tokenizer.get_vocab() == loaded.qformer_tokenizer.get_vocab()
    ids = torch.tensor([[loaded.tokenizer.bos_token_id] + [loaded.model.image_token_id] * 4 + [5, 6]])
    instruction = torch.tensor([loaded.instruction_tokenizer().encode("What colour is the circle?")])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = loaded.model.eval().logits(ids, None, pixels, instruction)
        torch.testing.assert_close(again.model.eval().logits(ids, None, pixels, instruction), expected, rtol=0, atol=0)


def test_a_missing_or_mismatched_stage1_directory_is_named(stage1_run, qformer_parts, vlm_parts, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"connector.init: {tmp_path}/nowhere does not exist.*"
                                                r"bridgevlm train configs/shapes/blip2_stage1.yaml"):
        build_vlm(qformer_vlm_config(qformer_parts, tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no config.json \(nor model/config.json\)"):
        build_vlm(qformer_vlm_config(qformer_parts, tmp_path / "empty"))
    shutil.copytree(stage1_run / "model", tmp_path / "no_weights")
    (tmp_path / "no_weights/model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_weights is not a complete .*model.safetensors is missing"):
        build_vlm(qformer_vlm_config(qformer_parts, tmp_path / "no_weights"))
    with pytest.raises(ValueError, match=r"connector\.qformer\.num_query_tokens is 16, but it follows the stage-1 "
                                         rf"Q-Former in {stage1_run}/model \(4\)"):
        build_vlm(qformer_vlm_config(qformer_parts, stage1_run, num_query_tokens=16))
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\) .*lm_head\.decoder\.weight"):
        build_vlm(qformer_vlm_config(qformer_parts, stage1_run, lm_head="untied"))  # stage 1's head is tied
    patch_features = qformer_vlm_config(qformer_parts, stage1_run)
    patch_features.vision.select = "patch"
    with pytest.raises(ValueError, match=r"other vision features .*vision\.select 'patch' \(stage 1: 'full'\)"):
        build_vlm(patch_features)
    with pytest.raises(ConfigError, match="connector.init starts a Q-Former .* 'mlp2x_gelu'"):
        from_dict(VlmConfig, {**vlm_parts, "connector": {"kind": "mlp2x_gelu", "init": str(stage1_run)}})


def test_a_qformer_that_reads_instructions_needs_their_tokenizer(vlm_parts):
    loaded = build_vlm(from_dict(VlmConfig, {**vlm_parts, "connector": {
        "kind": "qformer", "qformer": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
                                       "num_query_tokens": 2, "vocab_size": 64, "max_position_embeddings": 16}}}))
    with pytest.raises(ValueError, match=r"reads an instruction with each image .* no tokenizer .*connector\.init"):
        loaded.instruction_tokenizer()
    loaded.qformer_tokenizer = loaded.tokenizer
    loaded.config.instruction_max_length = 32
    with pytest.raises(ValueError, match="instruction_max_length 32 exceeds the Q-Former's 16 text positions"):
        loaded.instruction_tokenizer()
    loaded.config.instruction_max_length = None
    assert loaded.instruction_tokenizer().max_length == 16
