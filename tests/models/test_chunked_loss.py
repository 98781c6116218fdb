"""linear_cross_entropy against the plain head + F.cross_entropy: loss, accuracy, gradients, dtypes, fallbacks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from bridgevlm.data.templates import IGNORE_INDEX
from bridgevlm.models.chunked_loss import is_plain_linear, linear_cross_entropy
from bridgevlm.models.llm import supervised_lm_loss, target_loss

pytestmark = pytest.mark.usefixtures("single_thread")

N, D, V = 37, 16, 53


def _inputs(n=N, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=g).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, V, (n,), generator=g)
    with torch.no_grad():  # every third target is the argmax, so that the accuracy is neither 0 nor 1
        targets[::3] = F.linear(hidden, weight, b)[::3].argmax(-1)
    return hidden, weight, b, targets


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def _close(got, expected, rtol=1e-5):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 37, 256])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_plain_head_and_cross_entropy(chunk_rows, bias):
    hidden, weight, b, targets = _inputs(bias=bias)
    logits = F.linear(hidden, weight, b)
    expected = F.cross_entropy(logits, targets, reduction="sum")
    loss, correct = linear_cross_entropy(hidden, weight, b, targets, chunk_rows=chunk_rows)
    _close(loss, expected)
    assert correct.dtype == torch.long and int(correct) == int((logits.argmax(-1) == targets).sum())
    assert 0 < int(correct) < N  # the check above compared something
    # a scaled loss, as the loop's division by the number of targets scales it
    for got, want in zip(_grads(loss * 0.37, hidden, weight, b), _grads(expected * 0.37, hidden, weight, b)):
        _close(got, want)


def test_no_targets_gives_zero_loss_with_a_graph():
    hidden, weight, b, targets = _inputs(n=0)
    loss, correct = linear_cross_entropy(hidden, weight, b, targets)
    assert loss.item() == 0.0 and int(correct) == 0 and loss.requires_grad
    loss.backward()
    assert hidden.grad.shape == (0, D)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(b.grad, torch.zeros_like(b))


def test_frozen_head_gets_no_weight_gradient_computed():
    hidden, weight, b, targets = _inputs()
    weight.requires_grad_(False)
    b.requires_grad_(False)
    loss, _ = linear_cross_entropy(hidden, weight, b, targets, chunk_rows=8)
    assert all(saved is None for saved in loss.grad_fn.saved_tensors[1:])  # neither computed nor kept
    loss.backward()
    assert weight.grad is None and b.grad is None
    expected = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    _close(hidden.grad, torch.autograd.grad(expected, hidden)[0])


def test_frozen_inputs_train_the_head_only():
    hidden, weight, b, targets = _inputs()
    hidden = hidden.detach()
    loss, _ = linear_cross_entropy(hidden, weight, b, targets, chunk_rows=8)
    assert loss.grad_fn.saved_tensors[0] is None
    expected = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    for got, want in zip(_grads(loss, weight, b), _grads(expected, weight, b)):
        _close(got, want)


def test_no_grad_computes_the_loss_only():
    hidden, weight, b, targets = _inputs()
    with torch.no_grad():
        loss, _ = linear_cross_entropy(hidden, weight, b, targets, chunk_rows=8)
        expected = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    assert loss.grad_fn is None
    _close(loss, expected)


def test_bf16_autocast_matches_the_plain_path_under_autocast():
    hidden, weight, b, targets = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, correct = linear_cross_entropy(hidden, weight, b, targets, chunk_rows=8)
        logits = F.linear(hidden, weight, b)
        assert logits.dtype == torch.bfloat16
        expected = F.cross_entropy(logits.float(), targets, reduction="sum")
    assert loss.dtype == torch.float32
    _close(loss, expected, rtol=1e-4)  # the same bf16 logits; only the fp32 sums' order differs
    assert int(correct) == int((logits.float().argmax(-1) == targets).sum())
    got, want = _grads(loss, hidden, weight, b), _grads(expected, hidden, weight, b)
    for g, w, tensor in zip(got, want, (hidden, weight, b)):
        assert g.dtype == tensor.dtype == torch.float32
        _close(g, w, rtol=2e-2)  # bf16 gradients of the logits, rounded at different points


def test_bf16_weights_without_autocast():
    hidden, weight, b, targets = (t.detach().bfloat16().requires_grad_() if t.is_floating_point() else t
                                  for t in _inputs())
    loss, _ = linear_cross_entropy(hidden, weight, b, targets, chunk_rows=8)
    expected = F.cross_entropy(F.linear(hidden, weight, b).float(), targets, reduction="sum")
    _close(loss, expected, rtol=1e-4)
    for g, w in zip(_grads(loss, hidden, weight, b), _grads(expected, hidden, weight, b)):
        assert g.dtype == torch.bfloat16
        _close(g.float(), w.float(), rtol=2e-2)


def test_supervised_lm_loss_matches_the_plain_path():
    torch.manual_seed(0)
    head = nn.Linear(D, V, bias=False)
    hidden = torch.randn(3, 9, D, requires_grad=True)
    labels = torch.randint(0, V, (3, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 6:] = IGNORE_INDEX
    out = supervised_lm_loss(hidden, labels, head, chunk_rows=5)
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    expected = target_loss(head(hidden[:, :-1][selected]), targets[selected])
    assert int(out.num_targets) == int(expected.num_targets) == 3 * 8 - 3 - 3
    _close(out.loss_sum, expected.loss_sum)
    assert out.logs["token_accuracy"] == pytest.approx(expected.logs["token_accuracy"])
    for got, want in zip(_grads(out.loss_sum, hidden, head.weight), _grads(expected.loss_sum, hidden, head.weight)):
        _close(got, want)


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(D, V)


def test_heads_that_are_not_plain_linears_compute_their_own_logits():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, D)
    labels = torch.randint(0, V, (2, 6))
    hooked = nn.Linear(D, V)
    hooked.register_forward_hook(lambda module, args, output: output * 2)
    holder = _Holder()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["lm_head"]), holder)
    lora = holder.lm_head
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)  # a non-zero adapter, so that skipping it would show
    assert is_plain_linear(nn.Linear(D, V)) and not is_plain_linear(hooked) and not is_plain_linear(lora)
    for head in (hooked, lora):
        out = supervised_lm_loss(hidden, labels, head)
        expected = target_loss(head(hidden[:, :-1].reshape(-1, D)), labels[:, 1:].reshape(-1))
        _close(out.loss_sum, expected.loss_sum)
        base = supervised_lm_loss(hidden, labels, head.base_layer if head is lora else nn.Linear(D, V))
        assert abs(base.loss_sum.item() - out.loss_sum.item()) > 1e-3


def test_a_second_backward_through_the_same_forward_is_refused():
    hidden, weight, b, targets = _inputs()
    loss, _ = linear_cross_entropy(hidden, weight, b, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once per forward"):
        loss.backward()
