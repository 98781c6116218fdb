"""Candidate ranking with a vision-language model: the likeliest reply wins, the Q-Former reads the
question, and the world evaluation ranks exactly the families that list candidates."""
from __future__ import annotations

import json

import pytest
import torch

from bridgevlm.config import from_dict
from bridgevlm.data.images import load_image
from bridgevlm.data.templates import get_template, tokenize_conversation
from bridgevlm.eval import candidates, vqa
from bridgevlm.eval.candidates import rank_answers
from bridgevlm.models.assemble import VlmConfig, build_vlm

pytestmark = pytest.mark.usefixtures("single_thread")
CANDIDATES = ["red", "green", "blue", "yellow", "purple", "orange"]


def _loaded(parts, **connector):
    torch.manual_seed(0)
    config = from_dict(VlmConfig, {**parts, "connector": {**parts.get("connector", {}), **connector}})
    loaded = build_vlm(config)
    loaded.model.eval()
    return loaded


def _by_hand(loaded, messages, image, option, instruction=None) -> float:
    """The reply's log-likelihood from one unpadded pass over the whole tokenised conversation."""
    template = get_template(loaded.config.template, loaded.tokenizer)
    tokenize = lambda extra, gen: tokenize_conversation(  # noqa: E731
        loaded.tokenizer, template, messages + extra, add_generation_prompt=gen, image_placeholder=loaded.placeholder)
    prompt, full = tokenize([], True).input_ids, tokenize([{"from": "gpt", "value": option}], False).input_ids
    pixels = loaded.processor.normalize(loaded.processor.to_uint8(image)[None])
    extra = {}
    if instruction is not None:
        ids = torch.tensor([loaded.instruction_tokenizer().encode(instruction)])
        extra = {"qformer_input_ids": ids, "qformer_attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits = loaded.model.logits(torch.tensor([full]), None, pixel_values=pixels, **extra)[0].double()
    logprobs = logits.log_softmax(-1)
    return sum(float(logprobs[i - 1, full[i]]) for i in range(len(prompt), len(full)))


def _items(world, family, n=3):
    return json.loads((world / f"eval/test/{family}.json").read_text())[:n]


@pytest.mark.parametrize("reads_instructions", [False, True])
def test_the_chosen_candidate_is_the_likeliest_reply(vlm_parts, qformer_parts, shapes_world, reads_instructions):
    loaded = (_loaded(qformer_parts, qformer={"text_input": True}) if reads_instructions else _loaded(vlm_parts))
    items = _items(shapes_world, "colour")
    prompts = [[{"from": "human", "value": f"<image>\n{item['question']}"}] for item in items]
    images = [[load_image(shapes_world / "images" / item["image"])] for item in items]
    chosen = rank_answers(loaded, prompts, images, [CANDIDATES] * len(items), batch_size=5)
    for item, messages, (image,), choice in zip(items, prompts, images, chosen):
        scores = {option: _by_hand(loaded, messages, image, option,
                                   item["question"] if reads_instructions else None) for option in CANDIDATES}
        assert choice == max(scores, key=scores.get)


@pytest.mark.parametrize("reads_instructions", [False, True])
def test_an_encoder_decoder_vlm_ranks_by_the_decoders_likelihood(t5_parts, qformer_parts, shapes_world,
                                                                 reads_instructions, monkeypatch):
    """BLIP-2 / InstructBLIP with a T5: the encoder reads "USER: {question} ASSISTANT:" after the image's
    tokens, with EOS (the source a training sample has); each candidate is the decoder's target + EOS."""
    parts = {**qformer_parts, "llm": t5_parts["llm"]} if reads_instructions else t5_parts
    loaded = _loaded(parts, qformer={"text_input": True}) if reads_instructions else _loaded(parts)
    tok, placeholder, model = loaded.tokenizer, loaded.placeholder, loaded.model
    items = _items(shapes_world, "colour")
    prompts = [[{"from": "human", "value": f"<image>\n{item['question']}"}] for item in items]
    images = [[load_image(shapes_world / "images" / item["image"])] for item in items]
    ranked = []
    score = candidates.score_candidates
    monkeypatch.setattr(candidates, "score_candidates", lambda *a, **k: ranked.append(score(*a, **k)) or ranked[-1])
    chosen = rank_answers(loaded, prompts, images, [CANDIDATES] * len(items), batch_size=5)
    for item, (image,), choice, batched in zip(items, images, chosen, ranked[0].sum_logprobs):
        encoder = [placeholder.token_id] * placeholder.count + tok(
            f"USER: {item['question']} ASSISTANT:", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pixels = loaded.processor.normalize(loaded.processor.to_uint8(image)[None])
        extra = {}
        if reads_instructions:
            ids = torch.tensor([loaded.instruction_tokenizer().encode(item["question"])])
            extra = {"qformer_input_ids": ids, "qformer_attention_mask": torch.ones_like(ids)}
        scores = {}
        for option in CANDIDATES:
            target = tok(option, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            decoder = torch.tensor([[model.llm.config.decoder_start_token_id] + target[:-1]])
            with torch.no_grad():
                logits = model.logits(torch.tensor([encoder]), None, pixels, decoder_input_ids=decoder, **extra)
            logprobs = logits[0].double().log_softmax(-1)
            scores[option] = sum(float(logprobs[i, token]) for i, token in enumerate(target))
        assert batched == pytest.approx(list(scores.values()), abs=1e-4)
        assert choice == max(scores, key=scores.get)


def test_world_evaluation_ranks_the_families_with_candidates_and_generates_the_rest(vlm_parts, shapes_world,
                                                                                    monkeypatch):
    loaded = _loaded(vlm_parts)
    generated, ranked = [], []
    real_answer, real_rank = vqa.answer, vqa.rank_answers
    monkeypatch.setattr(vqa, "answer", lambda l, p, *a, **k: generated.append(p) or real_answer(l, p, *a, **k))
    monkeypatch.setattr(vqa, "rank_answers", lambda l, p, i, c, **k: ranked.append(c) or real_rank(l, p, i, c, **k))
    result = vqa.evaluate_vqa_on_world(loaded, shapes_world, limit_per_family=2, rank_candidates=True)
    world = json.loads((shapes_world / "world.json").read_text())
    with_candidates = {f for f in world["families"] if all(i.get("candidates") for i in _items(shapes_world, f, 2))}
    assert "dialogue" not in with_candidates and {"colour", "multiple_choice", "existence"} <= with_candidates
    assert len(ranked) == len(with_candidates) and len(generated) == len(world["families"]) - len(with_candidates)
    for family in with_candidates:
        group = "held_out" if world["families"][family]["held_out"] else "held_in"
        assert result[group][family] in (0.0, 0.5, 1.0)


def test_mismatched_inputs_are_named(vlm_parts):
    with pytest.raises(ValueError, match="2 conversations, 1 image lists and 2 candidate lists"):
        rank_answers(_loaded(vlm_parts), [[], []], [[]], [["a"], ["b"]])
