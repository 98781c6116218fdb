"""HF Llava interop: import and export with logit parity and identical greedy generations."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from bridgevlm.config import from_dict
from bridgevlm.convert.keys import ConversionError
from bridgevlm.convert.llava import export_llava, import_llava
from bridgevlm.data.images import ImageProcessor
from bridgevlm.infer.generate import GenerationConfig, generate
from bridgevlm.models.assemble import VlmConfig, build_vlm, export_vlm, load_vlm


# One hidden layer, and two taken out of order (HF concatenates them along the channels as listed).
@pytest.fixture(scope="module", params=[-2, [-1, -3]], ids=["one_layer", "two_layers"])
def hf_llava_dir(request, tokenizer, tmp_path_factory, single_thread):
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=3, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                bos_token_id=tokenizer.bos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16, vision_feature_layer=request.param)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # decisive logits, so greedy comparisons are not decided by rounding
        model.lm_head.weight.mul_(20)
    out = tmp_path_factory.mktemp("hf_llava")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ImageProcessor(size=32).save_pretrained(out)
    return out


def _inputs(tokenizer, image_token_id, batch=2):
    torch.manual_seed(1)
    text = tokenizer("USER: What colour is the circle? ASSISTANT:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tokenizer.bos_token_id] + [image_token_id] * 16 + text] * batch)
    return ids, torch.ones_like(ids), torch.randn(batch, 3, 32, 32)


def _hf_logits(path, ids, mask, pixels):
    hf = LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        return hf, hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits


def test_import_matches_transformers_logits_and_greedy_tokens(hf_llava_dir, tokenizer):
    loaded = import_llava(hf_llava_dir)
    model = loaded.model.eval()
    ids, mask, pixels = _inputs(tokenizer, model.image_token_id)
    hf, reference = _hf_logits(hf_llava_dir, ids, mask, pixels)
    with torch.no_grad():
        ours = model.logits(ids, mask, pixels)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-5
    with torch.no_grad():
        hf_tokens = hf.generate(input_ids=ids[:1], attention_mask=mask[:1], pixel_values=pixels[:1], max_new_tokens=12,
                                do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        out = generate(model.llm.model, model.embed(ids[:1], pixels[:1]), mask[:1], GenerationConfig(max_new_tokens=12),
                       eos_token_id=None)
    assert out.tokens[0] == hf_tokens.tolist()


def test_export_round_trip_keeps_logits(hf_llava_dir, tokenizer, tmp_path):
    loaded = import_llava(hf_llava_dir)
    ids, mask, pixels = _inputs(tokenizer, loaded.model.image_token_id)
    _, reference = _hf_logits(hf_llava_dir, ids, mask, pixels)
    export_llava(loaded, tmp_path / "back")
    _, again = _hf_logits(tmp_path / "back", ids, mask, pixels)
    assert (again - reference).abs().max().item() <= 1e-5
    export_vlm(loaded, tmp_path / "native")  # and as a standalone bridgevlm directory
    native = load_vlm(tmp_path / "native").model.eval()
    with torch.no_grad():
        assert (native.logits(ids, mask, pixels) - reference).abs().max().item() <= 1e-5


def test_bridgevlm_model_exports_to_transformers(vlm_parts, tokenizer, tmp_path, single_thread):
    loaded = build_vlm(from_dict(VlmConfig, vlm_parts))
    model = loaded.model.eval()
    ids, mask, pixels = _inputs(tokenizer, model.image_token_id)
    with torch.no_grad():
        ours = model.logits(ids, mask, pixels)
    export_llava(loaded, tmp_path / "hf")
    _, theirs = _hf_logits(tmp_path / "hf", ids, mask, pixels)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_linear_connector_cannot_become_hf_llava(vlm_parts, tmp_path, single_thread):
    loaded = build_vlm(from_dict(VlmConfig, {**vlm_parts, "connector": {"kind": "linear"}}))
    with pytest.raises(ConversionError, match="2-layer GELU projector without pooling"):
        export_llava(loaded, tmp_path / "hf")
