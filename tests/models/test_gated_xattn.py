"""Flamingo: a Perceiver resampler and gated cross-attention blocks between the frozen LLM's layers."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bridgevlm.config import from_dict
from bridgevlm.infer.generate import GenerationConfig, open_decoder, generate, left_pad
from bridgevlm.infer.pipeline import Chat, answer
from bridgevlm.models.assemble import VlmConfig, build_vlm, export_vlm, load_vlm, save_vlm
from bridgevlm.models.connectors.gated_xattn import GatedLayer
from bridgevlm.models.lora import LoraSettings
from bridgevlm.train.trainability import Trainability, apply_trainability

from in_llm_support import (IMAGE, base_llm, connector_grads_plain_and_checkpointed, random_images, random_pixels,
                            token_ids)

SMALL = {"num_latents": 4, "resampler_layers": 1, "resampler_heads": 2, "resampler_head_dim": 8, "every": 1,
         "heads": 2, "head_dim": 8, "ff_mult": 2}


def _build(parts, gates: float | None = 1.0, **sizes):
    torch.manual_seed(0)
    cfg = from_dict(VlmConfig, {**parts, "connector": {"kind": "gated_xattn", "gated_xattn": {**SMALL, **sizes}}})
    loaded = build_vlm(cfg)
    if gates is not None:  # the gates start closed; trained ones are not
        with torch.no_grad():
            for block in loaded.model.connector.blocks.values():
                block.attn_gate.fill_(gates)
                block.ff_gate.fill_(gates)
    loaded.model.eval()
    return loaded




@torch.no_grad()
def test_with_closed_gates_the_model_is_the_base_llm(parts):
    loaded = _build(parts, gates=None)
    model = loaded.model
    assert model.num_image_tokens == 1
    assert sum(isinstance(m, GatedLayer) for m in model.llm.model.modules()) == 2  # every: 1, two layers
    base = base_llm(parts)
    ids, mask = left_pad([token_ids(loaded, "What colour is the circle?"), token_ids(loaded, "hello world")], 0)
    assert torch.equal(model.logits(ids, mask), base(input_ids=ids, attention_mask=mask).logits)
    ids, mask = left_pad([token_ids(loaded, "What colour", IMAGE, "is it?", IMAGE, "red"), token_ids(loaded, IMAGE, "hi")], 0)
    pixels = random_pixels(3)
    expected = base(inputs_embeds=model.embed(ids, pixels), attention_mask=mask).logits
    assert torch.equal(model.logits(ids, mask, pixels), expected)


@torch.no_grad()
def test_text_after_an_image_reads_it_and_text_before_does_not(parts):
    loaded = _build(parts)
    model = loaded.model
    ids = torch.tensor([token_ids(loaded, "What colour", IMAGE, "is the circle?")])
    marker = int((ids[0] == model.image_token_id).nonzero())
    one, other = model.logits(ids, None, random_pixels(1, seed=1)), model.logits(ids, None, random_pixels(1, seed=2))
    assert marker > 0 and torch.equal(one[:, :marker], other[:, :marker])
    assert not torch.allclose(one[:, marker:], other[:, marker:], atol=1e-4)


@torch.no_grad()
def test_a_token_reads_only_the_most_recent_image(vlm_parts, single_thread):
    loaded = _build(vlm_parts)
    model, connector = loaded.model, loaded.model.connector
    ids = torch.tensor([token_ids(loaded, "a b", IMAGE, "c d", IMAGE, "e f")])
    first, second = (ids[0] == model.image_token_id).nonzero().squeeze(1).tolist()
    y = torch.randn(1, ids.shape[1], 32)
    block = connector.blocks["0"]

    def read(pixels):  # what each position's cross-attention brings in [T, D]
        context = connector.context(ids == model.image_token_id, model.vision(pixels))
        return block.attn(y, context.media, context.image_slot)[0]

    both = read(random_pixels(2, seed=1))
    new_first = read(torch.cat([random_pixels(1, seed=5), random_pixels(2, seed=1)[1:]]))
    assert torch.equal(both[:first], torch.zeros_like(both[:first]))  # before any image: nothing
    assert not torch.allclose(both[first:second], new_first[first:second])
    assert torch.equal(both[second:], new_first[second:])  # after the second image: only the second


@torch.no_grad()
def test_batched_generation_equals_one_at_a_time_and_new_tokens_read_the_last_image(parts):
    loaded = _build(parts)
    conversations = [[{"from": "human", "value": "<image>\nWhat colour is the circle?"}],
                     [{"from": "human", "value": "Say hello."}],
                     [{"from": "human", "value": "<image> or <image>: which has more squares?"}]]
    images = [random_images(1, 1), [], random_images(2, 2)]
    cfg = GenerationConfig(max_new_tokens=6)
    batched = answer(loaded, conversations, images, cfg, batch_size=3)
    assert batched == [answer(loaded, [c], [i], cfg)[0] for c, i in zip(conversations, images)]
    assert Chat(loaded, images[0][0], cfg).ask("What colour is the circle?") == batched[0]  # bridgevlm chat's path
    # With the KV cache a new token reads the row's last image: its logits are those of a full forward.
    model = loaded.model
    ids = torch.tensor([token_ids(loaded, "a b", IMAGE, "c d", IMAGE, "which?")])
    new = [5, 17, 42]
    pixels = random_pixels(2, seed=3)
    full = model.logits(torch.cat([ids, torch.tensor([new])], 1), None, pixels)[0, ids.shape[1]:]
    embeds, context = model.prepare(ids, pixels)
    decoder = open_decoder(model.llm.model, embeds, torch.ones_like(ids), context=context)
    torch.testing.assert_close(torch.stack([decoder.step(torch.tensor([t]))[0] for t in new]), full)
    # Beams repeat and reorder the rows; each keeps reading its prompt's images.
    beams = GenerationConfig(max_new_tokens=4, num_beams=3)
    two = generate(model.llm.model, embeds.repeat(2, 1, 1), torch.ones(2, ids.shape[1], dtype=torch.long), beams,
                   None, context=context.select(torch.tensor([0, 0]))).tokens
    assert two[0] == two[1] == generate(model.llm.model, embeds, torch.ones_like(ids), beams, None,
                                        context=context).tokens[0]


def test_trains_exactly_the_resampler_marker_and_blocks(vlm_parts, single_thread):
    loaded = _build(vlm_parts, gates=None)
    model = loaded.model
    apply_trainability(model, Trainability(vision="frozen", connector="full", llm="frozen"), LoraSettings())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("connector.")}
    assert {"connector.marker", "connector.blocks.0.attn_gate", "connector.blocks.1.ff_gate"} <= trainable
    ids = torch.tensor([token_ids(loaded, "What colour", IMAGE, "is the circle? red")])
    model.train()
    model({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
           "pixel_values": random_pixels(1)}).loss_sum.backward()
    gates = [p.grad for n, p in model.connector.named_parameters() if n.endswith("_gate")]
    assert all(g is not None and g.abs().sum() > 0 for g in gates)  # closed gates still learn to open
    apply_trainability(model, Trainability(connector="full", llm="lora"), LoraSettings(rank=2))  # inside GatedLayers
    assert any("layers.0.layer.self_attn.q_proj.lora_A" in n for n, p in model.named_parameters() if p.requires_grad)


def test_activation_checkpointing_gives_the_same_gradients(vlm_parts, single_thread):
    loaded = _build(vlm_parts, gates=0.5)
    plain, checkpointed = connector_grads_plain_and_checkpointed(loaded)
    assert plain.keys() == checkpointed.keys() and "resampler.latents" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_save_load_and_export_round_trips(vlm_parts, tmp_path, single_thread):
    loaded = _build(vlm_parts)
    ids, mask = left_pad([token_ids(loaded, "What colour", IMAGE, "is it?", IMAGE, "red"), token_ids(loaded, "hello")], 0)
    pixels = random_pixels(2)
    expected = loaded.model.logits(ids, mask, pixels)
    save_vlm(loaded, tmp_path / "saved")
    weights = load_file(tmp_path / "saved/weights.safetensors")
    assert all(k.startswith("connector.") for k in weights) and "connector.blocks.1.attn_gate" in weights
    assert torch.equal(load_vlm(tmp_path / "saved").model.eval().logits(ids, mask, pixels), expected)
    export_vlm(loaded, tmp_path / "export")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "export/llm")
    assert not any(isinstance(m, GatedLayer) for m in llm.modules())
    assert torch.equal(load_vlm(tmp_path / "export").model.eval().logits(ids, mask, pixels), expected)


def test_misconfigurations_are_named(vlm_parts, t5_parts, single_thread):
    with pytest.raises(ValueError, match="every is 3 but LlamaForCausalLM has 2 layers"):
        _build(vlm_parts, every=3)
    with pytest.raises(ValueError, match="layers 'model.blocks' is not a module list of LlamaForCausalLM"):
        _build(vlm_parts, layers="model.blocks")
    assert isinstance(_build(vlm_parts, layers="model.layers").model.llm.model.model.layers[0], GatedLayer)
    with pytest.raises(ValueError, match="gated_xattn connector acts inside a decoder-only LLM"):
        _build(t5_parts)
    loaded = _build(vlm_parts)
    ids = torch.tensor([token_ids(loaded, "a", IMAGE, "b")])
    _, context = loaded.model.prepare(ids, random_pixels(1))
    with context.applied(), pytest.raises(ValueError, match=r"describes a batch of shape \(1, 3\) but the LLM runs "
                                                             r"on \(1, 2\)"):
        loaded.model.llm.model(input_ids=ids[:, :2])
