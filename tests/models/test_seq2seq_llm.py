"""Seq2SeqLanguageModel: the prefix-LM loss against transformers' T5 loss, decoder inputs, errors, round trips."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

from bridgevlm.data.templates import IGNORE_INDEX
from bridgevlm.models.assemble import load_language_model
from bridgevlm.models.llm import LanguageModel, TinyLlamaConfig, build_tiny_llama
from bridgevlm.models.seq2seq_llm import Seq2SeqLanguageModel, shift_right

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_t5_config(tokenizer, **overrides) -> T5Config:
    fields = dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                  num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  decoder_start_token_id=tokenizer.pad_token_id)
    return T5Config(**{**fields, **overrides})


@pytest.fixture(scope="module", params=["flan-t5", "t5"])
def llm(request, tokenizer):
    torch.manual_seed(0)
    overrides = {} if request.param == "flan-t5" else dict(feed_forward_proj="relu", tie_word_embeddings=True)
    return Seq2SeqLanguageModel(T5ForConditionalGeneration(tiny_t5_config(tokenizer, **overrides))).eval()


def _batch(tokenizer):
    """Encoder ids [2, 10] (row 1 padded) and right-padded targets [2, 6] (-100 on padding)."""
    torch.manual_seed(1)
    ids = torch.randint(4, len(tokenizer), (2, 10))
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = tokenizer.pad_token_id, 0
    labels = torch.randint(4, len(tokenizer), (2, 6))
    labels[0, 5] = tokenizer.eos_token_id
    labels[1, 3] = tokenizer.eos_token_id
    labels[1, 4:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_prefix_lm_loss_equals_transformers_t5_loss_on_the_same_embeds(llm, tokenizer):
    batch = _batch(tokenizer)
    embeds = llm.embed(batch["input_ids"])
    out = llm.loss_from_embeds(embeds, batch)
    assert int(out.num_targets) == 6 + 4  # only target tokens count: row 1's padding does not
    with torch.no_grad():
        hf = llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert out.loss_sum.item() / 10 == pytest.approx(hf.loss.item(), rel=1e-5)
    # the same from ids, and from a batch that states its decoder inputs (HF's shift of the labels)
    assert llm(batch).loss_sum.item() == pytest.approx(out.loss_sum.item(), rel=1e-6)
    decoder_ids = llm.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    assert torch.equal(shift_right(batch["labels"], tokenizer.pad_token_id, tokenizer.pad_token_id), decoder_ids)
    explicit = llm.loss_from_embeds(embeds, {**batch, "decoder_input_ids": decoder_ids})
    assert explicit.loss_sum.item() == pytest.approx(out.loss_sum.item(), rel=1e-6)
    logits = llm.logits_from_embeds(embeds, batch["attention_mask"], decoder_ids)
    torch.testing.assert_close(logits, hf.logits, rtol=0, atol=1e-5)
    supervised = batch["labels"] != IGNORE_INDEX
    accuracy = (logits[supervised].argmax(-1) == batch["labels"][supervised]).float().mean().item()
    assert out.logs["token_accuracy"] == pytest.approx(accuracy)


def test_ignored_targets_and_the_decoder_tail_do_not_count(llm, tokenizer):
    batch = _batch(tokenizer)
    embeds = llm.embed(batch["input_ids"])
    full = llm.loss_from_embeds(embeds, batch)
    fewer = batch["labels"].clone()
    fewer[0, :2] = IGNORE_INDEX  # the first two targets of row 0 no longer count
    logits = llm.logits_from_embeds(embeds, batch["attention_mask"],
                                    shift_right(batch["labels"], tokenizer.pad_token_id, tokenizer.pad_token_id))
    dropped = F.cross_entropy(logits[0, :2], batch["labels"][0, :2], reduction="sum")
    decoder_ids = llm.decoder_input_ids(batch)  # the inputs stay those of the full targets
    part = llm.loss_from_embeds(embeds, {**batch, "labels": fewer, "decoder_input_ids": decoder_ids})
    assert int(part.num_targets) == int(full.num_targets) - 2
    assert part.loss_sum.item() == pytest.approx(full.loss_sum.item() - dropped.item(), rel=1e-5)
    # the decoder is causal: whatever follows row 1's last target changes nothing
    tail = decoder_ids.clone()
    tail[1, 4:] = 7
    changed = llm.loss_from_embeds(embeds, {**batch, "decoder_input_ids": tail})
    assert changed.loss_sum.item() == pytest.approx(full.loss_sum.item(), rel=1e-6)


def test_the_loss_reaches_the_encoder_inputs(llm, tokenizer):
    batch = _batch(tokenizer)
    embeds = llm.embed(batch["input_ids"]).detach().requires_grad_(True)
    llm.loss_from_embeds(embeds, batch).loss_sum.backward()
    assert embeds.grad is not None and embeds.grad[0].abs().sum() > 0
    assert embeds.grad[1, 7:].abs().sum() == 0  # masked encoder positions are not read
    llm.zero_grad(set_to_none=True)


def test_the_chunked_head_gives_transformers_gradients(llm, tokenizer):
    """The loss runs T5 up to its head and applies the head chunk by chunk: the gradients, to the inputs
    and to every weight (the head, tied or not, included), are those of HF's own loss."""
    batch = _batch(tokenizer)
    embeds = llm.embed(batch["input_ids"]).detach().requires_grad_(True)
    params = [embeds, *llm.model.parameters()]
    out = llm.loss_from_embeds(embeds, batch)
    got = torch.autograd.grad(out.loss_sum, params, allow_unused=True)
    hf = llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    expected = torch.autograd.grad(hf.loss * int(out.num_targets), params, allow_unused=True)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def test_a_batch_without_its_decoder_side_is_refused_by_name(llm, tokenizer):
    batch = _batch(tokenizer)
    encoder_only = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with pytest.raises(ValueError, match=r"needs 'labels' \[B, S\].*has only \['attention_mask', 'input_ids'\]"):
        llm(encoder_only)
    with pytest.raises(ValueError, match="'labels' \\[B, S\\].*or 'decoder_input_ids'"):
        llm.decoder_input_ids(encoder_only)
    with pytest.raises(ValueError, match="scores decoder_input_ids"):
        llm.logits_from_embeds(llm.embed(batch["input_ids"]), batch["attention_mask"])
    with pytest.raises(ValueError, match=r"decoder_input_ids \(2, 3\) and labels \(2, 6\)"):
        llm({**batch, "decoder_input_ids": batch["labels"][:, :3].clamp(min=0)})


def test_a_causal_lm_refuses_decoder_inputs(tokenizer):
    causal = LanguageModel(build_tiny_llama(TinyLlamaConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                            intermediate_size=64), tokenizer))
    ids = torch.randint(4, len(tokenizer), (1, 5))
    with pytest.raises(ValueError, match="decoder-only language model"):
        causal.logits_from_embeds(causal.embed(ids), decoder_input_ids=ids)


def test_save_reload_picks_the_wrapper_from_the_config(llm, tokenizer, tmp_path):
    batch = _batch(tokenizer)
    llm.model.save_pretrained(tmp_path / "t5")
    reloaded = load_language_model(tmp_path / "t5")
    assert isinstance(reloaded, Seq2SeqLanguageModel) and reloaded.is_encoder_decoder
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(batch).loss_sum, llm(batch).loss_sum)
    llm.set_activation_checkpointing(True)
    assert llm.model.is_activation_checkpointing and not llm.config.use_cache
    llm.set_activation_checkpointing(False)
    assert not llm.model.is_activation_checkpointing and llm.config.use_cache
