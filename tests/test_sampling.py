"""ResumableSampler: permutations from shuffle/<epoch> pinned by golden values, the endless stream the
trainer walks, O(1) resume without replay, rank shards as DistributedSampler cuts them, SampleIndex
through Subset and BatchSampler."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler, Subset, random_split

from axs_lib.reproducibility import derive_seed
from axs_lib.sampling import ResumableSampler, SampleIndex


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def keys(indices) -> list[tuple[int, int, int]]:
    """``(epoch, position, index)`` of each `SampleIndex`."""
    return [(i.epoch, i.position, int(i)) for i in indices]


def stream(n, seed, count, start=(0, 0), *, rank=0, world=1, shuffle=True):
    return keys(itertools.islice(ResumableSampler(n, seed, num_replicas=world, rank=rank, shuffle=shuffle).stream(start), count))


# Golden values: the order every run's data has been read in (the trainer walks `stream`). They pin
# derive_seed("shuffle", epoch), torch.randperm, the cyclic padding and the rank stride together;
# a change here reorders the data of every earlier run, so resuming one would no longer be exact.
GOLDEN_10_SEED_42 = [5, 7, 8, 2, 4, 0, 3, 6, 9, 1,  # epoch 0
                     2, 9, 7, 3, 1, 6, 4, 0, 8, 5,  # epoch 1
                     5, 6, 8, 4, 1, 2, 0, 9, 7, 3]  # epoch 2
GOLDEN_7_SEED_5_3_RANKS = {0: [4, 6, 0, 0, 6, 3, 6, 0, 2],  # 3 per rank and epoch: 7 padded to 9
                           1: [2, 3, 4, 1, 2, 0, 5, 3, 6],
                           2: [5, 1, 2, 4, 5, 1, 1, 4, 5]}


def test_stream_walks_the_pinned_order_epoch_after_epoch():
    assert stream(10, 42, 30) == [(e, p, GOLDEN_10_SEED_42[10 * e + p]) for e in range(3) for p in range(10)]


def test_stream_of_each_rank_walks_its_pinned_padded_shard():
    for rank, golden in GOLDEN_7_SEED_5_3_RANKS.items():
        assert stream(7, 5, 9, rank=rank, world=3) == [(e, p, golden[3 * e + p]) for e in range(3) for p in range(3)]


def test_each_epoch_is_the_derived_permutation():
    got = stream(10, 42, 30)
    for epoch in range(3):
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(derive_seed(42, "shuffle", epoch))).tolist()
        assert [k[2] for k in got[epoch * 10:(epoch + 1) * 10]] == expected
    assert len({tuple(k[2] for k in got[e * 10:(e + 1) * 10]) for e in range(3)}) == 3  # epochs differ


def test_seed_changes_order_and_no_shuffle_is_identity():
    assert stream(20, 1, 20) != stream(20, 2, 20)
    assert [k[2] for k in stream(5, 1, 10, shuffle=False)] == [0, 1, 2, 3, 4] * 2


@pytest.mark.parametrize("world", [1, 3])
def test_stream_from_any_state_continues_exactly(world):
    for rank in range(world):
        sampler = ResumableSampler(7, seed=3, num_replicas=world, rank=rank)
        full = stream(7, 3, 25, rank=rank, world=world)
        for consumed in range(1, 20):
            state = sampler.advance(*full[consumed - 1][:2], 1)
            assert stream(7, 3, 5, state, rank=rank, world=world) == full[consumed:consumed + 5]
        assert sampler.state_dict() == {"epoch": 0, "position": 0}  # neither stream nor advance moves it


def test_stream_from_a_late_state_is_constant_time_and_replays_nothing(monkeypatch):
    calls = []
    original = ResumableSampler.shard
    monkeypatch.setattr(ResumableSampler, "shard", lambda self, e: calls.append(e) or original(self, e))
    got = keys(itertools.islice(ResumableSampler(1000, seed=0).stream((10**6, 999)), 2))
    assert calls == [10**6, 10**6 + 1]  # only the epochs it yields from
    assert [k[:2] for k in got] == [(10**6, 999), (10**6 + 1, 0)]


def test_advance_rolls_over_at_the_shard_end():
    sampler = ResumableSampler(5, seed=0, num_replicas=2)
    assert sampler.shard_size == 3
    assert sampler.advance(0, 1, 1) == (0, 2)
    assert sampler.advance(0, 2, 1) == (1, 0)
    assert sampler.advance(4, 1, 5) == (6, 0)  # a batch of 5 across two epoch ends


def test_ranks_take_strided_positions_of_a_padded_permutation():
    n, world = 10, 4
    perm = [k[2] for k in stream(n, 9, n)]
    padded = (perm * 2)[:12]
    shards = [stream(n, 9, 3, rank=r, world=world) for r in range(world)]
    for r, shard in enumerate(shards):
        assert [k[2] for k in shard] == padded[r::world]
        assert [k[:2] for k in shard] == [(0, 0), (0, 1), (0, 2)]
    assert set(k[2] for s in shards for k in s) == set(range(n))  # every sample, two of them twice (padding)
    even = [stream(8, 9, 2, rank=r, world=4) for r in range(4)]
    assert sorted(k[2] for s in even for k in s) == list(range(8))  # divisible: disjoint, no padding


@pytest.mark.parametrize("start", [(0, 11), (-1, 0), (0, -1), (0.5, 0)])
def test_stream_refuses_a_start_outside_the_epoch(start):
    with pytest.raises(ValueError):
        next(ResumableSampler(10, seed=0).stream(start))


def test_stream_from_the_end_of_an_epoch_starts_the_next():
    assert stream(10, 42, 1, (0, 10)) == [(1, 0, GOLDEN_10_SEED_42[10])]


# --------------------------------------------------------------------------- ResumableSampler


def test_resumable_sampler_epochs_are_the_pinned_orders_and_advance_by_themselves():
    sampler = ResumableSampler(10, seed=42)
    for epoch in range(3):
        indices = list(sampler)
        assert indices == GOLDEN_10_SEED_42[epoch * 10:(epoch + 1) * 10]
        assert [(i.epoch, i.position) for i in indices] == [(epoch, p) for p in range(10)]
    assert sampler.state_dict() == {"epoch": 3, "position": 0}
    assert len(sampler) == 10


@pytest.mark.parametrize("n, world, drop_last", [(10, 4, False), (10, 4, True), (8, 4, True), (3, 2, False), (2, 5, False)])
def test_resumable_sampler_shards_like_distributed_sampler(n, world, drop_last):
    for rank in range(world):
        ours = ResumableSampler(n, seed=0, shuffle=False, num_replicas=world, rank=rank, drop_last=drop_last)
        theirs = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
        assert list(ours) == list(theirs)
        assert len(ours) == len(theirs)


def test_set_epoch_restarts_another_epoch_but_keeps_the_position_of_the_current_one():
    sampler = ResumableSampler(6, seed=1)
    full = list(sampler)  # epoch 0; state is now (1, 0)
    sampler.load_state_dict({"epoch": 0, "position": 4})
    sampler.set_epoch(0)
    assert list(sampler) == full[4:]
    sampler.set_epoch(0)
    assert len(list(sampler)) == 6
    sampler.set_epoch(5)
    assert list(sampler) == ResumableSampler(6, seed=1).shard(5)


def test_resumable_sampler_resumes_from_a_saved_state_in_constant_time(monkeypatch):
    sampler = ResumableSampler(1000, seed=3)
    it = iter(sampler)
    consumed = [next(it) for _ in range(7)]
    state = sampler.state_dict()
    assert state == {"epoch": 0, "position": 7}
    calls = []
    original = ResumableSampler.shard
    monkeypatch.setattr(ResumableSampler, "shard", lambda self, e: calls.append(e) or original(self, e))
    resumed = ResumableSampler(1000, seed=3)
    resumed.load_state_dict(state)
    assert consumed + list(resumed) == original(sampler, 0)
    assert calls == [0]


def test_sample_indices_work_with_subset_random_split_and_batch_sampler():
    data = list(range(100, 120))
    part = random_split(data, [12, 8], generator=torch.Generator().manual_seed(0))[0]
    subset = Subset(data, list(range(0, 20, 2)))
    for dataset in (part, subset):
        sampler = ResumableSampler(dataset, seed=2)
        assert sorted(dataset[i] for i in sampler) == sorted(dataset[i] for i in range(len(dataset)))
    batches = list(BatchSampler(ResumableSampler(5, seed=2), batch_size=2, drop_last=False))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert all(isinstance(i, SampleIndex) and i.epoch == 0 for b in batches for i in b)


def test_sample_index_pickles_with_its_epoch_and_position():
    index = SampleIndex(7, epoch=3, position=2)
    copy = pickle.loads(pickle.dumps(index))
    assert (type(copy), int(copy), copy.epoch, copy.position) == (SampleIndex, 7, 3, 2)
    assert [10, 11, 12, 13, 14, 15, 16, 17][index] == 17


@pytest.mark.parametrize("state", [{"epoch": -1, "position": 0}, {"epoch": 0, "position": 11}, {"epoch": 0}, {"epoch": 0.5, "position": 0}])
def test_resumable_sampler_refuses_a_bad_state(state):
    with pytest.raises(ValueError):
        ResumableSampler(10, seed=0).load_state_dict(state)


@pytest.mark.parametrize("kwargs", [dict(data_source_or_length=0), dict(rank=1), dict(num_replicas=4, rank=-1),
                                    dict(data_source_or_length=3, num_replicas=4, drop_last=True), dict(seed=-1)])
def test_resumable_sampler_refuses_bad_arguments(kwargs):
    kwargs = {"data_source_or_length": 10, "seed": 0} | kwargs
    with pytest.raises((ValueError, TypeError)):
        ResumableSampler(kwargs.pop("data_source_or_length"), kwargs.pop("seed"), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(num_replicas=2, rank=2), dict(num_replicas=0, rank=0)])
def test_a_bad_rank_is_refused_naming_the_keywords_the_caller_passed(kwargs):
    with pytest.raises(ValueError, match=r"0 <= rank < num_replicas, got rank=\d+, num_replicas=\d+"):
        ResumableSampler(10, seed=0, **kwargs)
