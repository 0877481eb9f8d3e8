"""The trainer benchmark's timer sees the loop through the public toolkit only.

`benchmarks.bench_train.SaveTimer` wraps `CheckpointManager.save` (and the manager's ``on_write``
hook), `AsyncCheckpointWriter.wait` and `ResumableLoader.endless` while a trainer runs, and puts
them back afterwards. These checks drive those public objects directly, as a trainer does, without
training anything.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo on the path
    sys.path.insert(0, str(REPO))

from benchmarks.bench_train import SaveTimer  # noqa: E402

from axs_lib.checkpoint_writer import AsyncCheckpointWriter  # noqa: E402
from axs_lib.loader import ResumableLoader  # noqa: E402
from axs_lib.run_dir import CheckpointManager  # noqa: E402


def test_the_timer_wraps_only_public_toolkit_methods_and_puts_them_back():
    before = (CheckpointManager.save, AsyncCheckpointWriter.wait, ResumableLoader.endless)
    with SaveTimer().patched():
        during = (CheckpointManager.save, AsyncCheckpointWriter.wait, ResumableLoader.endless)
        assert all(a is not b for a, b in zip(before, during))
    assert (CheckpointManager.save, AsyncCheckpointWriter.wait, ResumableLoader.endless) == before


def test_the_loop_span_runs_from_the_first_batch_request_to_the_close_of_the_batches():
    timer = SaveTimer()
    with timer.patched():
        loader = ResumableLoader(list(range(8)), 2, seed=0)
        batches = loader.endless()
        assert timer.cpu_marks == []  # asking for the iterator is not the loop's start
        list(itertools.islice(batches, 3))
        assert len(timer.cpu_marks) == 1
        batches.close()
    assert timer.loop_cpu_seconds() >= 0


def test_a_loop_that_never_drew_from_endless_is_reported_not_measured_as_nothing():
    timer = SaveTimer()
    with timer.patched():
        list(ResumableLoader(list(range(8)), 2, seed=0))  # finite iteration: not the trainer's way
    with pytest.raises(RuntimeError, match="ResumableLoader.endless 0 times"):
        timer.loop_cpu_seconds()


def test_each_save_is_timed_with_the_manifest_hook_inside_it(tmp_path):
    timer = SaveTimer()
    seen = []
    with timer.patched():
        manager = CheckpointManager(tmp_path, on_write=seen.append)
        manager.save({"step": 1, "w": torch.zeros(2)}, 1)
        manager.save({"step": 2, "w": torch.ones(2)}, 2)
    assert len(seen) == 2  # the hook still runs, once per save, wrapped once
    assert len(timer.calls) == 2
    assert all(call["save"] >= call["manifest"] > 0 for call in timer.calls)
