"""Generation: agrees with transformers' generate, batched == one at a time, beams, sampling, stops."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from bridgevlm.data.templates import get_template, tokenize_conversation
from bridgevlm.infer.generate import GenerationConfig, generate, left_pad
from bridgevlm.models.llm import LanguageModel
from bridgevlm.recipes.backbones import SHIPPED

SCENE = "There are 2 objects. At the top left, a small red square. At the bottom right, a large blue circle."
QUESTIONS = ["What colour is the circle?", "How many objects are there?",
             "Describe what you see.", "Is there a square?"]


@pytest.fixture(scope="module")
def shipped(single_thread):
    """The shipped LM: trained weights give decisive logits, so token equality is a fair test."""
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED / "tokenizer")
    return LanguageModel.from_pretrained(SHIPPED / "lm").eval(), tokenizer


def _prompt_ids(tokenizer, question):
    messages = [{"from": "human", "value": f"{SCENE}\n{question}"}]
    return tokenize_conversation(tokenizer, get_template("vicuna_v1_nosys"), messages, add_generation_prompt=True).input_ids


def _left_padded(lm, ids_list, pad_id):
    ids, mask = left_pad(ids_list, pad_id)
    return lm.embed(ids), mask, ids


def _run(lm, tokenizer, ids_list, cfg):
    embeds, mask, _ = _left_padded(lm, ids_list, tokenizer.pad_token_id)
    with torch.no_grad():
        return generate(lm.model, embeds, mask, cfg, tokenizer.eos_token_id, tokenizer)


def test_greedy_matches_transformers_generate(shipped):
    lm, tokenizer = shipped
    ids = _prompt_ids(tokenizer, QUESTIONS[2])
    ours = _run(lm, tokenizer, [ids], GenerationConfig(max_new_tokens=40)).tokens[0]
    ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    ref = ref[:ref.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ref else ref
    assert len(ours) > 5 and ours == ref


@pytest.mark.parametrize("cfg", [GenerationConfig(max_new_tokens=40),
                                 GenerationConfig(max_new_tokens=30, num_beams=3, length_penalty=1.5)],
                         ids=["greedy", "beam"])
def test_batched_left_padded_equals_one_at_a_time(shipped, cfg):
    lm, tokenizer = shipped
    prompts = [_prompt_ids(tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    batched = _run(lm, tokenizer, prompts, cfg)
    alone = [_run(lm, tokenizer, [p], cfg) for p in prompts]
    assert batched.tokens == [a.tokens[0] for a in alone]
    assert batched.texts == [a.texts[0] for a in alone]
    assert any(len(t) > 10 for t in batched.tokens)  # the description question gives a long reply


def test_beam_search_matches_transformers(shipped):
    lm, tokenizer = shipped
    ids = _prompt_ids(tokenizer, QUESTIONS[2])
    ours = _run(lm, tokenizer, [ids], GenerationConfig(max_new_tokens=30, num_beams=4)).tokens[0]
    ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=30, num_beams=4, do_sample=False, length_penalty=1.0,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    ref = ref[:ref.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ref else ref
    assert ours == ref


def test_sampling_is_seeded_and_top_k_one_is_greedy(shipped):
    lm, tokenizer = shipped
    prompts = [_prompt_ids(tokenizer, q) for q in QUESTIONS]
    hot = GenerationConfig(max_new_tokens=20, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    first, again = _run(lm, tokenizer, prompts, hot), _run(lm, tokenizer, prompts, hot)
    assert first.tokens == again.tokens
    other = _run(lm, tokenizer, prompts, GenerationConfig(max_new_tokens=20, do_sample=True, temperature=1.5, seed=8))
    assert other.tokens != first.tokens
    greedy = _run(lm, tokenizer, prompts, GenerationConfig(max_new_tokens=20))
    top1 = _run(lm, tokenizer, prompts, GenerationConfig(max_new_tokens=20, do_sample=True, top_k=1, seed=3))
    assert top1.tokens == greedy.tokens


def test_stop_strings_cut_the_text(shipped):
    lm, tokenizer = shipped
    prompts = [_prompt_ids(tokenizer, QUESTIONS[2])]
    full = _run(lm, tokenizer, prompts, GenerationConfig(max_new_tokens=40)).texts[0]
    assert ". " in full
    stopped = _run(lm, tokenizer, prompts, GenerationConfig(max_new_tokens=40, stop=[". "]))
    assert stopped.texts[0] == full[:full.index(". ")]
    assert len(stopped.tokens[0]) < len(tokenizer(full, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("bad, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"num_beams": 2, "do_sample": True}, "beam search"),
    ({"do_sample": True, "temperature": 0.0}, "temperature"), ({"top_p": 0.0}, "top_p")])
def test_bad_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**bad).check()


def test_cpu_decoding_layout_keeps_outputs_and_saving(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from bridgevlm.infer.layout import use_cpu_decoding_layout
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 40, (2, 7))
    before = model(input_ids=ids).logits
    assert use_cpu_decoding_layout(model) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert not model.lm_head.weight.is_contiguous() and model.lm_head.weight.t().is_contiguous()
    assert use_cpu_decoding_layout(model) == 0  # idempotent
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Encoder-decoder LMs (T5): the encoder reads the prompt embeddings once, the decoder steps.
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_t5(single_thread):
    """A random FlanT5-shaped model, shaken until greedy replies vary (a fresh tiny T5 repeats one token),
    with EOS (id 1) likely enough that some replies end early and the length penalty decides between beams."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                                                tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                                                decoder_start_token_id=0)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * 0.3)
        model.lm_head.weight[1] *= 2
    return model


def _t5_prompts(model, lengths=(9, 5, 12)):
    torch.manual_seed(1)
    ids, mask = left_pad([torch.randint(2, 120, (n,)).tolist() for n in lengths], pad_id=0)
    return model.get_input_embeddings()(ids).detach(), mask, ids


def _hf_seq2seq(model, embeds, mask, eos_token_id, **kwargs):
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, pad_token_id=0,
                         eos_token_id=eos_token_id, **kwargs)
    assert out[:, 0].tolist() == [0] * len(out)  # the decoder start token
    rows = out[:, 1:].tolist()
    return [row[:row.index(eos_token_id)] if eos_token_id in row else row for row in rows]


@pytest.mark.parametrize("cfg", [GenerationConfig(max_new_tokens=12),
                                 GenerationConfig(max_new_tokens=12, num_beams=3, length_penalty=1.5),
                                 GenerationConfig(max_new_tokens=12, num_beams=4, length_penalty=0.0)],
                         ids=["greedy", "beam", "beam_no_penalty"])
def test_seq2seq_generation_matches_transformers(tiny_t5, cfg):
    embeds, mask, _ = _t5_prompts(tiny_t5)
    with torch.no_grad():
        ours = generate(tiny_t5, embeds, mask, cfg, eos_token_id=1).tokens
    for row in range(len(embeds)):  # HF beam search, row by row: its batched beams pad finished rows
        ref = _hf_seq2seq(tiny_t5, embeds[row:row + 1], mask[row:row + 1], max_new_tokens=cfg.max_new_tokens,
                          num_beams=cfg.num_beams, length_penalty=cfg.length_penalty, eos_token_id=1)
        assert ours[row] == ref[0]
    assert len({t for row in ours for t in row}) > 3 and any(len(row) < cfg.max_new_tokens for row in ours)
    alone = [generate(tiny_t5, embeds[r:r + 1, -int(mask[r].sum()):], mask[r:r + 1, -int(mask[r].sum()):], cfg,
                      eos_token_id=1).tokens[0] for r in range(len(embeds))]
    assert ours == alone  # left padding changes nothing


def test_seq2seq_greedy_batch_matches_transformers_and_sampling_is_seeded(tiny_t5):
    embeds, mask, _ = _t5_prompts(tiny_t5)
    greedy = generate(tiny_t5, embeds, mask, GenerationConfig(max_new_tokens=10), eos_token_id=None).tokens
    assert greedy == _hf_seq2seq(tiny_t5, embeds, mask, max_new_tokens=10, eos_token_id=None)
    hot = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, seed=7)
    first, again = (generate(tiny_t5, embeds, mask, hot, eos_token_id=None).tokens for _ in range(2))
    assert first == again and first != greedy
    top1 = GenerationConfig(max_new_tokens=10, do_sample=True, top_k=1, seed=3)
    assert generate(tiny_t5, embeds, mask, top1, eos_token_id=None).tokens == greedy
