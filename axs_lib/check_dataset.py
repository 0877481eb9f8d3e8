"""Is a user's dataset exact? Draw its samples several ways and compare them bit for bit.

`check_dataset` takes a map-style Dataset, or a factory that builds one, wraps it in
`axs_lib.samples.SeededDataset` unless it already is, and draws the same stream of samples
(`ResumableLoader.endless` from the start, so a small dataset is seen across an epoch boundary)
four ways:

* ``reference``: no workers;
* ``rerun``: a second dataset from the factory (the same object when given one), no workers:
  catches OS entropy (``np.random.default_rng()`` without a seed, the clock) and state that
  a dataset carries from call to call;
* ``workers``: ``num_workers`` worker processes: catches generators a worker copies from the
  parent and advances on its own;
* ``resume``: half the batches with workers, `state_dict`, a new loader with one worker fewer
  (or none) from `load_state_dict`, the rest: catches anything that depends on what came before.

Every sample is compared with the reference's, field by field (nested dicts, lists, tuples,
tensors, arrays, numbers, strings), by bytes, so NaN payloads and -0.0 count (`axs_lib.bitdiff`). The report names the
first sample that differs in each check, as ``(epoch, index)``, the field and how it differs.
``axs check-dataset MODULE:FACTORY`` is the command-line shell over this module.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


from axs_lib import bitdiff
from axs_lib.errors import AxsError, InputError, UsageError
from axs_lib.loader import ResumableLoader
from axs_lib.samples import SeededDataset
from axs_lib.sampling import ResumableSampler, SampleIndex

CHECKS = ("rerun", "workers", "resume")


@dataclass
class Difference:
    """The first sample of a check that differs from the reference."""

    check: str
    epoch: int
    index: int
    field: str  # e.g. ``["image"][0]``; empty for the sample itself
    detail: str

    def line(self) -> str:
        where = f"field {self.field}" if self.field else "the sample"
        return f"{self.check}: sample (epoch {self.epoch}, index {self.index}) differs in {where}: {self.detail}"


@dataclass
class CheckReport:
    """What `check_dataset` found; ``exact`` when no check found a difference."""

    name: str
    samples: int
    wrapped: bool  # True when we wrapped the dataset in SeededDataset
    num_workers: int
    differences: dict[str, Difference | None] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return all(d is None for d in self.differences.values())

    def lines(self) -> list[str]:
        how = "wrapped in SeededDataset" if self.wrapped else "already a SeededDataset"
        out = [f"{self.name}: {self.samples} samples drawn 4 ways ({how})"]
        labels = {"rerun": "rerun (new dataset, 0 workers)", "workers": f"0 vs {self.num_workers} workers",
                  "resume": "save/restore mid-stream (other worker count)"}
        for check, diff in self.differences.items():
            out.append(f"  {labels[check]}: {'identical' if diff is None else 'DIFFERS'}")
            if diff is not None:
                out.append(f"    {diff.line()}")
        out.append("exact: every sample is the same bits every way" if self.exact else
                   "NOT exact: the samples above depend on more than (seed, epoch, index)")
        return out


# --------------------------------------------------------------------------- loading the dataset


def load_factory(spec: str) -> Callable[[], Any]:
    """``module.path:name`` or ``path/to/file.py:name`` -> the object named (a factory or a dataset).

    A module is imported with the current directory on the path, as ``python -m`` would.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{spec}: expected MODULE:FACTORY (e.g. mypkg.data:make_dataset or data.py:make_dataset)")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise InputError(path, "no such file")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        sys.modules.setdefault(path.stem, module)  # so worker processes and pickling find its classes
        _run_user_code(f"importing {path}", lambda: module_spec.loader.exec_module(module))  # type: ignore[union-attr]
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise UsageError(f"{spec}: no module named {exc.name!r}") from None
            raise UsageError(f"{spec}: importing {module_name} failed: {exc}") from None
        except Exception as exc:  # the user's module failed: say so in one line
            raise UsageError(f"{spec}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise UsageError(f"{spec}: {module_name} has no attribute {attr!r}")
    return getattr(module, attr)


def _run_user_code(what: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except AxsError:
        raise
    except Exception as exc:
        raise UsageError(f"{what} failed: {type(exc).__name__}: {exc}") from None


def _is_dataset(obj: Any) -> bool:
    return callable(getattr(obj, "__getitem__", None)) and callable(getattr(obj, "__len__", None))


def _build(source: Any, name: str) -> Any:
    dataset = source
    if not _is_dataset(source):
        if not callable(source):
            raise UsageError(f"{name}: neither a map-style Dataset (__getitem__ and __len__) nor a factory returning one")
        dataset = _run_user_code(f"{name}()", source)
    if not _is_dataset(dataset):
        raise UsageError(f"{name}() returned {type(dataset).__name__}, not a map-style Dataset (__getitem__ and __len__)")
    if len(dataset) < 1:
        raise UsageError(f"{name}: the dataset is empty")
    return dataset


# --------------------------------------------------------------------------- drawing


def _as_list(samples: list) -> list:
    """collate_fn: keep the samples as they are, one by one."""
    return samples


def _draw(dataset, seed: int, batch_size: int, batches: int, num_workers: int, split: int | None = None) -> list:
    """``batches`` batches of samples from the start of the endless stream; with ``split``, the
    loader is saved after ``split`` batches and a new one (one worker fewer) goes on from there."""
    def loader(workers: int) -> ResumableLoader:
        return ResumableLoader(dataset, batch_size, seed=seed, num_workers=workers, collate_fn=_as_list)

    first = loader(num_workers)
    with first:
        head = list(itertools.islice(first.endless(), batches if split is None else split))
        state = first.state_dict()
    if split is None:
        return [s for batch in head for s in batch]
    second = loader(max(num_workers - 1, 0))
    with second:
        second.load_state_dict(state)
        tail = list(itertools.islice(second.endless(), batches - split))
    return [s for batch in head + tail for s in batch]


def check_dataset(
    factory_or_dataset: Any,
    *,
    seed: int = 0,
    batches: int = 4,
    batch_size: int = 4,
    num_workers: int = 2,
    name: str | None = None,
) -> CheckReport:
    """Draw ``batches * batch_size`` samples four ways and compare them bit for bit (see module doc).

    Raises `UsageError` (exit 2) when the input is not a dataset or a factory of one, or when
    the user's code fails while building it or drawing from it.
    """
    for label, value, low in (("batches", batches, 2), ("batch_size", batch_size, 1), ("num_workers", num_workers, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{label} must be an integer >= {low}, got {value!r}")
    name = name or getattr(factory_or_dataset, "__name__", type(factory_or_dataset).__name__)

    def build():
        dataset = _build(factory_or_dataset, name)
        return (dataset, False) if isinstance(dataset, SeededDataset) else (SeededDataset(dataset, seed), True)

    dataset, wrapped = build()
    seed = dataset.seed
    keys = list(itertools.islice(dataset_keys(dataset, seed), batches * batch_size))
    def draw(ds, workers: int, split: int | None = None) -> list:
        return _run_user_code(f"drawing samples of {name}", lambda: _draw(ds, seed, batch_size, batches, workers, split))

    reference = draw(dataset, 0)
    _check_picklable(name, keys, reference)
    runs = {
        "rerun": lambda: draw(build()[0], 0),
        "workers": lambda: draw(dataset, num_workers),
        "resume": lambda: draw(dataset, num_workers, batches // 2),
    }
    report = CheckReport(name, len(keys), wrapped, num_workers)
    for check in CHECKS:
        report.differences[check] = first_difference(check, keys, reference, runs[check]())
    return report


def _check_picklable(name: str, keys: list[SampleIndex], samples: list) -> None:
    """Worker processes send samples back pickled, and a sample that cannot be pickled is lost
    in the worker's queue thread while the loader waits for it forever: find it here, in this
    process, and name it."""
    for key, sample in zip(keys, samples):
        try:
            pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - PicklingError, TypeError, AttributeError...
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise UsageError(f"{name}: sample (epoch {key.epoch}, index {int(key)}) cannot be pickled, so worker processes "
                             f"cannot send it ({type(exc).__name__}: {detail}); return tensors, arrays, numbers, "
                             "strings and containers of them") from None


def dataset_keys(dataset, seed: int) -> Iterator[SampleIndex]:
    """The sample keys the loader visits: its default sampler's endless stream from the start."""
    return ResumableSampler(dataset, seed).stream((0, 0))


def first_difference(check: str, keys: list[SampleIndex], reference: list, other: list) -> Difference | None:
    """The first sample of ``other`` that differs from ``reference`` by a bit (`axs_lib.bitdiff`)."""
    for key, a, b in zip(keys, reference, other, strict=True):
        found = bitdiff.first_difference(a, b)
        if found is not None:
            return Difference(check, key.epoch, int(key), found.subscript, found.detail)
    return None
