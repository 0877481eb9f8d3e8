"""Per-sample randomness: a sample's random draws depend on (seed, epoch, index) and nothing else.

Users write augmentation with the global generators (``np.random.rand()``, ``torch.rand()``,
``random.random()``). In a DataLoader those globals belong to whichever worker process loads the
sample, so the draws change with the worker count, with the order workers take batches, and with
a resume that restarts the workers. `SeededDataset` fixes that without touching the user's code:
around each ``__getitem__(index)`` it seeds python ``random``, numpy's global generator and
torch's global CPU generator from ``derive_seed(seed, "sample", epoch, index)``, then puts back
the states they had before. A sample's bits are then a pure function of (seed, epoch, index),
whichever process, worker count or resume produced it. In the main process (``num_workers=0``)
the caller's own global streams are put back as they were, so loading data draws nothing from
them; in a worker process they are left seeded (nothing else there should draw from them).

The epoch comes with the index: `axs_lib.sampling.ResumableSampler` yields `SampleIndex` ints
carrying ``.epoch``. A plain int index falls back to the wrapper's `set_epoch` value; that value
does not reach persistent worker processes, which hold their own copy of the dataset, so use the
sampler (or `axs_lib.loader.ResumableLoader`) with workers.

The wrapper must be the outermost dataset: ``SeededDataset(Subset(data, ids), seed)``, not
``Subset(SeededDataset(data, seed), ids)``, since ``Subset`` looks the index up as a plain int and
the epoch would not reach the wrapper.

What it does not cover: CUDA generators (datasets run on the CPU), generators the user created
(``np.random.default_rng()`` without a seed draws from the OS: never exact), and threads loading
samples concurrently (the globals are per process). Users who prefer explicit generators get
`sample_rng` (numpy) and `sample_generator` (torch), from their own streams, so they never repeat
the globals' numbers.
"""

from __future__ import annotations

import numbers
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from axs_lib.reproducibility import SEED_MAX, check_seed, derive_seed


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit seed of sample ``index`` in ``epoch``: ``derive_seed(seed, "sample", epoch, index)``."""
    return derive_seed(seed, "sample", int(epoch), int(index))


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A numpy Generator for sample ``index`` of ``epoch`` (stream ``sample/<epoch>/<index>/numpy``)."""
    return np.random.default_rng(derive_seed(seed, "sample", int(epoch), int(index), "numpy"))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch CPU Generator for sample ``index`` of ``epoch`` (stream ``sample/<epoch>/<index>/torch``)."""
    return torch.Generator().manual_seed(derive_seed(seed, "sample", int(epoch), int(index), "torch"))


class seeded_globals:
    """Context manager: seed python, numpy and torch CPU globals from ``seed64``; with ``restore``
    (the default) put back the states they had on exit."""

    def __init__(self, seed64: int, restore: bool = True):
        self.seed64 = seed64
        self.restore = restore

    def __enter__(self) -> None:
        if self.restore:
            self._saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed64)
        np.random.seed(self.seed64 & SEED_MAX)
        torch.default_generator.manual_seed(self.seed64)  # CPU only: CUDA generators stay untouched

    def __exit__(self, *exc) -> None:
        if self.restore:
            python_state, numpy_state, torch_state = self._saved
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            torch.set_rng_state(torch_state)


class SeededDataset(Dataset):
    """Wrap a map-style dataset so its global-RNG draws depend only on (seed, epoch, index).

    ``dataset[i]`` is ``inner[i]`` computed with the globals seeded from ``sample/<epoch>/<i>``;
    ``epoch`` is ``i.epoch`` for a `SampleIndex`, else the value of `set_epoch` (default 0).
    Its state (for plain-int indices) is that epoch.
    """

    def __init__(self, dataset: Dataset, seed: int):
        if isinstance(dataset, SeededDataset):
            raise TypeError("dataset is already a SeededDataset: wrap it once")
        if not callable(getattr(dataset, "__getitem__", None)):
            raise TypeError(f"SeededDataset wraps a map-style dataset (with __getitem__), got {type(dataset).__name__}")
        self.dataset = dataset
        self.seed = check_seed(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """The epoch used for plain-int indices (a `SampleIndex` brings its own)."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> Any:
        epoch = getattr(index, "epoch", self.epoch)
        # In a worker process the globals belong to the loader alone and every sample reseeds them,
        # so only the main process (num_workers=0) pays for saving and restoring them (numpy's
        # state copy is most of this wrapper's cost).
        with seeded_globals(sample_seed(self.seed, epoch, index), restore=get_worker_info() is None):
            return self.dataset[index]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "epoch" not in state:
            got = sorted(map(str, state))[:4] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"SeededDataset state must be a dict with 'epoch', got {str(got)[:120]}")
        self.set_epoch(state["epoch"])

    def __repr__(self) -> str:
        return f"SeededDataset({self.dataset!r}, seed={self.seed})"
