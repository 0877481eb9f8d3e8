"""EpochSampler and ResumableSampler: permutations from shuffle/<epoch>, O(1) resume without replay,
rank shards as DistributedSampler cuts them, SampleIndex through Subset and BatchSampler."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler, Subset, random_split

from axs_lib.reproducibility import derive_seed
from axs_lib.sampling import EpochSampler, ResumableSampler, SampleIndex


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


# --------------------------------------------------------------------------- ResumableSampler


def test_resumable_sampler_epochs_are_epoch_samplers_orders_and_advance_by_themselves():
    sampler = ResumableSampler(10, seed=42)
    epoch_keys = take(EpochSampler(10, seed=42), 30)
    for epoch in range(3):
        indices = list(sampler)
        assert indices == [k[2] for k in epoch_keys[epoch * 10 : (epoch + 1) * 10]]
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


def test_stream_runs_across_epochs_exactly_as_epoch_sampler():
    for world in (1, 3):
        for rank in range(world):
            sampler = ResumableSampler(7, seed=5, num_replicas=world, rank=rank)
            for start in [(0, 0), (2, 1), (4, 2)]:
                expected = take(EpochSampler(7, seed=5, start=start, rank=rank, world_size=world), 12)
                got = take(sampler.stream(start), 12)
                assert [(i.epoch, i.position, int(i)) for i in got] == expected
            assert sampler.state_dict() == {"epoch": 0, "position": 0}  # the stream does not move it


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
