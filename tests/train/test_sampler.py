import pytest

from bridgevlm.train.sampler import ResumableSampler


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
