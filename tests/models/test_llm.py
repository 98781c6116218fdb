import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from bridgevlm.data.templates import IGNORE_INDEX
from bridgevlm.models.llm import LanguageModel, TinyLlamaConfig, build_tiny_llama, grow_layers, supervised_lm_loss

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = TinyLlamaConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=64)


@pytest.fixture(scope="module")
def llm(tokenizer):
    torch.manual_seed(0)
    return LanguageModel(build_tiny_llama(TINY, tokenizer)).eval()


def _batch(tokenizer):
    """Two right-padded rows; labels on a few answer positions only, -100 on prompts and padding."""
    torch.manual_seed(1)
    vocab = len(tokenizer)
    ids = torch.randint(4, vocab, (2, 12))
    mask = torch.ones_like(ids)
    ids[1, 9:], mask[1, 9:] = tokenizer.pad_token_id, 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 5:8] = ids[0, 5:8]
    labels[0, 11] = ids[0, 11]
    labels[1, 3:6] = ids[1, 3:6]
    labels[1, 0] = ids[1, 0]  # position 0 is never a target: nothing predicts it
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_loss_equals_transformers_shifted_cross_entropy(llm, tokenizer):
    batch = _batch(tokenizer)
    out = llm(batch)
    # targets after the shift: row 0 positions 5,6,7,11 and row 1 positions 3,4,5 -> 7 (row 1's position 0 drops out)
    assert int(out.num_targets) == 7
    with torch.no_grad():
        logits = llm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hf_mean = llm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]).loss
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    assert out.loss_sum.item() == pytest.approx(manual.item(), abs=1e-5 * max(1.0, manual.item()))
    assert out.loss_sum.item() == pytest.approx(hf_mean.item() * 7, rel=1e-5)
    chosen = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]
    accuracy = (logits[:, :-1][batch["labels"][:, 1:] != IGNORE_INDEX].argmax(-1) == chosen).float().mean().item()
    assert out.logs["token_accuracy"] == pytest.approx(accuracy)


def test_loss_is_differentiable_and_embeds_match_ids(llm, tokenizer):
    batch = _batch(tokenizer)
    embeds = llm.embed(batch["input_ids"])
    assert embeds.shape == (2, 12, TINY.hidden_size)
    by_ids = llm(batch)
    by_embeds = llm({"inputs_embeds": embeds, "attention_mask": batch["attention_mask"], "labels": batch["labels"]})
    assert by_embeds.loss_sum.item() == pytest.approx(by_ids.loss_sum.item(), rel=1e-6)
    by_ids.loss_sum.backward()
    assert llm.model.get_input_embeddings().weight.grad is not None
    llm.zero_grad(set_to_none=True)


def test_no_targets_gives_zero_loss():
    hidden = torch.randn(1, 4, 8)
    head = torch.nn.Linear(8, 11)
    out = supervised_lm_loss(hidden, torch.full((1, 4), IGNORE_INDEX), head)
    assert int(out.num_targets) == 0 and out.loss_sum.item() == 0.0


def test_save_and_reload_round_trip(llm, tokenizer, tmp_path):
    batch = _batch(tokenizer)
    llm.model.save_pretrained(tmp_path)
    reloaded = LanguageModel.from_pretrained(tmp_path).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        expected = llm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for model in (reloaded.model, plain):
            got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert torch.equal(got, expected)
    assert reloaded.config.eos_token_id == tokenizer.eos_token_id
    assert reloaded.config.vocab_size == len(tokenizer)


def _grown(tokenizer, count=2):
    """A tiny Llama before and after growing by `count` layers (deep copies, same weights)."""
    torch.manual_seed(0)
    before = build_tiny_llama(TINY, tokenizer).eval()
    after = grow_layers(copy.deepcopy(before), count)
    return before, after


def test_grow_layers_preserves_logits_and_new_layers_learn(tokenizer):
    before, after = _grown(tokenizer)
    batch = _batch(tokenizer)
    assert after.config.num_hidden_layers == len(after.model.layers) == TINY.num_layers + 2
    assert [layer.self_attn.layer_idx for layer in after.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():
        expected = before(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = after(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the zeroed projections get gradients, so training opens the new residual branches
    LanguageModel(after)(batch).loss_sum.backward()
    for layer in after.model.layers[TINY.num_layers:]:
        assert layer.self_attn.o_proj.weight.grad.abs().sum() > 0
        assert layer.mlp.down_proj.weight.grad.abs().sum() > 0


def test_grown_model_saves_loads_and_decodes_with_kv_cache(tokenizer, tmp_path):
    _, grown = _grown(tokenizer)
    torch.manual_seed(2)  # as if trained: new layers that change the output, so their cache slots matter
    for layer in grown.model.layers[TINY.num_layers:]:
        torch.nn.init.normal_(layer.self_attn.o_proj.weight, std=0.2)
        torch.nn.init.normal_(layer.mlp.down_proj.weight, std=0.2)
    grown.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert reloaded.config.num_hidden_layers == TINY.num_layers + 2
    ids = _batch(tokenizer)["input_ids"][:1, :6]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, grown(input_ids=ids).logits, rtol=0, atol=0)
        out = reloaded.generate(input_ids=ids, max_new_tokens=8, do_sample=False, use_cache=True,
                                output_scores=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        # the cached decode's scores equal a full forward over the decoded sequence, step by step
        full = reloaded(input_ids=out.sequences, use_cache=False).logits[0, ids.shape[1] - 1:-1]
    cached = torch.cat(out.scores)
    assert cached.shape[0] == 8
    torch.testing.assert_close(cached, full[:cached.shape[0]], rtol=1e-4, atol=1e-5)
