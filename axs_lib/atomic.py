"""Atomic files: write to a temp file beside the target, flush, fsync, rename, fsync the directory.

A crash at any instant leaves either the old file or the complete new one, never half of one.
Checkpoints, ``latest``, ``run.json``, configs, tiles and plots are all written this way. This
module imports no torch, so that commands which only write small files start fast.

Temp files are made by `create_temp` only: a random name ``.<name>.<random>.tmp`` in the target's
directory, created with ``O_CREAT | O_EXCL | O_NOFOLLOW``. A fixed name (``.config.yaml.tmp``)
could be planted in advance as a symbolic link, and an ordinary ``open`` would then write through
it to wherever it points; an exclusive create refuses any name that exists, a link included.
These names are what `axs_lib.run_dir.RunDir.remove_stale_temp_files` removes after a kill.

A write that fails (full disk, read-only filesystem, no permission) raises
`axs_lib.errors.WriteError`: one line naming the target, exit status 1, and an ``OSError`` too.
`axs_lib.faults` can make a write fail or die just before its rename, for the reliability tests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path

from axs_lib import faults
from axs_lib.errors import WriteError

TEMP_SUFFIX = ".tmp"
_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_ATTEMPTS = 100  # random names that collide this often mean something else is wrong


def fsync_dir(directory: os.PathLike | str) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_name(path: os.PathLike | str) -> Path:
    """A fresh random temp name beside ``path`` (``.<name>.<random>.tmp``); not created."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"


def create_temp(path: os.PathLike | str) -> tuple[int, Path]:
    """Create a new, empty temp file beside ``path``: ``(descriptor open for writing, its path)``.

    Exclusive and never through a link (``O_EXCL | O_NOFOLLOW``), under a random name, with the
    usual mode of a new file (0666 less the umask). Raises OSError when the directory refuses.
    """
    for _ in range(_ATTEMPTS):
        tmp = temp_name(path)
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temp name after {_ATTEMPTS} tries", str(Path(path).parent))


@contextlib.contextmanager
def atomic_open(path: os.PathLike | str, mode: str = "wb"):
    """Open a temp file beside ``path``; on clean exit fsync it and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is untouched; an OSError (full disk,
    read-only directory) comes out as `WriteError` naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = create_temp(path)
        with os.fdopen(fd, mode) as f:
            yield f
            faults.before_commit(path, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(path, exc) from None
        raise
    fsync_dir(path.parent)


def atomic_link(source: os.PathLike | str, path: os.PathLike | str) -> None:
    """Make ``path`` name the same file as ``source`` (a hard link; a copy where links fail), atomically.

    For a second name of a file that was just written (``best.pt`` and the step checkpoint of the
    same step): no second serialisation, and ``path`` is replaced in one rename. The link gets a
    random temp name first (``link`` never follows or replaces an existing name).
    """
    source, path = Path(source), Path(path)
    tmp = None
    try:
        tmp = _link_temp(source, path)
        faults.before_commit(path)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(path, exc) from None
        raise
    fsync_dir(path.parent)


def _link_temp(source: Path, path: Path) -> Path:
    """A temp name beside ``path`` for ``source``'s bytes: a hard link, or an exclusive copy."""
    for _ in range(_ATTEMPTS):
        tmp = temp_name(path)
        try:
            os.link(source, tmp, follow_symlinks=False)
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            break  # a filesystem without hard links: copy instead
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    """Write a small text file atomically, as UTF-8 whatever the locale."""
    with atomic_open(path, "wb") as f:
        f.write(text.encode("utf-8", "surrogateescape"))  # a non-UTF-8 file name keeps its bytes
