"""Atomic files: write to a temp file beside the target, flush, fsync, rename, fsync the directory.

A crash at any instant leaves either the old file or the complete new one, never half of one.
Checkpoints, ``latest``, ``run.json``, configs, tiles and plots are all written this way. This
module imports no torch, so that commands which only write small files start fast.

Temp files are named ``.<name>.<random>.tmp`` (links ``.<name>.<pid>.link.tmp``), which is what
`axs_lib.run_dir.RunDir.remove_stale_temp_files` removes after a kill. `axs_lib.faults` can make a
write fail or die just before its rename, for the reliability tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from axs_lib import faults



def fsync_dir(directory: os.PathLike | str) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: os.PathLike | str, mode: str = "wb"):
    """Open a temp file beside ``path``; on clean exit fsync it and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual mode
        with os.fdopen(fd, mode) as f:
            yield f
            faults.before_commit(path, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_link(source: os.PathLike | str, path: os.PathLike | str) -> None:
    """Make ``path`` name the same file as ``source`` (a hard link; a copy where links fail), atomically.

    For a second name of a file that was just written (``best.pt`` and the step checkpoint of the
    same step): no second serialisation, and ``path`` is replaced in one rename.
    """
    source, path = Path(source), Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.link.tmp"
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        faults.before_commit(path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    """Write a small text file atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)
