"""A deterministic, distributed, resumable sampler."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Yields this rank's share of a permutation of `range(length)`, one epoch at a time.

    Epoch `e` shuffles with a `torch.Generator` seeded `seed + e`, so the order is a function of
    (seed, epoch) alone. The permutation is padded by repeating its start until it divides by
    `world_size` (as `DistributedSampler(drop_last=False)` does) and rank `r` takes
    `perm[r::world_size]`. With batch size `B` per rank, global batch `k` is therefore
    `perm[k*B*W : (k+1)*B*W]` whatever `W` is: one process with batch 8 sees the same samples per
    step as two ranks with batch 4, which is what makes DDP equal to single-process training.

    `set_start(n)` skips the first `n` indices of this rank's share (exact mid-epoch resume);
    `set_epoch` resets it to 0, so call `set_epoch` first.
    """

    def __init__(
        self, length: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
    ):
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.length = length
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    @property
    def share(self) -> int:
        """Indices per rank in a full epoch (padding included)."""
        return math.ceil(self.length / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.share:
            raise ValueError(f"start {start} is outside this rank's share [0, {self.share}]")
        self.start = start

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch, after the start offset."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.length, generator=generator).tolist()
        else:
            perm = list(range(self.length))
        total = self.share * self.world_size
        while len(perm) < total and perm:
            perm += perm[: total - len(perm)]
        return perm[self.rank :: self.world_size][self.start :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return self.share - self.start
