"""The one contract between models and the training loop."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """What every trainable model's ``forward(batch)`` returns.

    ``loss_sum`` is the loss *summed* over the batch's ``num_targets`` targets (supervised tokens
    for a language model, pairs for a contrastive one). The loop divides by the number of targets
    in the whole accumulation window across all ranks, so gradient accumulation and DDP weight
    every target equally, however the targets are spread over micro-batches.
    """

    loss_sum: torch.Tensor  # [] scalar, differentiable
    num_targets: torch.Tensor  # [] integer count
    logs: dict[str, float] = field(default_factory=dict)  # extra scalars to log (already means)
