"""Shared fixtures: tile sets and trained reference runs, each made once per test run.

Most of the suite's time used to go into training the same small runs again and starting
processes that import torch. So:

* The tiles and the uninterrupted reference runs that other runs are compared against are built
  once per ``pytest`` invocation, also under pytest-xdist (where every worker is its own session):
  the first worker that asks builds it under a file lock in the directory all workers share, the
  others wait and reuse it. Tests never write into a shared directory; they copy it first.
* Training runs in this process (``axs_lib.cli.main``) unless a separate process is what a test is
  about (SIGKILL, SIGTERM, a second process against a lock, torchrun, the guide's commands).
* One intra-op thread per process (``OMP_NUM_THREADS=1`` unless set, inherited by every process a
  test starts): two xdist workers on a two-core machine, each spinning a thread per core, run
  several times slower. The setting is part of the environment fingerprint, so an in-process
  reference and a subprocess it is compared with must share it, and do.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, so it applies in here too
os.environ.setdefault("MKL_NUM_THREADS", "1")  # as the kill harness sets it: both are in the environment fingerprint

import fcntl  # noqa: E402
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))  # the kill harness (tools/killtest.py) is a test tool, not package code

import killtest  # noqa: E402

from axs_lib.cli import main  # noqa: E402
from axs_lib.ingest import write_demo_tiles, write_synthetic_tiles  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The Stage-1 configuration every kill, resume and rerun test compares against: the kill harness's
# (width 8, batch 3, a checkpoint every 2 steps, validation every 4, seed 42) on the six demo tiles.
REFERENCE_STEPS = 10


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``<shared>/<name>``, built by ``build(path)`` by the first worker of this test run to ask."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: .../pytest-N/popen-gwK
    out, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            build(out)
            done.touch()
    return out


def import_file(path: Path, name: str):
    """The Python file ``path`` imported as module ``name`` (an example script, not on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does: dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def train_in_process(argv: list[str]) -> None:
    """``axs train stage1 ARGV`` in this process, leaving its determinism flags as they were."""
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        code = main(["train", "stage1", *argv])
    finally:
        torch.use_deterministic_algorithms(flags[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[1], flags[2]
    assert code == 0, f"reference training failed ({code}): {argv}"


@pytest.fixture(scope="session")
def demo_tiles(tmp_path_factory):
    """Directory holding the six real BigEarthNet demo tiles (from the bigearthnet-common wheel)."""

    def build(out: Path) -> None:
        out.mkdir()
        write_demo_tiles(out)

    return build_once(tmp_path_factory, "demo_tiles", build)


@pytest.fixture(scope="session")
def synth_tiles(tmp_path_factory):
    """Directory holding 12 synthetic 32 x 32 tiles (seed 0)."""

    def build(out: Path) -> None:
        out.mkdir()
        write_synthetic_tiles(out, count=12, size=32, seed=0)

    return build_once(tmp_path_factory, "synth_tiles", build)


@pytest.fixture(scope="session")
def stage1_reference(demo_tiles, tmp_path_factory) -> Path:
    """An uninterrupted Stage-1 run (the harness's configuration, REFERENCE_STEPS steps, 0 workers):
    the bits that reruns, killed-and-resumed runs and runs with workers must reproduce. Read-only."""
    return build_once(
        tmp_path_factory, "stage1_reference",
        lambda out: train_in_process(killtest.train_argv(demo_tiles, out, REFERENCE_STEPS, num_workers=0)),
    )


def pytest_collection_modifyitems(config, items):
    """A plain ``pytest`` leaves out the long checks; ``make soak`` (``-m slow``) or AXS_SOAK=1 runs them."""
    if "slow" in (config.getoption("markexpr") or "") or os.environ.get("AXS_SOAK"):
        return
    skip = pytest.mark.skip(reason="long check: run with `make soak` (pytest -m slow) or AXS_SOAK=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
