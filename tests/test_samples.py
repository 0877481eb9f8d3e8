"""SeededDataset and the per-sample generators: a sample's random draws depend on (seed, epoch,
index) only, whatever process loads it; the plain guide recipe (seed_worker) is shown not to be."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from axs_lib.reproducibility import create_reproducible_generator, seed_worker
from axs_lib.samples import SeededDataset, sample_generator, sample_rng
from axs_lib.sampling import ResumableSampler, SampleIndex


class GlobalRandomDataset(Dataset):
    """Augmentation written the usual way: the global generators, in __getitem__."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index):
        base = torch.full((3,), float(index))
        return {
            "x": base + torch.rand(3) + float(np.random.rand()),
            "flip": torch.tensor(random.random() < 0.5),
            "noise": np.random.normal(size=2),
        }


def same(a, b) -> bool:
    return all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_a_sample_depends_on_seed_epoch_and_index_only():
    data = SeededDataset(GlobalRandomDataset(), seed=7)
    first = data[SampleIndex(3, epoch=1)]
    np.random.seed(123), torch.manual_seed(5), random.seed(9)  # whatever the globals were before
    assert same(data[SampleIndex(3, epoch=1)], first)
    assert same(SeededDataset(GlobalRandomDataset(), seed=7)[SampleIndex(3, epoch=1)], first)
    assert not same(data[SampleIndex(3, epoch=2)], first)
    assert not same(SeededDataset(GlobalRandomDataset(), seed=8)[SampleIndex(3, epoch=1)], first)


def test_the_callers_global_generators_are_left_as_they_were():
    data = SeededDataset(GlobalRandomDataset(), seed=7)
    np.random.seed(1), torch.manual_seed(1), random.seed(1)
    expected = (np.random.rand(), torch.rand(1).item(), random.random())
    np.random.seed(1), torch.manual_seed(1), random.seed(1)
    data[SampleIndex(0, epoch=0)]
    assert (np.random.rand(), torch.rand(1).item(), random.random()) == expected


def test_plain_int_indices_use_the_epoch_set_on_the_wrapper():
    data = SeededDataset(GlobalRandomDataset(), seed=7)
    data.set_epoch(4)
    assert same(data[2], data[SampleIndex(2, epoch=4)])
    state = data.state_dict()
    other = SeededDataset(GlobalRandomDataset(), seed=7)
    other.load_state_dict(state)
    assert same(other[2], data[2])


def test_a_subset_goes_inside_the_wrapper_not_around_it():
    inner = SeededDataset(Subset(GlobalRandomDataset(), [5, 6, 7]), seed=1)
    outer = Subset(SeededDataset(GlobalRandomDataset(), seed=1), [5, 6, 7])
    assert not same(inner[SampleIndex(0, epoch=0)], inner[SampleIndex(0, epoch=1)])
    # around it, Subset looks the index up as a plain int: the epoch is lost, every epoch is alike
    assert same(outer[SampleIndex(0, epoch=0)], outer[SampleIndex(0, epoch=1)])


def load_all(dataset, sampler, num_workers, **kwargs):
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=num_workers, **kwargs)
    return [batch for batch in loader]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_samples_are_the_same_with_any_number_of_workers(num_workers):
    data = SeededDataset(GlobalRandomDataset(), seed=3)
    reference = load_all(data, ResumableSampler(data, seed=3), 0)
    other = load_all(data, ResumableSampler(data, seed=3), num_workers)
    assert all(same(a, b) for a, b in zip(reference, other, strict=True))


def test_the_plain_guide_recipe_differs_between_0_and_2_workers():
    """What SeededDataset exists for: seed_worker + a seeded generator fix a run, not the worker count."""
    data = GlobalRandomDataset()

    def run(workers):
        return load_all(data, None, workers, worker_init_fn=seed_worker, generator=create_reproducible_generator(3))

    assert all(same(a, b) for a, b in zip(run(2), run(2), strict=True))  # a rerun is fixed...
    assert not all(same(a, b) for a, b in zip(run(0), run(2), strict=True))  # ...the worker count is not


def test_sample_generators_are_fixed_per_sample_and_apart_from_the_globals():
    assert np.array_equal(sample_rng(1, 2, 3).random(4), sample_rng(1, 2, 3).random(4))
    assert not np.array_equal(sample_rng(1, 2, 3).random(4), sample_rng(1, 2, 4).random(4))
    assert torch.equal(torch.rand(4, generator=sample_generator(1, 2, 3)), torch.rand(4, generator=sample_generator(1, 2, 3)))
    assert not torch.equal(torch.rand(4, generator=sample_generator(1, 2, 3)), torch.rand(4, generator=sample_generator(1, 3, 3)))

    class Both(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return torch.rand(4), torch.rand(4, generator=sample_generator(1, index.epoch, index))

    global_draw, own_draw = SeededDataset(Both(), seed=1)[SampleIndex(0, epoch=0)]
    assert not torch.equal(global_draw, own_draw)


def test_wrapping_twice_or_wrapping_a_non_dataset_is_refused():
    data = SeededDataset(GlobalRandomDataset(), seed=0)
    with pytest.raises(TypeError):
        SeededDataset(data, seed=0)
    with pytest.raises(TypeError):
        SeededDataset(42, seed=0)
    with pytest.raises((TypeError, ValueError)):
        SeededDataset(GlobalRandomDataset(), seed=-1)
