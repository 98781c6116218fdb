"""A deterministic, distributed, resumable sampler."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler


@dataclass
class LengthGrouping:
    """Order an epoch so that each optimiser step's samples have similar lengths and one modality
    (LLaVA's `group_by_modality_length`): padding, and the compute spent on it, nearly vanish.

    `group_size` is the samples of one step over all ranks (batch_size x world_size). The shuffled
    epoch is cut into windows of `lookahead` groups per modality; each window is sorted by length
    and cut into groups; the groups are then shuffled, so batches stay random in content and order.
    """

    lengths: Sequence[int]
    modalities: Sequence[int]  # e.g. 1 for samples with images, 0 for text-only
    group_size: int
    lookahead: int = 16

    def __post_init__(self):
        if len(self.lengths) != len(self.modalities):
            raise ValueError(f"{len(self.lengths)} lengths but {len(self.modalities)} modalities")
        if self.group_size < 1 or self.lookahead < 1:
            raise ValueError(f"group_size and lookahead must be >= 1, got {self.group_size}, {self.lookahead}")

    def order(self, perm: list[int], generator: torch.Generator) -> list[int]:
        """A reordering of `perm` (same indices, each once) in length-homogeneous groups."""
        window = self.group_size * self.lookahead
        groups, leftovers = [], []
        for modality in sorted(set(self.modalities[i] for i in perm)):
            members = [i for i in perm if self.modalities[i] == modality]
            for start in range(0, len(members), window):
                chunk = sorted(members[start:start + window], key=lambda i: -self.lengths[i])
                for g in range(0, len(chunk), self.group_size):
                    group = chunk[g:g + self.group_size]
                    (groups if len(group) == self.group_size else leftovers).append(group)
        shuffled = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        # Partial groups (one per modality at most) go last, so every full step stays homogeneous.
        tail = sorted((i for group in leftovers for i in group), key=lambda i: -self.lengths[i])
        return [i for group in shuffled for i in group] + tail


class EpochShare:
    """A rank's share of an epoch of `total` draws: the resume contract the training loop drives.

    The epoch's sequence is padded by repeating its start until it divides by `world_size` (as
    `DistributedSampler(drop_last=False)` does) and rank `r` takes every `world_size`-th item from
    `r`. `set_start(n)` skips this rank's first `n` (exact mid-epoch resume); `set_epoch` resets it
    to 0, so call `set_epoch` first.
    """

    def __init__(self, total: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.total = total
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    @property
    def share(self) -> int:
        """Items per rank in a full epoch (padding included)."""
        return math.ceil(self.total / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.share:
            raise ValueError(f"start {start} is outside this rank's share [0, {self.share}]")
        self.start = start

    def positions(self) -> list[int]:
        """Positions in the epoch's (unpadded) sequence that this rank takes, after the start offset."""
        if not self.total:
            return []
        return [i % self.total for i in range(self.share * self.world_size)][self.rank::self.world_size][self.start:]

    def __len__(self) -> int:
        return self.share - self.start


class ResumableSampler(EpochShare, Sampler[int]):
    """Yields this rank's share of a permutation of `range(length)`, one epoch at a time.

    Epoch `e` shuffles with a `torch.Generator` seeded `seed + e`, so the order is a function of
    (seed, epoch) alone. The permutation is padded by repeating its start until it divides by
    `world_size` (as `DistributedSampler(drop_last=False)` does) and rank `r` takes
    `perm[r::world_size]`. With batch size `B` per rank, global batch `k` is therefore
    `perm[k*B*W : (k+1)*B*W]` whatever `W` is: one process with batch 8 sees the same samples per
    step as two ranks with batch 4, which is what makes DDP equal to single-process training.

    With a `LengthGrouping`, the permutation is reordered so each global batch holds samples of
    similar length and one modality; the (seed, epoch) determinism and the rank split are unchanged.

    `set_start(n)` skips the first `n` indices of this rank's share (exact mid-epoch resume);
    `set_epoch` resets it to 0, so call `set_epoch` first.
    """

    def __init__(
        self, length: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
        grouping: LengthGrouping | None = None,
    ):
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        super().__init__(length, rank, world_size)
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        if grouping is not None and len(grouping.lengths) != length:
            raise ValueError(f"grouping has {len(grouping.lengths)} lengths for a dataset of {length}")
        self.grouping = grouping

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch, after the start offset."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.length, generator=generator).tolist()
            if self.grouping is not None:
                perm = self.grouping.order(perm, generator)
        else:
            perm = list(range(self.length))
        return [perm[i] for i in self.positions()]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())
