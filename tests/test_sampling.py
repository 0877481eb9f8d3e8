"""EpochSampler: permutations from shuffle/<epoch>, O(1) resume without replay, rank shards."""

from __future__ import annotations

import itertools

import pytest
import torch

from axs_lib.reproducibility import derive_seed
from axs_lib.sampling import EpochSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_each_epoch_is_the_derived_permutation():
    sampler = EpochSampler(10, seed=42)
    keys = take(sampler, 30)
    for epoch in range(3):
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(derive_seed(42, "shuffle", epoch))).tolist()
        chunk = keys[epoch * 10 : (epoch + 1) * 10]
        assert [k[2] for k in chunk] == expected
        assert [(k[0], k[1]) for k in chunk] == [(epoch, p) for p in range(10)]
    orders = [tuple(k[2] for k in keys[e * 10 : (e + 1) * 10]) for e in range(3)]
    assert len(set(orders)) == 3  # epochs differ


def test_pinned_first_epoch():
    # Golden value: pins derive_seed("shuffle", 0) + torch.randperm; a change reorders every run's data.
    assert [k[2] for k in take(EpochSampler(10, seed=42), 10)] == [5, 7, 8, 2, 4, 0, 3, 6, 9, 1]


def test_seed_changes_order_and_no_shuffle_is_identity():
    assert take(EpochSampler(20, seed=1), 20) != take(EpochSampler(20, seed=2), 20)
    assert [k[2] for k in take(EpochSampler(5, seed=1, shuffle=False), 10)] == [0, 1, 2, 3, 4] * 2


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_from_any_state_continues_exactly(world_size):
    for rank in range(world_size):
        full = take(EpochSampler(7, seed=3, rank=rank, world_size=world_size), 25)
        sampler = EpochSampler(7, seed=3, rank=rank, world_size=world_size)
        for consumed in range(1, 20):
            state = sampler.next_state(*full[consumed - 1][:2])
            resumed = EpochSampler(7, seed=3, start=state, rank=rank, world_size=world_size)
            assert take(resumed, 5) == full[consumed : consumed + 5]


def test_resume_is_constant_time_and_replays_nothing(monkeypatch):
    calls = []
    original = EpochSampler.shard

    def counting(self, epoch):
        calls.append(epoch)
        return original(self, epoch)

    monkeypatch.setattr(EpochSampler, "shard", counting)
    sampler = EpochSampler(1000, seed=0, start=(10**6, 999))
    keys = take(sampler, 2)
    assert calls == [10**6, 10**6 + 1]  # only the epochs it yields from
    assert [k[:2] for k in keys] == [(10**6, 999), (10**6 + 1, 0)]


def test_next_state_and_state_after_roll_over_at_the_shard_end():
    sampler = EpochSampler(5, seed=0, world_size=2)
    assert sampler.shard_size == 3
    assert sampler.next_state(0, 1) == (0, 2)
    assert sampler.next_state(0, 2) == (1, 0)
    batch = {"epoch": torch.tensor([4, 4]), "position": torch.tensor([1, 2])}
    assert sampler.state_after(batch) == (5, 0)


def test_ranks_take_strided_positions_of_a_padded_permutation():
    n, world = 10, 4
    perm = [k[2] for k in take(EpochSampler(n, seed=9), n)]
    padded = (perm * 2)[:12]
    shards = [take(EpochSampler(n, seed=9, rank=r, world_size=world), 3) for r in range(world)]
    for r, shard in enumerate(shards):
        assert [k[2] for k in shard] == padded[r::world]
        assert [k[:2] for k in shard] == [(0, 0), (0, 1), (0, 2)]
    assert set(k[2] for s in shards for k in s) == set(range(n))  # every sample, two of them twice (padding)
    even = [take(EpochSampler(8, seed=9, rank=r, world_size=4), 2) for r in range(4)]
    assert sorted(k[2] for s in even for k in s) == list(range(8))  # divisible: disjoint, no padding


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_samples=0), dict(start=(0, 10)), dict(start=(-1, 0)), dict(rank=2, world_size=2), dict(world_size=0)],
)
def test_invalid_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        EpochSampler(**({"num_samples": 10, "seed": 0} | kwargs))
