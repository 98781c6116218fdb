"""The continuous-batching engine: every reply equals the reply the request gets alone, however requests
arrive, join and leave; limits, cancellation and models served one at a time."""
from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

import bridgevlm
from bridgevlm.config import from_dict
from bridgevlm.infer import greedy_head
from bridgevlm.infer.generate import GenerationConfig
from bridgevlm.infer.pipeline import answer
from bridgevlm.models.assemble import VlmConfig, build_vlm
from bridgevlm.serve.engine import Completion, EngineBusy, GenerationEngine, PromptError, Request, RequestTimeout


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


class Collect:
    """A listener that records what the engine reports."""

    def __init__(self):
        self.pieces: list[str] = []
        self.completion: Completion | None = None
        self.error: Exception | None = None
        self.finished = threading.Event()

    def piece(self, text):
        self.pieces.append(text)

    def done(self, completion):
        self.completion = completion
        self.finished.set()

    def failed(self, error):
        self.error = error
        self.finished.set()


def _ask(engine, messages, images, **generation):
    listener = Collect()
    request = Request(messages, images, GenerationConfig(**generation), listener)
    engine.check(request)
    engine.submit(request)
    return request, listener


def _conversations(images):
    red, blue, green = (Image.open(p).convert("RGB") for p in images)
    return [
        ([{"from": "human", "value": "<image>\nWhat colour is it?"}], [red]),
        ([{"from": "human", "value": "Say something."}], []),
        ([{"from": "human", "value": "<image>\nAnd the shape?"}, {"from": "gpt", "value": "a circle"},
          {"from": "human", "value": "Sure?"}], [blue]),
        ([{"from": "human", "value": "<image>\nIs the diamond yellow? And the star?"}], [green]),
        ([{"from": "human", "value": "How many squares are there?"}], []),
    ]


def _served(loaded, cases, budgets, max_batch):
    """Submit every case before the engine starts, so the first `max_batch` start together and the rest
    join as rows finish; returns the listeners and the engine's peak batch."""
    engine = GenerationEngine(loaded, max_batch=max_batch)
    asked = [_ask(engine, m, i, max_new_tokens=b) for (m, i), b in zip(cases, budgets)]
    engine.start()
    try:
        for _, listener in asked:
            assert listener.finished.wait(60), "no reply"
            assert listener.error is None
    finally:
        engine.stop()
    return asked, engine


@pytest.mark.parametrize("max_batch,bounded_head", [(1, False), (2, False), (8, False), (8, True)])
def test_concurrent_replies_equal_replies_alone(saved_vlm, max_batch, bounded_head, monkeypatch):
    calls = []
    if bounded_head:  # the greedy argmax through the bounded bfloat16 head, small as this one is
        monkeypatch.setattr(greedy_head, "MIN_HEAD_WEIGHTS", 0)
        argmax = greedy_head.BoundedArgmaxHead.argmax
        monkeypatch.setattr(greedy_head.BoundedArgmaxHead, "argmax",
                            lambda head, hidden: calls.append(1) or argmax(head, hidden))
    path, images = saved_vlm
    loaded = bridgevlm.load(path)
    cases = _conversations(images)
    # Different budgets make rows leave at different steps, so waiting requests join a batch mid-way.
    budgets = [3, 12, 7, 16, 1]
    alone = [answer(loaded, [m], [i], GenerationConfig(max_new_tokens=b))[0] for (m, i), b in zip(cases, budgets)]
    asked, engine = _served(loaded, cases, budgets, max_batch)
    # the one-token request ends with its prefill and never joins
    assert engine.batches and engine.peak_batch == min(max_batch, len(cases) - 1)
    replies = [listener.completion for _, listener in asked]
    assert [c.text.strip() for c in replies] == alone
    assert all(reply for reply in alone)
    for (request, listener), budget in zip(asked, budgets):
        assert "".join(listener.pieces) == listener.completion.text  # the stream adds up to the reply
        assert listener.completion.completion_tokens <= budget
        assert listener.completion.prompt_tokens == request.prompt_tokens > 0
    assert replies[-1].finish_reason == "length" and replies[-1].completion_tokens == 1
    assert bool(calls) == bounded_head


@pytest.mark.parametrize("connector", [
    {"kind": "gated_xattn", "gated_xattn": {"num_latents": 4, "resampler_layers": 1, "resampler_heads": 2,
                                            "resampler_head_dim": 8, "every": 1, "heads": 2, "head_dim": 8,
                                            "ff_mult": 2}},
    {"kind": "partial_lora", "partial_lora": {"rank": 4}},
], ids=["gated_xattn", "partial_lora"])
def test_in_llm_connectors_join_the_running_batch(vlm_parts, saved_vlm, connector):
    _, images = saved_vlm
    torch.manual_seed(0)
    loaded = build_vlm(from_dict(VlmConfig, {**vlm_parts, "connector": connector}))
    with torch.no_grad():  # open gates, a trained low-rank update, decisive logits
        for name, parameter in loaded.model.connector.named_parameters():
            if name.endswith("gate") or ".up." in name:
                parameter.normal_(std=0.5)
        loaded.model.llm.model.lm_head.weight.mul_(30)
    red, blue, _ = (Image.open(p).convert("RGB") for p in images)
    cases = _conversations(images)[:4] + [
        ([{"from": "human", "value": "<image>\nWhat colour? <image>\nAnd this one?"}], [red, blue])]
    budgets = [5, 9, 3, 12, 7]
    alone = [answer(loaded, [m], [i], GenerationConfig(max_new_tokens=b))[0] for (m, i), b in zip(cases, budgets)]
    asked, engine = _served(loaded, cases, budgets, max_batch=3)
    assert engine.batches and engine.peak_batch == 3
    assert [listener.completion.text.strip() for _, listener in asked] == alone
    assert len(set(alone)) > 2  # the replies differ, so rows cannot stand in for each other


def test_seeded_sampling_equals_sampling_alone(saved_vlm):
    path, images = saved_vlm
    loaded = bridgevlm.load(path)
    cases = _conversations(images)[:3]
    cfg = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    alone = [answer(loaded, [m], [i], GenerationConfig(**cfg))[0] for m, i in cases]
    engine = GenerationEngine(loaded, max_batch=4).start()
    try:
        asked = [_ask(engine, m, i, **cfg) for m, i in cases]
        for _, listener in asked:
            assert listener.finished.wait(60) and listener.error is None
        assert [listener.completion.text.strip() for _, listener in asked] == alone
    finally:
        engine.stop()


def test_stop_strings_end_the_reply_and_are_never_streamed(saved_vlm):
    path, images = saved_vlm
    loaded = bridgevlm.load(path)
    messages, pictures = _conversations(images)[3]
    full = answer(loaded, [messages], [pictures], GenerationConfig(max_new_tokens=16))[0]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert len(stop) == 2
    engine = GenerationEngine(loaded).start()
    try:
        _, listener = _ask(engine, messages, pictures, max_new_tokens=16, stop=[stop])
        assert listener.finished.wait(60) and listener.error is None
        assert listener.completion.finish_reason == "stop"
        assert listener.completion.text == full[:full.index(stop)]
        assert all(stop not in piece for piece in listener.pieces)
    finally:
        engine.stop()


def test_limits_queue_timeouts_and_cancellation(saved_vlm):
    path, images = saved_vlm
    loaded = bridgevlm.load(path)
    engine = GenerationEngine(loaded, max_batch=1, max_queue=1)  # not started: requests stay queued
    messages, pictures = _conversations(images)[1]
    _ask(engine, messages, pictures)
    with pytest.raises(EngineBusy, match="busy"):
        _ask(engine, messages, pictures)
    with pytest.raises(PromptError, match="1 image tag"):
        engine.check(Request(*_conversations(images)[0][:1], [], GenerationConfig(), Collect()))
    with pytest.raises(PromptError, match="maximum context length is 512"):
        engine.check(Request(messages, [], GenerationConfig(max_new_tokens=600), Collect()))
    with pytest.raises(PromptError, match="beam search"):
        engine.check(Request(messages, [], GenerationConfig(num_beams=2), Collect()))

    engine = GenerationEngine(loaded, max_batch=2).start()
    try:
        late = Collect()
        engine.submit(Request(messages, [], GenerationConfig(max_new_tokens=50), late, timeout_s=0.0))
        assert late.finished.wait(60) and isinstance(late.error, RequestTimeout)
        gone = Collect()
        request = engine.submit(Request(messages, [], GenerationConfig(max_new_tokens=50), gone))
        request.cancel()
        _, after = _ask(engine, messages, [], max_new_tokens=4)  # the engine goes on serving
        assert after.finished.wait(60) and after.completion is not None
        assert not gone.finished.is_set()
    finally:
        engine.stop()


def test_a_model_that_cannot_batch_is_served_one_request_at_a_time(t5_parts, saved_vlm):
    _, images = saved_vlm
    torch.manual_seed(0)
    loaded = build_vlm(from_dict(VlmConfig, {**t5_parts, "template": "blip2_vqa_short"}))
    cases = _conversations(images)[:2]
    alone = [answer(loaded, [m], [i], GenerationConfig(max_new_tokens=5))[0] for m, i in cases]
    engine = GenerationEngine(loaded, max_batch=8).start()
    try:
        assert not engine.batches and engine.capacity == 1
        asked = [_ask(engine, m, i, max_new_tokens=5) for m, i in cases]
        for _, listener in asked:
            assert listener.finished.wait(60) and listener.error is None
        assert [listener.completion.text.strip() for _, listener in asked] == alone
    finally:
        engine.stop()
