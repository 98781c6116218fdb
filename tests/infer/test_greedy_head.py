"""The bounded bfloat16 argmax picks exactly the fp32 argmax, and greedy decoding through it keeps its tokens."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bridgevlm.infer import greedy_head as greedy_head_module
from bridgevlm.infer.generate import GenerationConfig, generate
from bridgevlm.infer.greedy_head import BoundedArgmaxHead, greedy_head

pytestmark = pytest.mark.usefixtures("single_thread")


def _fp32_argmax(hidden, weight):
    return (hidden @ weight.t()).argmax(-1)


@pytest.mark.parametrize("vocab,width,scale", [(3000, 64, 0.02), (5000, 128, 1.0), (997, 48, 30.0)])
def test_the_bounded_argmax_is_the_fp32_argmax(vocab, width, scale):
    generator = torch.Generator().manual_seed(vocab)
    weight = torch.randn(vocab, width, generator=generator) * scale
    head = BoundedArgmaxHead(weight.t().contiguous().t())  # input-major, as the decoding layout stores it
    for _ in range(20):
        hidden = torch.randn(16, width, generator=generator) * 4
        assert torch.equal(head.argmax(hidden), _fp32_argmax(hidden, weight))


def _bf16_scores(hidden, weight):
    return (hidden.to(torch.bfloat16) @ weight.to(torch.bfloat16).t()).float()


def test_where_bfloat16_ranks_the_leaders_wrongly_the_bounds_still_find_the_fp32_winner():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(500, 64, generator=generator)
    hidden = torch.randn(8, 64, generator=generator)
    for row in range(8):  # give each row a rival close to its winner that bfloat16 scores strictly above it
        winner = int(_fp32_argmax(hidden[row:row + 1], weight))
        rival = (winner + 1 + row) % 500
        pair = torch.tensor([winner, rival])
        for _ in range(20000):
            scale = 10 ** (-3 + 1.5 * torch.rand(1, generator=generator))
            trial = torch.stack([weight[winner], weight[winner] + scale * torch.randn(64, generator=generator)])
            fp32, bf16 = hidden[row] @ trial.t(), _bf16_scores(hidden[row], trial)
            if fp32[1] < fp32[0] and bf16[1] > bf16[0]:
                weight[pair] = trial
                break
    expected = _fp32_argmax(hidden, weight)
    assert int((_bf16_scores(hidden, weight).argmax(-1) != expected).sum()) >= 4  # bfloat16 alone picks wrongly
    assert torch.equal(BoundedArgmaxHead(weight).argmax(hidden), expected)


def test_exact_ties_go_to_the_first_index_as_torch_argmax_does():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(500, 32, generator=generator)
    hidden = torch.randn(4, 32, generator=generator)
    winners = _fp32_argmax(hidden, weight)
    for winner in winners.tolist():
        weight[max(winner - 7, 0)] = weight[winner]  # an identical row before it
    assert torch.equal(BoundedArgmaxHead(weight).argmax(hidden), _fp32_argmax(hidden, weight))


def test_a_non_finite_hidden_state_falls_back_to_the_fp32_product():
    weight = torch.randn(300, 16)
    hidden = torch.randn(3, 16)
    hidden[1, 4] = float("nan")
    assert torch.equal(BoundedArgmaxHead(weight).argmax(hidden), _fp32_argmax(hidden, weight))


def _llama(seed=0, cls=LlamaForCausalLM):
    torch.manual_seed(seed)
    return cls(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=400)).eval()


def _greedy_tokens(model, monkeypatch, min_weights):
    monkeypatch.setattr(greedy_head_module, "MIN_HEAD_WEIGHTS", min_weights)
    torch.manual_seed(5)
    embeds = torch.randn(6, 9, 32)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    return generate(model, embeds, mask, GenerationConfig(max_new_tokens=24), eos_token_id=None).tokens


def test_greedy_generation_keeps_its_tokens_through_the_bounded_head(monkeypatch):
    model = _llama()
    calls = []
    original = BoundedArgmaxHead.argmax
    monkeypatch.setattr(BoundedArgmaxHead, "argmax", lambda self, hidden: calls.append(1) or original(self, hidden))
    plain = _greedy_tokens(model, monkeypatch, min_weights=1 << 40)
    assert not calls
    bounded = _greedy_tokens(model, monkeypatch, min_weights=0)
    assert len(calls) == 23  # every step after the prompt's
    assert bounded == plain and len({token for row in plain for token in row}) > 10
    # a single row keeps the fp32 product, as fast there
    alone = generate(model, torch.randn(1, 5, 32), torch.ones(1, 5, dtype=torch.long),
                     GenerationConfig(max_new_tokens=4), eos_token_id=None)
    assert len(calls) == 23 and len(alone.tokens[0]) == 4


def test_the_head_is_rebuilt_when_its_weights_change(monkeypatch):
    monkeypatch.setattr(greedy_head_module, "MIN_HEAD_WEIGHTS", 0)
    model = _llama()
    first = greedy_head(model)
    assert first is not None and greedy_head(model) is first
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # as an optimiser step would: in place
    second = greedy_head(model)
    assert second is not first
    hidden = torch.randn(3, 32)
    assert torch.equal(second.argmax(hidden), _fp32_argmax(hidden, model.lm_head.weight))


class _ShiftedLogits(LlamaForCausalLM):
    """A model whose logits are not its head's output (as with soft-capping or a logit scale)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + torch.linspace(0, 5, out.logits.shape[-1])
        return out


def test_models_whose_logits_are_not_their_heads_or_that_train_keep_the_plain_path(monkeypatch):
    monkeypatch.setattr(greedy_head_module, "MIN_HEAD_WEIGHTS", 0)
    assert greedy_head(_llama(cls=_ShiftedLogits)) is None
    shifted = _llama(cls=_ShiftedLogits)
    assert _greedy_tokens(shifted, monkeypatch, 0) == _greedy_tokens(shifted, monkeypatch, 1 << 40)
    assert greedy_head(_llama().train()) is None
    monkeypatch.setattr(greedy_head_module, "MIN_HEAD_WEIGHTS", 1 << 40)
    assert greedy_head(_llama()) is None  # small heads: the fp32 product is cheap
