"""Continuous batching: generations that join and leave one decoding batch between steps.

Each request's prompt is read alone (its own prefill, exactly as if it were served by itself); its KV
cache then joins the running batch, and the rows that finish leave it. The batch keeps the layout that
left-padded batched generation has (generate.py): every row's cached keys and values end at the last
column, shorter rows padded on the left and masked, positions counting only a row's real tokens. So a
joined row computes what it would compute alone (batched == one at a time, as generate.py's tests
check), and a batch never holds more columns than its longest row.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .generate import _Decoder


def can_join(decoder) -> bool:
    """Whether `decoder` can share a batch: a causal LM with a plain dynamic KV cache (no sliding window,
    no encoder-decoder cache), and an in-LLM connector context, if any, that knows how to join."""
    if not isinstance(decoder, _Decoder) or not isinstance(decoder.cache, DynamicCache):
        return False
    if any(type(layer) is not DynamicLayer for layer in decoder.cache.layers):
        return False
    return decoder.context is None or hasattr(decoder.context, "join")


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def join(decoders: list[_Decoder]) -> _Decoder:
    """One decoder whose rows are the rows of `decoders`, in order, each continuing as it would alone."""
    if len(decoders) == 1:
        return decoders[0]
    first = decoders[0]
    width = max(d.mask.shape[1] for d in decoders)
    joined = object.__new__(_Decoder)
    joined.model, joined.embed_tokens = first.model, first.embed_tokens
    joined.cache = DynamicCache(config=first.model.config)
    with torch.inference_mode():
        for index, layer in enumerate(joined.cache.layers):
            keys = torch.cat([_pad_left(d.cache.layers[index].keys, width, 2) for d in decoders])
            values = torch.cat([_pad_left(d.cache.layers[index].values, width, 2) for d in decoders])
            layer.update(keys, values)
    joined.mask = torch.cat([_pad_left(d.mask, width, 1) for d in decoders])
    joined.next_position = torch.cat([d.next_position for d in decoders])
    joined.logits = torch.cat([d.logits for d in decoders])
    joined.written = width
    joined.context = None if first.context is None else type(first.context).join([d.context for d in decoders])
    return joined


def keep(decoder: _Decoder, rows: list[int]) -> _Decoder:
    """The decoder of these rows only, without the leading columns that none of them uses any more."""
    index = torch.as_tensor(rows, dtype=torch.long, device=decoder.mask.device)
    decoder.reorder(index)
    decoder.logits = decoder.logits[index]
    unused = int(decoder.mask.any(0).long().argmax())  # leading columns masked in every kept row
    if unused:
        with torch.inference_mode():
            for layer in decoder.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
        decoder.mask = decoder.mask[:, unused:]
        decoder.written -= unused
    return decoder
