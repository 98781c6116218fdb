"""The seam between a VisionLanguageModel and a connector that acts inside the LLM.

An in-LLM connector (partial LoRA, gated cross-attention) wraps modules of the LLM once, in
`attach(llm)`. What those wrappers need per forward (which positions are visual, which image each
token follows, the visual latents) depends on the batch, so the connector builds it as a context
object from the batch's placeholder mask and vision features, and the wrappers read it from a
`ContextSlot` the connector shares with them. The context is installed only while the LLM runs on
that batch (`context.applied()`), so a call without one (a text-only use of the LLM) sees none.

A context also knows how to follow a decoding with a KV cache: `decoding()` is the context of one
new text token per row, `select(rows)` follows the rows as beams repeat and reorder, and `join`
puts the decoding contexts of separately read prompts into one batch.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol, runtime_checkable

import torch
from torch import nn


class LlmContext(Protocol):
    """What an in-LLM connector reads inside the LLM during one forward over a batch [B, T]."""

    def applied(self) -> AbstractContextManager:
        """Install this context for the LLM calls made inside the `with` block."""

    def decoding(self) -> LlmContext:
        """The context of a step that appends one text token to every row [B, 1] (KV-cache decoding)."""

    def select(self, rows: torch.Tensor) -> LlmContext:
        """The context of these rows of the batch, in this order (beams repeat and reorder rows)."""

    @classmethod
    def join(cls, contexts: list[LlmContext]) -> LlmContext:
        """Decoding contexts of separate batches as one batch, their rows in order (continuous batching)."""


class ContextSlot:
    """Holds the context of the forward in progress: the VLM fills it, the wrappers inside the LLM read it."""

    def __init__(self) -> None:
        self.current = None

    @contextmanager
    def holding(self, context) -> Iterator:
        previous, self.current = self.current, context
        try:
            yield context
        finally:
            self.current = previous


@runtime_checkable
class InLlmConnector(Protocol):
    """A connector that also acts inside the LLM. Like every connector it maps vision features [I, N, Dv]
    to the tokens spliced at the placeholders [I, M, D_llm]; it also wraps modules of the LLM and
    reads, per forward, a context built from the batch."""

    slot: ContextSlot

    def num_tokens(self, num_vision_tokens: int) -> int: ...

    def attach(self, llm: nn.Module) -> None:
        """Wrap the modules of the HF model `llm` that it acts in (idempotent)."""

    def detach(self, llm: nn.Module) -> None:
        """Put the LLM's own modules back (e.g. to save the LLM in its own format)."""

    def context(self, is_image: torch.Tensor, features: torch.Tensor | None) -> LlmContext:
        """is_image [B, T] (the placeholder positions), features [I, N, Dv] of the batch's images in
        reading order (None without images) -> the context the wrappers read."""


def is_in_llm(connector: nn.Module) -> bool:
    return isinstance(connector, InLlmConnector)


def applied(context: LlmContext | None) -> AbstractContextManager:
    return nullcontext() if context is None else context.applied()


def hold_during_backward(context: LlmContext | None, loss: torch.Tensor) -> None:
    """Install `context` again while `loss` is back-propagated: layers under activation checkpointing
    recompute their forward then, and the wrappers inside them must read the same context."""
    if context is None or not loss.requires_grad:
        return

    def install(grad):
        holding = context.applied()
        holding.__enter__()
        # runs once the whole backward pass is done
        torch.autograd.Variable._execution_engine.queue_callback(lambda: holding.__exit__(None, None, None))
        return grad

    loss.register_hook(install)


def refer(module: nn.Module, name: str, target: nn.Module) -> None:
    """Give `module` a reference to `target` without making it a child: the connector owns `target`,
    so its parameters live under `connector.` (what trains, what is saved) and not inside the LLM."""
    object.__setattr__(module, name, target)


def require_decoder_only(llm: nn.Module, kind: str) -> None:
    if getattr(llm.config, "is_encoder_decoder", False):
        raise ValueError(f"the {kind} connector acts inside a decoder-only LLM, but {type(llm).__name__} is an "
                         f"encoder-decoder model; use an input-level connector (mlp2x_gelu, qformer) with it")


def context_mismatch(kind: str, context_shape: tuple, input_shape: tuple) -> ValueError:
    return ValueError(f"the {kind} context describes a batch of shape {tuple(context_shape)} but the LLM runs on "
                      f"{tuple(input_shape)}: run the LLM on the inputs the context was built from "
                      f"(VisionLanguageModel.prepare), inside `context.applied()`")
