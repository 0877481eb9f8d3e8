"""The output directory of a training run: its layout, its lock, and finding where to resume.

Layout::

    <run>/run.json              effective config, seed, fingerprints, paths, times, exit status
    <run>/environment.json      environment fingerprint plus installed packages
    <run>/split.json            which tiles went to train and val
    <run>/metrics.jsonl         one line per logged step and per validation
    <run>/checkpoints/checkpoint_step_<N>.pt, best.pt, latest
    <run>/plots/loss.png, <run>/samples/step_<N>.png
    <run>/.lock                 held (flock) while a run is live

A run never starts over someone else's results: a non-empty directory needs ``--resume`` or
``--overwrite``, and the lock stops two live runs sharing a directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from axs_lib.checkpoint import atomic_write_text, load_checkpoint, read_latest
from axs_lib.errors import CheckpointError, InputError, UsageError

CHECKPOINTS = "checkpoints"
STEP_FILE = re.compile(r"^checkpoint_step_(\d+)\.pt$")
LOCK = ".lock"
# What --overwrite may remove: only what a run writes, never other files.
RUN_OUTPUTS = ("checkpoints", "plots", "samples", "tensorboard", "run.json", "environment.json", "split.json", "metrics.jsonl")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step_{step}.pt"


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint_step_<N>.pt``, newest first."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if m := STEP_FILE.match(p.name):
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def prepare(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create ``output_dir`` or check that we may use it; remove old run outputs on ``overwrite``."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(output_dir, "output path exists and is not a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(output_dir, f"cannot create output directory: {exc.strerror}") from None
    # a real write, not os.access: as root os.access says yes even on a read-only filesystem
    try:
        os.close(os.open(output_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as exc:
        raise InputError(output_dir, f"output directory is not writable: {exc.strerror}") from None
    used = sorted(p.name for p in output_dir.iterdir() if p.name != LOCK)
    if used and not resume and not overwrite:
        raise UsageError(
            f"{output_dir}: output directory is not empty ({', '.join(used[:4])}{', ...' if len(used) > 4 else ''}); "
            "pass --resume auto to continue that run or --overwrite to replace it"
        )


def remove_outputs(output_dir: Path) -> None:
    """Delete what an earlier run wrote here (``--overwrite``), keeping any other files."""
    for name in RUN_OUTPUTS:
        target = output_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


@contextlib.contextmanager
def locked(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output_dir`` for the life of a run (released even on SIGKILL).

    A POSIX record lock (``lockf``), not ``flock``: forked DataLoader workers do not inherit it,
    so workers still shutting down after their parent was killed do not block the resume.
    """
    path = output_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InputError(output_dir, f"output directory is not writable (cannot create {LOCK}): {exc.strerror}") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"{output_dir}: another run (pid {holder}) is using this output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def remove_stale_temp_files(output_dir: Path) -> list[str]:
    """Delete temp files left by a write that was killed (``.<name>.<random>.tmp``)."""
    removed = []
    for folder in (output_dir, output_dir / CHECKPOINTS):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def find_resume_checkpoint(output_dir: Path, log) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads and passes its checksum, or None when there is none.

    Tries the ``latest`` pointer first, then every ``checkpoint_step_<N>.pt`` from newest to
    oldest; each one skipped is reported through ``log`` with the reason.
    """
    ckpt_dir = output_dir / CHECKPOINTS
    candidates: list[Path] = []
    try:
        latest = read_latest(ckpt_dir)
    except CheckpointError as exc:
        log(f"warning: {exc}; looking for the newest valid checkpoint")
        latest = None
    if latest is not None:
        candidates.append(latest)
    candidates += [p for _, p in step_checkpoints(output_dir) if p != latest]
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            log(f"warning: skipping {exc}")
    return None


class MetricsLog:
    """``metrics.jsonl``: appended line by line; cut back to a step when a run resumes."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by the killed run after its last checkpoint)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
        return records


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
