"""A tiny next-token model and data set shared by the loop tests and the DDP worker.

Each sample has a different number of supervised positions (an ignore mask), so the loop's
weighting by target count is exercised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bridgevlm.models.output import LossOutput
from bridgevlm.train.loop import TrainConfig
from bridgevlm.train.optim import OptimConfig, ScheduleConfig

VOCAB = 13
SEQ = 7
DIM = 16


class ToyLM(nn.Module):
    """Embed each token, a residual MLP, a head: predicts token t+1 from token t."""

    def __init__(self, seed: int = 0, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.mlp = nn.Linear(DIM, DIM)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(DIM, VOCAB)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, batch: dict) -> LossOutput:
        tokens, mask = batch["tokens"], batch["mask"]  # [B, T], [B, T] (True = target)
        h = self.embed(tokens[:, :-1])  # [B, T-1, D]
        h = h + self.dropout(torch.tanh(self.mlp(self.norm(h))))
        logits = self.head(h) * self.logit_scale  # [B, T-1, V]
        target_mask = mask[:, 1:]
        loss_sum = F.cross_entropy(
            logits[target_mask].float(), tokens[:, 1:][target_mask], reduction="sum"
        )
        num_targets = target_mask.sum()
        accuracy = (logits[target_mask].argmax(-1) == tokens[:, 1:][target_mask]).float().mean()
        return LossOutput(loss_sum, num_targets, {"acc": float(accuracy)})


def toy_dataset(n: int = 32, seed: int = 1234) -> list[dict]:
    """Sequences following a noisy rule; sample i supervises 1 + i % (SEQ - 1) positions."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        start = int(torch.randint(VOCAB, (1,), generator=g))
        steps = torch.randint(1, 3, (SEQ - 1,), generator=g)
        tokens = (start + torch.cat([torch.zeros(1, dtype=torch.long), steps.cumsum(0)])) % VOCAB
        num_targets = 1 + i % (SEQ - 1)
        mask = torch.zeros(SEQ, dtype=torch.bool)
        mask[torch.randperm(SEQ - 1, generator=g)[:num_targets] + 1] = True
        samples.append({"tokens": tokens, "mask": mask})
    return samples


def collate(samples: list[dict]) -> dict:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def toy_config(**overrides) -> TrainConfig:
    defaults = dict(
        seed=0,
        batch_size=8,
        max_steps=4,
        log_every=1,
        optim=OptimConfig(lr=1e-2, weight_decay=0.01),
        schedule=ScheduleConfig(kind="cosine", warmup_steps=2, warmup_start_factor=0.1),
    )
    defaults.update(overrides)
    return TrainConfig(**defaults)


# Shared by the DDP worker (2 ranks, half the batch each) and the single-process reference.
DDP_SETTINGS = dict(batch_size=8, grad_accum=2, max_steps=4, log_every=2)
