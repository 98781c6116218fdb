import math

import numpy as np
import pytest

from bridgevlm.data.mixing import DatasetMix, MixtureSampler, mixing_probabilities

SIZES = {"vqa": 40_000, "caption": 10_000, "ocr": 2_500, "tiny": 100}


def chi2_survival(x: float, dof: int) -> float:
    """P(X > x) for X ~ chi-square(dof), closed forms for integer dof (no scipy needed)."""
    half = x / 2
    if dof % 2 == 0:
        return math.exp(-half) * sum(half**i / math.factorial(i) for i in range(dof // 2))
    term, total = math.sqrt(2 * x / math.pi) * math.exp(-half), 0.0
    for i in range(1, (dof - 1) // 2 + 1):
        total += term
        term *= x / (2 * i + 1)
    return math.erfc(math.sqrt(half)) + total


def chi2_critical(p: float, dof: int) -> float:
    low, high = 0.0, 1000.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if chi2_survival(mid, dof) > p else (low, mid)
    return (low + high) / 2


def test_chi2_helper_matches_tables():
    assert chi2_critical(0.001, 1) == pytest.approx(10.828, abs=1e-3)
    assert chi2_critical(0.001, 3) == pytest.approx(16.266, abs=1e-3)
    assert chi2_critical(0.05, 4) == pytest.approx(9.488, abs=1e-3)


def assert_frequencies(sizes: dict, weights: dict, draws: int = 200_000):
    sampler = MixtureSampler(sizes, DatasetMix(weights=weights, seed=3, samples_per_epoch=draws))
    choices, _ = sampler.global_draws()
    observed = np.bincount(choices, minlength=len(sizes))
    expected = draws * np.array(list(mixing_probabilities(sizes, weights).values()))
    statistic = float(((observed - expected) ** 2 / expected).sum())
    assert statistic < chi2_critical(0.001, len(sizes) - 1), (observed, expected)


def test_draw_frequencies_follow_square_root_of_size():
    probabilities = mixing_probabilities(SIZES)
    roots = {name: math.sqrt(size) for name, size in SIZES.items()}
    for name in SIZES:
        assert probabilities[name] == pytest.approx(roots[name] / sum(roots.values()))
    assert_frequencies(SIZES, {})


def test_manual_weights_multiply_square_root():
    weights = {"tiny": 5.0, "vqa": 0.5}
    probabilities = mixing_probabilities(SIZES, weights)
    raw = {n: weights.get(n, 1.0) * math.sqrt(s) for n, s in SIZES.items()}
    for name in SIZES:
        assert probabilities[name] == pytest.approx(raw[name] / sum(raw.values()))
    assert probabilities["tiny"] > mixing_probabilities(SIZES)["tiny"]
    assert_frequencies(SIZES, weights)


def test_indices_are_concat_dataset_indices_and_passes_do_not_repeat():
    sizes = {"a": 7, "b": 50}
    sampler = MixtureSampler(sizes, DatasetMix(seed=1, samples_per_epoch=400))
    choices, samples = sampler.global_draws()
    offsets = {0: 0, 1: 7}
    assert sampler.indices() == [offsets[c] + s for c, s in zip(choices.tolist(), samples.tolist())]
    for d, size in enumerate(sizes.values()):
        mine = samples[choices == d]
        assert ((0 <= mine) & (mine < size)).all()
        for start in range(0, len(mine) - size + 1, size):  # every full pass is a permutation
            assert sorted(mine[start:start + size].tolist()) == list(range(size))


def test_passes_continue_across_epochs():
    sizes = {"a": 30, "b": 1000}
    sampler = MixtureSampler(sizes, DatasetMix(seed=2, samples_per_epoch=50))
    from_a = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        choices, samples = sampler.global_draws()
        from_a += samples[choices == 0].tolist()
    assert len(from_a) >= 30
    assert sorted(from_a[:30]) == list(range(30))


def test_deterministic_given_seed():
    def run(seed, epoch=0):
        sampler = MixtureSampler(SIZES, DatasetMix(seed=seed, samples_per_epoch=5000))
        sampler.set_epoch(epoch)
        return sampler.indices()
    assert run(0) == run(0)
    assert run(0, epoch=1) == run(0, epoch=1)
    assert run(0) != run(1)
    assert run(0) != run(0, epoch=1)


def test_resume_from_position_gives_the_same_remaining_draws():
    sampler = MixtureSampler(SIZES, DatasetMix(seed=4, samples_per_epoch=3000), rank=1, world_size=2)
    sampler.set_epoch(2)
    full = list(sampler)
    resumed = MixtureSampler(SIZES, DatasetMix(seed=4, samples_per_epoch=3000), rank=1, world_size=2)
    resumed.set_epoch(2)
    resumed.set_start(640)
    assert list(resumed) == full[640:]
    assert len(resumed) == len(full) - 640
    resumed.set_epoch(3)
    assert resumed.start == 0 and len(resumed) == resumed.share


def test_ranks_take_disjoint_slices_of_the_single_process_sequence():
    mix = DatasetMix(seed=5, samples_per_epoch=1000)
    single = MixtureSampler(SIZES, mix).indices()
    ranks = [MixtureSampler(SIZES, mix, rank=r, world_size=2).indices() for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 500
    interleaved = [i for pair in zip(*ranks) for i in pair]
    assert interleaved == single
    # Positions are disjoint; with datasets larger than an epoch's draws, the samples are too.
    large = {"x": 5000, "y": 8000}
    split = [set(MixtureSampler(large, mix, rank=r, world_size=2).indices()) for r in range(2)]
    assert not split[0] & split[1]


def test_uneven_world_size_pads_by_repeating_the_start():
    mix = DatasetMix(seed=6, samples_per_epoch=10)
    single = MixtureSampler(SIZES, mix).indices()
    ranks = [MixtureSampler(SIZES, mix, rank=r, world_size=3).indices() for r in range(3)]
    assert all(len(r) == 4 for r in ranks)
    assert [ranks[k % 3][k // 3] for k in range(12)] == single + single[:2]


@pytest.mark.parametrize("sizes, weights, message", [
    ({}, {}, "no datasets"),
    ({"a": 10, "empty": 0}, {}, "'empty' are empty"),
    ({"a": 10}, {"b": 2.0}, "unknown dataset(s) 'b'; valid: a"),
    ({"a": 10}, {"a": 0.0}, "positive"),
    ({"a": 10}, {"a": -1.0}, "positive"),
])
def test_errors_name_the_problem(sizes, weights, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MixtureSampler(sizes, DatasetMix(weights=weights))


def test_bad_rank_and_start_are_errors():
    with pytest.raises(ValueError, match="outside"):
        MixtureSampler(SIZES, rank=2, world_size=2)
    sampler = MixtureSampler({"a": 10}, DatasetMix(samples_per_epoch=10), world_size=2)
    with pytest.raises(ValueError, match=r"share \[0, 5\]"):
        sampler.set_start(6)
