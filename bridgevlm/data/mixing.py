"""Sampling from several instruction datasets at once (InstructBLIP's square-root balancing).

Dataset d is drawn with probability p_d = w_d·√S_d / Σ_i w_i·√S_i (S = size, w = a manual
multiplier, 1 unless given): large datasets do not drown small ones, yet small ones are not
repeated as often as under uniform mixing. Within a dataset, samples come from a permutation,
so every sample is seen once before any is seen again; each new pass is reshuffled.

Indices are ConcatDataset-style (`offset_d + sample_index`, datasets in the order of `sizes`).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Sampler

from ..train.sampler import EpochShare

# Seed-sequence tags keep the dataset choices and each dataset's permutations independent streams.
_CHOICE_STREAM = 0
_PERMUTATION_STREAM = 1


@dataclass
class DatasetMix:
    """How to mix datasets: `weights` multiply √S_d per dataset name (others keep 1);
    `samples_per_epoch` is the number of draws in one epoch (default: the total size)."""

    weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    samples_per_epoch: int | None = None


def mixing_probabilities(sizes: Mapping[str, int], weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """p_d ∝ w_d·√S_d for each dataset name in `sizes`, in the same order."""
    weights = dict(weights or {})
    if not sizes:
        raise ValueError("no datasets to mix")
    empty = [name for name, size in sizes.items() if size <= 0]
    if empty:
        raise ValueError(f"dataset(s) {', '.join(map(repr, empty))} are empty; remove them from the mix")
    unknown = sorted(set(weights) - set(sizes))
    if unknown:
        raise ValueError(f"weights name unknown dataset(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(sizes)}")
    bad = {name: w for name, w in weights.items() if not (w > 0 and math.isfinite(w))}
    if bad:
        raise ValueError(f"weights must be positive and finite, got {bad}; "
                         "to leave a dataset out, remove it from the mix")
    raw = {name: weights.get(name, 1.0) * math.sqrt(size) for name, size in sizes.items()}
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


class MixtureSampler(EpochShare, Sampler[int]):
    """Yields this rank's share of a square-root-balanced draw sequence, one epoch at a time.

    The same contract as `train.sampler.ResumableSampler`: the global sequence of epoch `e` is a
    function of (seed, e) alone, padded by repeating its start until it divides by `world_size`;
    rank `r` takes `sequence[r::world_size]`, so W ranks together see exactly what one process
    sees. `set_start(n)` skips this rank's first `n` draws (mid-epoch resume); `set_epoch` resets
    it to 0, so call `set_epoch` first.

    Each dataset's passes continue across epochs (a pass is not cut short when an epoch ends);
    the position in a dataset at the start of epoch e is recomputed from the choices of epochs
    0..e-1, which are cheap to redraw.
    """

    def __init__(self, sizes: Mapping[str, int], mix: DatasetMix | None = None, rank: int = 0, world_size: int = 1):
        mix = mix or DatasetMix()
        probabilities = mixing_probabilities(sizes, mix.weights)
        self.names = list(sizes)
        self.sizes = np.array([sizes[name] for name in self.names], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.probabilities = np.array([probabilities[name] for name in self.names])
        self.samples_per_epoch = int(self.sizes.sum()) if mix.samples_per_epoch is None else mix.samples_per_epoch
        if self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {self.samples_per_epoch}")
        self.seed = mix.seed
        super().__init__(self.samples_per_epoch, rank, world_size)

    def _choices(self, epoch: int) -> np.ndarray:
        """Dataset index of each draw of `epoch` [samples_per_epoch]."""
        rng = np.random.default_rng([self.seed, _CHOICE_STREAM, epoch])
        return rng.choice(len(self.names), size=self.samples_per_epoch, p=self.probabilities)

    def _permutation(self, dataset: int, sweep: int) -> np.ndarray:
        """The order of pass `sweep` over dataset `dataset` [S_d]."""
        return np.random.default_rng([self.seed, _PERMUTATION_STREAM, dataset, sweep]).permutation(self.sizes[dataset])

    def global_draws(self) -> tuple[np.ndarray, np.ndarray]:
        """(dataset_index, sample_index) of every draw of the current epoch, all ranks, unpadded."""
        choices = self._choices(self.epoch)
        drawn_before = np.zeros(len(self.names), dtype=np.int64)
        for earlier in range(self.epoch):
            drawn_before += np.bincount(self._choices(earlier), minlength=len(self.names))
        samples = np.empty(self.samples_per_epoch, dtype=np.int64)
        for d, size in enumerate(self.sizes):
            where = np.flatnonzero(choices == d)
            if not len(where):
                continue
            ordinal = drawn_before[d] + np.arange(len(where))  # how many draws from d came before
            sweeps, positions = np.divmod(ordinal, size)
            for sweep in range(sweeps[0], sweeps[-1] + 1):
                in_sweep = sweeps == sweep
                samples[where[in_sweep]] = self._permutation(d, int(sweep))[positions[in_sweep]]
        return choices, samples

    def draws(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (dataset_index, sample_index) for the current epoch, after the start offset."""
        choices, samples = self.global_draws()
        take = np.asarray(self.positions(), dtype=np.int64)
        return choices[take], samples[take]

    def indices(self) -> list[int]:
        """This rank's ConcatDataset indices for the current epoch, after the start offset."""
        choices, samples = self.draws()
        return (self.offsets[choices] + samples).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())
