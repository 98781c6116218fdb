"""Partial LoRA (XComposer2): low-rank updates of the LLM's linears at visual positions only."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bridgevlm.config import from_dict
from bridgevlm.infer.generate import GenerationConfig, open_decoder, left_pad
from bridgevlm.infer.pipeline import answer
from bridgevlm.models.assemble import VlmConfig, build_vlm, export_vlm, load_vlm, save_vlm
from bridgevlm.models.connectors.partial_lora import PartialLoraLinear
from bridgevlm.models.lora import LoraSettings
from bridgevlm.train.trainability import Trainability, apply_trainability

from in_llm_support import (IMAGE, base_llm, connector_grads_plain_and_checkpointed, random_images, random_pixels,
                            token_ids)



def _config(parts, **plora):
    settings = {"rank": 4, "alpha": 8.0, "dropout": 0.0, **plora}
    return from_dict(VlmConfig, {**parts, "connector": {"kind": "partial_lora", "partial_lora": settings}})


def _build(parts, trained=True, **plora):
    torch.manual_seed(0)
    loaded = build_vlm(_config(parts, **plora))
    if trained:  # B starts at zero; a trained update is not
        with torch.no_grad():
            for update in loaded.model.connector.adapters.values():
                update.up.weight.normal_(std=0.5)
    loaded.model.eval()
    return loaded




@torch.no_grad()
def test_text_only_logits_are_the_base_llms_bit_for_bit(parts):
    loaded = _build(parts)
    ids, mask = left_pad([token_ids(loaded, "What colour is the circle?"), token_ids(loaded, "hello world")], 0)
    assert torch.equal(loaded.model.logits(ids, mask), base_llm(parts)(input_ids=ids, attention_mask=mask).logits)


@torch.no_grad()
def test_with_images_only_visual_positions_are_adapted(parts):
    loaded = _build(parts, trained=False)
    model = loaded.model
    ids, mask = left_pad([token_ids(loaded, "What colour", IMAGE, "is the circle?"), token_ids(loaded, "hello", IMAGE)], 0)
    pixels = random_pixels(2)
    embeds = model.embed(ids, pixels)
    base = base_llm(parts)(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.equal(model.logits(ids, mask, pixels), base)  # B = 0: the LLM is unchanged
    for update in model.connector.adapters.values():
        torch.nn.init.normal_(update.up.weight, std=0.5)
    logits = model.logits(ids, mask, pixels)
    is_image = ids == model.image_token_id
    before = (is_image.cumsum(1) == 0) & mask.bool()  # text before the first image
    assert before[0].sum() > 0 and torch.equal(logits[before], base[before])
    assert not torch.allclose(logits[is_image], base[is_image], atol=1e-3)
    after = ~is_image & ~before & mask.bool()  # text after an image reads adapted keys and values
    assert not torch.allclose(logits[after], base[after], atol=1e-3)


def test_only_the_targets_are_wrapped_and_a_target_that_matches_nothing_is_named(vlm_parts, opt_parts, single_thread):
    def wrapped(loaded):
        return sorted({name.rsplit(".", 1)[-1] for name, m in loaded.model.llm.model.named_modules()
                       if isinstance(m, PartialLoraLinear)})

    assert wrapped(_build(vlm_parts)) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert wrapped(_build(opt_parts)) == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    loaded = _build(vlm_parts, targets=["self_attn.q_proj", "v_proj"])
    assert wrapped(loaded) == ["q_proj", "v_proj"] and len(loaded.model.connector.adapters) == 4  # 2 layers
    with pytest.raises(ValueError, match=r"target\(s\) \['wqkv'\] match no Linear layer of LlamaForCausalLM; "
                                         r"its Linear layers end in: .*q_proj"):
        _build(vlm_parts, targets=["q_proj", "wqkv"])


def test_trains_exactly_the_projection_and_the_updates(vlm_parts, single_thread):
    loaded = _build(vlm_parts, trained=False)
    model = loaded.model
    apply_trainability(model, Trainability(vision="frozen", connector="full", llm="frozen"), LoraSettings())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("connector.")}
    assert any(".adapters." in n for n in trainable) and any(".projector." in n for n in trainable)
    assert not any(n.startswith("llm.") for n in trainable)
    ids, mask = left_pad([token_ids(loaded, "What colour", IMAGE, "is the circle? red")], 0)
    model.train()
    model({"input_ids": ids, "attention_mask": mask, "labels": ids, "pixel_values": random_pixels(1)}).loss_sum.backward()
    ups = [u.up.weight.grad for u in model.connector.adapters.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in ups)  # B learns first (A's gradient is B^T·... = 0)
    with pytest.raises(ValueError, match="trainable.llm: lora would add LoRA to the LLM's linear layers, which the "
                                         "PartialLoraConnector already adapts"):
        apply_trainability(model, Trainability(connector="full", llm="lora"), LoraSettings())


def test_activation_checkpointing_recomputes_with_the_same_positions(vlm_parts, single_thread):
    loaded = _build(vlm_parts)
    plain, checkpointed = connector_grads_plain_and_checkpointed(loaded)
    assert plain.keys() == checkpointed.keys() and any("adapters" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_batched_generation_equals_one_at_a_time_and_the_cached_decoding(parts):
    loaded = _build(parts)
    conversations = [[{"from": "human", "value": "<image>\nWhat colour is the circle?"}],
                     [{"from": "human", "value": "Say hello."}],
                     [{"from": "human", "value": "Is there a <image> here? yes no"}]]
    images = [random_images(1, 1), [], random_images(1, 2)]
    cfg = GenerationConfig(max_new_tokens=6)
    batched = answer(loaded, conversations, images, cfg, batch_size=3)
    assert batched == [answer(loaded, [c], [i], cfg)[0] for c, i in zip(conversations, images)]
    # With the KV cache every new token is text: its logits are those of a full forward.
    model = loaded.model
    ids = torch.tensor([token_ids(loaded, "What colour", IMAGE, "is the circle?")])
    new = [5, 17, 42]
    pixels = random_pixels(1, seed=3)
    full = model.logits(torch.cat([ids, torch.tensor([new])], 1), None, pixels)[0, ids.shape[1]:]
    embeds, context = model.prepare(ids, pixels)
    decoder = open_decoder(model.llm.model, embeds, torch.ones_like(ids), context=context)
    torch.testing.assert_close(torch.stack([decoder.step(torch.tensor([t]))[0] for t in new]), full)


@torch.no_grad()
def test_save_load_and_export_round_trips(vlm_parts, tmp_path, single_thread):
    loaded = _build(vlm_parts)
    ids, mask = left_pad([token_ids(loaded, "What colour", IMAGE, "is the circle?"), token_ids(loaded, "hello")], 0)
    pixels = random_pixels(1)
    expected = loaded.model.logits(ids, mask, pixels)
    save_vlm(loaded, tmp_path / "saved")
    weights = load_file(tmp_path / "saved/weights.safetensors")
    assert all(k.startswith("connector.") for k in weights) and any(".adapters." in k for k in weights)
    assert torch.equal(load_vlm(tmp_path / "saved").model.eval().logits(ids, mask, pixels), expected)
    export_vlm(loaded, tmp_path / "export")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "export/llm")  # the LLM's own parameter names
    assert not any(isinstance(m, PartialLoraLinear) for m in llm.modules())
    assert torch.equal(load_vlm(tmp_path / "export").model.eval().logits(ids, mask, pixels), expected)
