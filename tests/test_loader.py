"""ResumableLoader: its state is what the loop consumed, resume is exact with any worker count,
endless iteration walks the sampler's stream (the order tests/test_sampling.py pins), and a toy loop of
global-RNG calls is exact across reruns, worker counts and SIGKILL + resume."""

from __future__ import annotations

import gc
import importlib.util
import itertools
import os
import random
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, SequentialSampler

from axs_lib.loader import ResumableLoader
from axs_lib.samples import SeededDataset
from axs_lib.sampling import ResumableSampler

REPO = Path(__file__).resolve().parents[1]


class KeyDataset(Dataset):
    """Each sample is its own key: (epoch, position, index)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        return torch.tensor([index.epoch, index.position, int(index)])


class GlobalRandomDataset(Dataset):
    def __len__(self) -> int:
        return 11

    def __getitem__(self, index):
        return torch.rand(2) + float(np.random.rand()) + random.random() + int(index)


def keys(batches) -> list[tuple[int, int, int]]:
    return [tuple(row.tolist()) for batch in batches for row in batch]


def test_the_state_counts_batches_handed_to_the_loop_not_those_prefetched():
    loader = ResumableLoader(KeyDataset(20), 3, seed=0, num_workers=2, prefetch_factor=4)
    it = iter(loader)
    for consumed in range(1, 5):
        next(it)
        assert loader.state_dict() == {"epoch": 0, "position": 3 * consumed, "num_samples": 20}


def test_a_for_loop_is_the_rest_of_the_epoch_and_then_the_next_epoch_starts():
    loader = ResumableLoader(KeyDataset(10), 4, seed=1)
    assert len(loader) == 3
    epoch0 = list(loader)
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    assert keys(epoch0) == take_stream(10, 1, (0, 0), 10)
    epoch1 = list(loader)
    assert keys(epoch1) == take_stream(10, 1, (1, 0), 10)
    dropping = ResumableLoader(KeyDataset(10), 4, seed=1, drop_last=True)
    assert len(dropping) == 2 and [len(b) for b in dropping] == [4, 4]
    assert dropping.state_dict()["epoch"] == 1 and dropping.state_dict()["position"] == 0


def test_set_epoch_starts_another_epoch_and_keeps_the_position_of_the_current_one():
    loader = ResumableLoader(KeyDataset(10), 4, seed=1)
    next(iter(loader))
    loader.set_epoch(0)
    assert loader.state_dict()["position"] == 4
    loader.set_epoch(3)
    assert keys(loader) == take_stream(10, 1, (3, 0), 10)


def take_stream(n, seed, start, count, rank=0, world_size=1):
    """``(epoch, position, index)`` of the first ``count`` indices of the sampler's endless stream from ``start``."""
    stream = ResumableSampler(n, seed, num_replicas=world_size, rank=rank).stream(start)
    return [(i.epoch, i.position, int(i)) for i in itertools.islice(stream, count)]


@pytest.mark.parametrize("world_size", [1, 3])
def test_endless_batches_walk_the_data_exactly_as_the_sampler_stream(world_size):
    for rank in range(world_size):
        sampler = ResumableSampler(7, seed=4, num_replicas=world_size, rank=rank)
        for start in [(0, 0), (2, 1)]:
            loader = ResumableLoader(KeyDataset(7), 3, seed=4, sampler=sampler)
            loader.load_state_dict({"epoch": start[0], "position": start[1]})
            got = keys(itertools.islice(loader.endless(), 6))
            assert got == take_stream(7, 4, start, 18, rank, world_size)
            state = loader.state_dict()
            assert (state["epoch"], state["position"]) == sampler.advance(*got[-1][:2], 1)


@pytest.mark.parametrize("before, after", [(2, 0), (0, 2), (2, 1)])
def test_endless_resume_with_another_worker_count_continues_the_same_stream(before, after):
    expected = take_stream(7, 4, (0, 0), 13 * 3)
    loader = ResumableLoader(KeyDataset(7), 3, seed=4, num_workers=before)
    first = keys(itertools.islice(loader.endless(), 5))
    state = loader.state_dict()
    resumed = ResumableLoader(KeyDataset(7), 3, seed=4, num_workers=after)
    resumed.load_state_dict(state)
    assert first + keys(itertools.islice(resumed.endless(), 8)) == expected


@pytest.mark.parametrize("before, after", [(2, 0), (0, 2)])
def test_mid_epoch_resume_gives_bit_identical_augmented_batches(before, after):
    def loader(workers):
        return ResumableLoader(SeededDataset(GlobalRandomDataset(), seed=5), 2, seed=5, num_workers=workers)

    reference = loader(0)
    uninterrupted = [b for _ in range(2) for b in reference]  # two epochs
    first = loader(before)
    head = list(itertools.islice(iter(first), 4))
    resumed = loader(after)
    resumed.load_state_dict(first.state_dict())
    tail = list(resumed) + list(resumed)
    assert len(head + tail) == len(uninterrupted)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, uninterrupted))
    # and without the wrapper the same resume is not exact: the check above can fail
    plain = ResumableLoader(GlobalRandomDataset(), 2, seed=5, num_workers=2)
    assert not all(torch.equal(a, b) for a, b in zip(plain, uninterrupted))


def test_a_second_iteration_ends_the_first():
    loader = ResumableLoader(KeyDataset(10), 2, seed=0)
    first = iter(loader)
    next(first)
    second = loader.endless()
    next(second)
    with pytest.raises(RuntimeError, match="another one started"):
        next(first)


def test_a_state_for_another_dataset_length_is_refused():
    loader = ResumableLoader(KeyDataset(10), 2, seed=0)
    with pytest.raises(ValueError, match="12 samples"):
        loader.load_state_dict({"epoch": 0, "position": 2, "num_samples": 12})
    with pytest.raises(ValueError):
        loader.load_state_dict({"epoch": 0, "position": 11, "num_samples": 10})


@pytest.mark.parametrize("kwargs, error", [
    (dict(sampler=SequentialSampler(range(10))), TypeError),
    (dict(sampler=ResumableSampler(9, seed=0)), ValueError),
    (dict(shuffle=False, generator=torch.Generator()), TypeError),
    (dict(drop_last=True, batch_size=11), ValueError),
    (dict(batch_size=0), ValueError),
])
def test_contradictory_arguments_are_refused(kwargs, error):
    kwargs = {"batch_size": 2} | kwargs
    with pytest.raises(error):
        ResumableLoader(KeyDataset(10), kwargs.pop("batch_size"), seed=0, **kwargs)


def test_a_dropped_loader_is_freed_at_once_with_its_workers():
    """No reference cycle: the workers stop when the last reference goes, not at a later
    cycle collection (which can finalise their queues first and leave each to a 5 s timeout)."""
    loader = ResumableLoader(KeyDataset(10), 2, seed=0, num_workers=1)
    next(loader.endless())
    ref = weakref.ref(loader)
    gc.disable()
    try:
        del loader
        assert ref() is None
    finally:
        gc.enable()


# --------------------------------------------------------------------------- a toy loop, end to end

TOY_LOOP = '''
import sys, time
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from axs_lib.loader import ResumableLoader
from axs_lib.reproducibility import derive_seed, seed_globals, set_seed
from axs_lib.run_dir import CheckpointManager
from axs_lib.samples import SeededDataset
from axs_lib.state import TrainingState

STEPS, EVERY, SEED = 24, 3, 3


class Toy(Dataset):  # nothing but the global generators
    def __len__(self):
        return 13

    def __getitem__(self, index):
        x = torch.rand(8) + float(np.random.normal())
        return x, (x.sum() > 4).float().unsqueeze(0)


def main(out, workers, pause=0.0):
    set_seed(SEED)
    run = CheckpointManager(out)
    found = run.resume("auto")
    seed_globals(derive_seed(SEED, "init"))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=STEPS)
    loader = ResumableLoader(SeededDataset(Toy(), SEED), 4, seed=SEED, num_workers=workers)
    state = TrainingState(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, seed=SEED)
    if found is not None:
        state.load_state_dict(found[1])
    batches = loader.endless()
    with loader, run:
        while state.step < STEPS:
            seed_globals(derive_seed(SEED, "step", state.step))
            x, y = next(batches)
            optimizer.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
            optimizer.step()
            scheduler.step()
            state.step += 1
            if state.step % EVERY == 0:
                run.save(state.state_dict(), state.step)
            time.sleep(pause)  # the work of a real step: room for the kill to land anywhere


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
'''


@pytest.fixture(scope="module")
def toy_loop(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy_loop") / "toy_loop.py"
    path.write_text(TOY_LOOP)
    spec = importlib.util.spec_from_file_location("toy_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toy_checkpoints(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "checkpoints").glob("checkpoint_step_*.pt"))}


def test_a_toy_loop_of_global_rng_calls_is_exact_across_reruns_workers_and_sigkill(toy_loop, tmp_path):
    toy_loop.main(tmp_path / "ref", 0)
    reference = toy_checkpoints(tmp_path / "ref")
    assert len(reference) == toy_loop.STEPS // toy_loop.EVERY
    toy_loop.main(tmp_path / "rerun", 0)
    toy_loop.main(tmp_path / "workers", 2)
    assert toy_checkpoints(tmp_path / "rerun") == reference
    assert toy_checkpoints(tmp_path / "workers") == reference

    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, toy_loop.__file__, str(out), "2", "0.05"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not toy_checkpoints(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.5))
    assert proc.poll() is None, "the run ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the main process and its workers
    proc.wait()
    assert 0 < len(toy_checkpoints(out)) < len(reference)
    toy_loop.main(out, 1)  # resume with another worker count
    assert toy_checkpoints(out) == reference, f"kill moment drawn with random.Random({seed})"
    for data in reference.values():
        (tmp_path / "c.pt").write_bytes(data)
        torch.load(tmp_path / "c.pt", weights_only=True)


def test_the_samplers_state_is_the_loaders_consumed_state():
    sampler = ResumableSampler(10, seed=2)
    loader = ResumableLoader(KeyDataset(10), 3, seed=2, sampler=sampler, num_workers=1)
    it = loader.endless()
    for _ in range(4):
        next(it)
    assert sampler.state_dict() == {"epoch": 1, "position": 2}
    assert loader.state_dict() == {"epoch": 1, "position": 2, "num_samples": 10}


# --------------------------------------------------------------------------- micro-batch plans


def _plan_batches(n: int, plan, *, endless: bool, steps: int, start: dict | None = None) -> tuple[list[list[int]], dict]:
    from axs_lib.loader import ResumableLoader

    loader = ResumableLoader(list(range(n)), plan.micro_batch_size, seed=3, plan=plan, collate_fn=list)
    if start is not None:
        loader.load_state_dict(start)
    it = loader.endless() if endless else iter(loader)
    got = [[int(i) for i in next(it)] for _ in range(steps * plan.per_rank)]
    return got, loader.state_dict()


@pytest.mark.parametrize("endless", [True, False])
def test_a_plan_gives_each_rank_its_micro_batches_of_every_step_whatever_the_world_size(endless):
    from axs_lib.distributed import MicroBatchPlan

    n, steps = 25, 2  # 25 samples, steps of 12: the finite epoch has two whole steps and a tail
    one, state_one = _plan_batches(n, MicroBatchPlan(3, 4), endless=endless, steps=steps)
    for world in (2, 4):
        parts = [_plan_batches(n, MicroBatchPlan(3, 4, world, r), endless=endless, steps=steps) for r in range(world)]
        per_rank = 4 // world
        merged = [parts[r][0][s * per_rank + j] for s in range(steps) for r in range(world) for j in range(per_rank)]
        assert merged == one  # rank r's micro-batches are slots r*k/W .. of each step, in order
        assert all(state == state_one for _, state in parts)  # the state counts whole steps, the same on every rank
    assert state_one == ({"epoch": 0, "position": 24, "num_samples": 25} if endless else
                         {"epoch": 1, "position": 0, "num_samples": 25})  # the finite tail makes no step


def test_a_plan_resumes_at_a_step_boundary_on_another_world_size():
    from axs_lib.distributed import MicroBatchPlan

    whole, _ = _plan_batches(10, MicroBatchPlan(2, 2), endless=True, steps=4)
    first, state = _plan_batches(10, MicroBatchPlan(2, 2, 2, 0), endless=True, steps=2)  # two steps on two ranks
    rest, _ = _plan_batches(10, MicroBatchPlan(2, 2), endless=True, steps=2, start=state)  # then one rank
    assert rest == whole[4:] and first == [whole[0], whole[2]]


def test_a_plan_is_refused_with_a_sharded_sampler_another_batch_size_or_a_step_larger_than_an_epoch():
    from axs_lib.distributed import MicroBatchPlan
    from axs_lib.loader import ResumableLoader
    from axs_lib.sampling import ResumableSampler

    data = list(range(8))
    with pytest.raises(ValueError, match="must not be sharded"):
        ResumableLoader(data, 2, seed=0, sampler=ResumableSampler(8, 0, num_replicas=2, rank=0), plan=MicroBatchPlan(2, 2))
    with pytest.raises(ValueError, match="differs from the plan's micro_batch_size 2"):
        ResumableLoader(data, 3, seed=0, plan=MicroBatchPlan(2, 2))
    with pytest.raises(ValueError, match="larger than the 8 samples of an epoch"):
        ResumableLoader(data, 3, seed=0, plan=MicroBatchPlan(3, 3))
    assert len(ResumableLoader(data, 2, seed=0, plan=MicroBatchPlan(2, 2, 2, 1))) == 2  # this rank's micro-batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_close_ends_the_streams_the_loader_handed_out(num_workers):
    """A user's loop that keeps its batch iterator past ``close()`` holds no DataLoader iterator (and
    no worker queues) any more: the iterator stops, and the loader's state stays where it was."""
    loader = ResumableLoader(KeyDataset(10), 2, seed=3, num_workers=num_workers)
    stream, epoch_pass = loader.endless(), iter(loader)
    next(stream)
    state = loader.state_dict()
    loader.close()
    for handed_out in (stream, epoch_pass):
        with pytest.raises(StopIteration):
            next(handed_out)
    assert loader.state_dict() == state
    assert next(loader.endless()) is not None  # the loader itself can start again
    loader.close()


def test_close_from_inside_a_running_stream_still_stops_the_workers_and_refuses_the_rest():
    """close() called while a stream is computing its batch (here from the dataset itself) cannot end
    that generator; it skips it, stops the workers, and the stream refuses its next batch."""

    class ClosingDataset(KeyDataset):
        loader = None

        def __getitem__(self, key):
            if int(key) == 5 and self.loader is not None:
                self.loader.close()
            return super().__getitem__(key)

    dataset = ClosingDataset(10)
    loader = ResumableLoader(dataset, 10, seed=0, num_workers=0)
    dataset.loader = loader
    stream = loader.endless()
    with pytest.raises(RuntimeError, match="the loader was closed"):
        next(stream)
