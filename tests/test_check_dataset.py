"""check_dataset / axs check-dataset: flags datasets whose samples depend on more than (seed, epoch,
index), names the sample and field, passes a SeededDataset around global-RNG augmentation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from axs_lib.check_dataset import check_dataset, dataset_keys, load_factory
from axs_lib.cli import main
from axs_lib.errors import UsageError

DATASETS = '''
import numpy as np
import torch
from torch.utils.data import Dataset


class GlobalRandom(Dataset):
    """Augmentation with the global generators: exact once wrapped in SeededDataset."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        image = torch.full((2, 3), float(index))
        if np.random.rand() < 0.5:
            image = image.flip(-1)
        return {"image": image + torch.rand(2, 3), "meta": {"noise": np.random.normal(size=3), "id": int(index)}}


class OsEntropy(GlobalRandom):
    """A generator without a seed: new numbers in every process and every run."""

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        sample["meta"]["noise"] = np.random.default_rng().normal(size=3)
        return sample


class OwnGenerator(GlobalRandom):
    """A seeded generator of the dataset's own: each worker advances its own copy."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        sample["image"] = sample["image"] * float(self.rng.random())
        return sample


def global_random():
    return GlobalRandom()


def os_entropy():
    return OsEntropy()


def own_generator():
    return OwnGenerator()


def not_a_dataset():
    return 42


class Unpicklable(GlobalRandom):
    """Samples holding a generator: fine in this process, impossible to send from a worker."""

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        sample["meta"]["lazy"] = (i for i in range(3))
        return sample


def unpicklable():
    return Unpicklable()
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / "user_datasets.py").write_text(textwrap.dedent(DATASETS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_datasets"


def test_a_seeded_dataset_around_global_random_augmentation_is_exact(module):
    report = check_dataset(load_factory(f"{module}:global_random"), batches=2, batch_size=2)
    assert report.exact and report.wrapped
    assert set(report.differences) == {"rerun", "workers", "resume"}


def test_an_unseeded_default_rng_is_flagged_with_its_sample_and_field(module):
    report = check_dataset(load_factory(f"{module}:os_entropy"), batches=2, batch_size=2)
    assert not report.exact
    diff = report.differences["rerun"]
    assert diff is not None and diff.field == "['meta']['noise']"
    first_key = next(dataset_keys(range(6), 0))  # the reference draws with seed 0
    assert (diff.epoch, diff.index) == (0, int(first_key))
    assert "differs in field ['meta']['noise']" in "\n".join(report.lines())


def test_a_generator_each_worker_copies_is_flagged_by_the_worker_check(module):
    report = check_dataset(load_factory(f"{module}:own_generator"), batches=2, batch_size=2)
    assert report.differences["rerun"] is None  # a fresh copy repeats itself...
    assert report.differences["workers"] is not None  # ...but two workers each advance their own
    assert report.differences["workers"].field == "['image']"


def test_the_command_exits_0_when_exact_1_when_not_2_on_bad_input(module, capsys):
    assert main(["check-dataset", f"{module}:global_random", "--batches", "2", "--batch-size", "2"]) == 0
    assert "exact" in capsys.readouterr().out
    assert main(["check-dataset", f"{module}:os_entropy", "--batches", "2", "--batch-size", "2"]) == 1
    assert "NOT exact" in capsys.readouterr().out
    for target, message in [(f"{module}:not_a_dataset", "not a map-style Dataset"), (f"{module}:missing", "no attribute"),
                            ("no_such_module_here:f", "no module named"), ("user_datasets", "MODULE:FACTORY"),
                            ("missing.py:f", "no such file")]:
        assert main(["check-dataset", target]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_python_file_can_be_named_instead_of_a_module(module):
    assert check_dataset(load_factory("user_datasets.py:global_random"), batches=2, batch_size=1).exact


def test_bad_arguments_are_usage_errors(module):
    with pytest.raises(UsageError):
        check_dataset(load_factory(f"{module}:global_random"), batches=1)
    with pytest.raises(UsageError):
        check_dataset(object())


def test_samples_that_cannot_be_pickled_for_workers_are_one_line_in_bounded_time(module, tmp_path):
    """A worker's queue thread drops a sample it cannot pickle and the loader waits for it forever,
    so the check runs as a process with a deadline."""
    repo = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "axs_lib.cli", "check-dataset", f"{module}:unpicklable", "--batches", "2", "--batch-size", "2"]
    try:
        child = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(tmp_path)])})
    except subprocess.TimeoutExpired:
        pytest.fail("check-dataset hung on a sample that cannot be pickled")
    assert child.returncode == 2, child.stderr
    assert child.stderr.strip().splitlines() == [
        "axs: error: user_datasets:unpicklable: sample (epoch 0, index 3) cannot be pickled, so worker processes cannot send it "
        "(TypeError: cannot pickle 'generator' object); return tensors, arrays, numbers, strings and containers of them"]
