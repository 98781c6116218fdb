"""Continuous batching: generations that join and leave one decoding batch between steps.

Each request's prompt is read alone (its own prefill, exactly as if it were served by itself); its KV
cache then joins the running batch, and the rows that finish leave it. The batch keeps the layout that
left-padded batched generation has (generate.py): every row's cached keys and values end at the same
column, shorter rows padded on the left and masked, positions counting only a row's real tokens. So a
joined row computes what it would compute alone (batched == one at a time, as generate.py's tests
check), and the batch holds no column that none of its rows uses.

The keys and values live in a preallocated buffer with room for `room` more columns, written in place
at each step: a cache that grows by concatenation copies all of itself at every step, which costs as
much as the attention that reads it. The batch is re-laid out only when rows join or leave, or when
the room runs out (`has_room`, `with_room`).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from .generate import _Decoder


def can_join(decoder) -> bool:
    """Whether `decoder` can share a batch: a causal LM with a plain KV cache (no sliding window, no
    encoder-decoder cache), and an in-LLM connector context, if any, that knows how to join."""
    if not isinstance(decoder, _Decoder) or not isinstance(decoder.cache, (DynamicCache, StaticCache)):
        return False
    if any(type(layer) not in (DynamicLayer, StaticLayer) for layer in decoder.cache.layers):
        return False
    return decoder.context is None or hasattr(decoder.context, "join")


def _held(decoder: _Decoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values [B, H, written, D]: the columns in use (a buffer holds more)."""
    return [(layer.keys[:, :, :decoder.written], layer.values[:, :, :decoder.written])
            for layer in decoder.cache.layers]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _laid_out(template: _Decoder, held: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
              next_position: torch.Tensor, context, room: int) -> _Decoder:
    """A decoder over these keys and values, in a buffer with `room` free columns after them. Its rows'
    next tokens are already chosen, so it holds no logits until its next step."""
    decoder = object.__new__(_Decoder)
    decoder.model = template.model
    width = mask.shape[1]
    decoder.cache = StaticCache(config=template.model.config, max_cache_len=width + room)
    with torch.inference_mode():
        for layer, (keys, values) in zip(decoder.cache.layers, held):
            layer.update(keys, values)  # allocates the buffer, writes columns [0, width)
    decoder.mask, decoder.next_position, decoder.logits = mask, next_position, None
    decoder.written = width
    decoder.context = context
    decoder.capacity = width + room
    return decoder


def join(decoders: list[_Decoder], room: int) -> _Decoder:
    """One decoder whose rows are the rows of `decoders`, in order, each continuing as it would alone."""
    width = max(d.written for d in decoders)
    helds = [_held(d) for d in decoders]
    held = [(torch.cat([_pad_left(h[i][0], width, 2) for h in helds]),
             torch.cat([_pad_left(h[i][1], width, 2) for h in helds])) for i in range(len(helds[0]))]
    first = decoders[0]
    context = None if first.context is None else (
        first.context if len(decoders) == 1 else type(first.context).join([d.context for d in decoders]))
    return _laid_out(first, held, torch.cat([_pad_left(d.mask, width, 1) for d in decoders]),
                     torch.cat([d.next_position for d in decoders]), context, room)


def keep(decoder: _Decoder, rows: list[int], room: int) -> _Decoder:
    """The decoder of these rows only, without the leading columns that none of them uses any more."""
    index = torch.as_tensor(rows, dtype=torch.long, device=decoder.mask.device)
    mask = decoder.mask[index]
    unused = int(mask.any(0).long().argmax())  # leading columns masked in every kept row
    held = [(keys[index, :, unused:], values[index, :, unused:]) for keys, values in _held(decoder)]
    context = None if decoder.context is None else decoder.context.select(index)
    return _laid_out(decoder, held, mask[:, unused:], decoder.next_position[index], context, room)


def has_room(decoder: _Decoder) -> bool:
    return decoder.written < getattr(decoder, "capacity", float("inf"))


def with_room(decoder: _Decoder, room: int) -> _Decoder:
    """The same rows with `room` free columns (when a step would write past the buffer)."""
    return keep(decoder, list(range(decoder.mask.shape[0])), room)
