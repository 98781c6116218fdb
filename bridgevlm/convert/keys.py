"""Weight conversion as a declarative table of key patterns, with every shape asserted."""
from __future__ import annotations

import re

import torch


class ConversionError(ValueError):
    """A weight that no rule maps, a rule that maps nothing, or a shape that does not fit."""


def convert_state(state: dict[str, torch.Tensor], rules: list[tuple[str, str]], target: dict[str, torch.Tensor],
                  what: str) -> dict[str, torch.Tensor]:
    """Rename every key of `state` by the first matching (pattern, replacement) rule, check the
    result covers `target` exactly with the same shapes, and return it."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for pattern, replacement in rules:
            if re.match(pattern, key):
                out[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            raise ConversionError(f"{what}: no rule maps weight {key!r}")
    missing, extra = sorted(set(target) - set(out)), sorted(set(out) - set(target))
    if missing or extra:
        raise ConversionError(f"{what}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for key, tensor in out.items():
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise ConversionError(f"{what}: {key} has shape {tuple(tensor.shape)}, expected {tuple(target[key].shape)}")
    return out
