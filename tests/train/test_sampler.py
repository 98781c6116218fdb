import pytest

from bridgevlm.train.sampler import LengthGrouping, ResumableSampler


def _epoch(length, epoch, seed=0, rank=0, world_size=1, shuffle=True):
    sampler = ResumableSampler(length, rank, world_size, seed=seed, shuffle=shuffle)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_deterministic_by_seed_and_epoch():
    assert _epoch(50, 3) == _epoch(50, 3)
    assert _epoch(50, 3) != _epoch(50, 4)
    assert _epoch(50, 3, seed=1) != _epoch(50, 3)
    assert sorted(_epoch(50, 3)) == list(range(50))
    assert _epoch(5, 0, shuffle=False) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("length", [24, 20])  # 20: the last global batch is short
def test_two_ranks_cover_each_global_batch_once(length):
    batch = 4  # per rank; the single process uses 8
    single = _epoch(length, 2)
    ranks = [_epoch(length, 2, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == length // 2
    for start in range(0, length // 2, batch):
        global_batch = ranks[0][start : start + batch] + ranks[1][start : start + batch]
        assert len(set(global_batch)) == len(global_batch)  # no duplicates
        assert sorted(global_batch) == sorted(single[2 * start : 2 * start + 2 * batch])
    assert sorted(ranks[0] + ranks[1]) == list(range(length))  # nothing dropped


def test_padding_repeats_from_the_start():
    ranks = [ResumableSampler(7, r, 2, seed=5) for r in range(2)]
    shares = [list(s) for s in ranks]
    assert [len(s) for s in shares] == [4, 4] == [len(s) for s in ranks]
    perm = _epoch(7, 0, seed=5)
    assert shares[0] + shares[1] != perm  # interleaved, not split
    assert sorted(shares[0] + shares[1]) == sorted(perm + perm[:1])  # one sample repeated


def test_set_start_skips_and_set_epoch_resets():
    sampler = ResumableSampler(30, rank=1, world_size=3, seed=2)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_start(6)
    assert list(sampler) == full[6:] and len(sampler) == 4
    sampler.set_epoch(4)
    assert list(sampler) == full
    with pytest.raises(ValueError, match="outside"):
        sampler.set_start(11)


def _grouped(length, epoch=0, rank=0, world_size=1, batch=4, seed=0, lookahead=4):
    lengths = [(i * 37) % 101 + 1 for i in range(length)]
    modalities = [int(i % 5 != 0) for i in range(length)]  # one in five is text-only
    grouping = LengthGrouping(lengths, modalities, group_size=batch * world_size, lookahead=lookahead)
    sampler = ResumableSampler(length, rank, world_size, seed=seed, grouping=grouping)
    sampler.set_epoch(epoch)
    return list(sampler), lengths, modalities


def test_length_grouping_keeps_every_sample_once_and_is_deterministic():
    order, _, _ = _grouped(103)
    assert sorted(order) == list(range(103))
    assert order == _grouped(103)[0]
    assert order != _grouped(103, epoch=1)[0] and order != _grouped(103, seed=1)[0]


def test_length_grouping_makes_batches_homogeneous_and_cuts_padding():
    order, lengths, modalities = _grouped(200, batch=8)
    plain = _epoch(200, 0)

    def padded(o):
        return sum(8 * max(lengths[i] for i in o[s:s + 8]) for s in range(0, len(o), 8))

    full_batches = [order[s:s + 8] for s in range(0, 200 - 8, 8)]
    assert all(len({modalities[i] for i in b}) == 1 for b in full_batches[:-2])
    assert padded(order) < 0.8 * padded(plain)


@pytest.mark.parametrize("length", [48, 46])  # 46: the last global batch is short
def test_length_grouping_splits_each_global_batch_over_ranks_without_loss(length):
    batch = 4
    single, _, _ = _grouped(length, batch=batch * 2)
    ranks = [_grouped(length, rank=r, world_size=2, batch=batch)[0] for r in range(2)]
    for start in range(0, length // 2, batch):
        global_batch = ranks[0][start:start + batch] + ranks[1][start:start + batch]
        assert sorted(global_batch) == sorted(single[2 * start:2 * start + 2 * batch])
    assert set(ranks[0] + ranks[1]) == set(range(length))


def test_length_grouping_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 lengths but 2 modalities"):
        LengthGrouping([1, 2, 3], [0, 1], group_size=2)
    with pytest.raises(ValueError, match="grouping has 3 lengths for a dataset of 4"):
        ResumableSampler(4, grouping=LengthGrouping([1, 2, 3], [0, 1, 1], group_size=2))
