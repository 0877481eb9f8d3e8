"""Reading a file the user named, without hanging and without running out of memory.

Any path we are given may name something that is not a file: a FIFO (an ordinary ``open`` waits
for a writer forever), ``/dev/zero`` or ``/dev/urandom`` (a read never ends), a directory, a
socket, or a multi-gigabyte file where a small one belongs. So every small input (``--config``,
``run.json``, the ``latest`` pointer, a sidecar) and every checkpoint is opened here:

* ``O_NONBLOCK``, so opening a FIFO returns at once instead of waiting for a writer;
* then ``fstat`` on the open descriptor, and anything but a regular file is refused by kind: what
  is checked is what is read, nothing can be swapped in between;
* `read_regular` reads at most ``limit + 1`` bytes, so a file that grows while being read cannot
  take more memory than the limit allows;
* ``follow_symlinks=False`` (``O_NOFOLLOW``) for files that belong to a run, where a link would
  make us read (or later write) another run's file.

Errors are one line naming the path (an `axs_lib.errors.InputError`, or the subclass the caller
passes: `axs_lib.errors.CheckpointError` for checkpoints). The data layer's files (tiles,
sidecars, pack indexes) are read here too, their problems worded with the file's role first
(``subject``). Imports no torch.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from axs_lib.errors import InputError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
NO_SUCH_FILE = "no such file"


def kind_of(mode: int) -> str:
    """``a FIFO (named pipe)``, ``a directory``, ... for a ``st_mode`` that is not a regular file."""
    return next((word for test, word in _KINDS if test(mode)), "not a regular file")


def display_path(path: os.PathLike | str) -> str:
    """A path as text that always prints (a non-UTF-8 name keeps its bytes as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def os_problem(exc: OSError, subject: str) -> str:
    """Why ``subject`` (``tile``, ``sidecar``, ...) could not be opened or read, as words."""
    if isinstance(exc, PermissionError):
        return f"cannot read {subject}: permission denied"
    if exc.errno == errno.ELOOP:
        return f"cannot read {subject}: symlink loop"
    if isinstance(exc, IsADirectoryError):
        return f"{subject} is a directory, not a regular file"
    return f"cannot read {subject}: {exc.strerror or exc}"


def open_regular(path: os.PathLike | str, *, what: str = "a regular file", error: type[InputError] = InputError,
                 follow_symlinks: bool = True, subject: str | None = None) -> BinaryIO:
    """``path`` open for binary reading if it is a regular file; ``error(path, problem)`` otherwise.

    ``what`` completes "is a FIFO (named pipe), not <what>". A missing file raises with the problem
    `NO_SUCH_FILE`, so callers that accept absence can tell it apart. With ``subject`` (``tile``,
    ``sidecar``: the data layer's wording) a problem names it first: "sidecar is a FIFO (named
    pipe), not a regular file", "cannot read tile: permission denied".
    """
    name = display_path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if not os.path.islink(path):
            raise error(name, NO_SUCH_FILE) from None
        raise error(name, f"{subject}: broken symlink" if subject else "broken symbolic link") from None
    except OSError as exc:
        if subject:
            raise error(name, os_problem(exc, subject)) from None
        if isinstance(exc, IsADirectoryError):
            raise error(name, f"is a directory, not {what}") from None
        if exc.errno == errno.ELOOP:
            problem = "is a symbolic link; refusing to follow it" if not follow_symlinks else "symbolic link loop"
            raise error(name, problem) from None
        raise error(name, f"cannot open: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte in the name
        raise error(name, f"cannot read {subject}: {exc}" if subject else f"cannot open: {exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(name, f"{subject} is {kind_of(mode)}, not a regular file" if subject else f"is {kind_of(mode)}, not {what}")
        os.set_blocking(fd, True)  # a regular file never blocks; later reads behave as usual
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: os.PathLike | str, limit: int, *, what: str = "a regular file",
                 error: type[InputError] = InputError, follow_symlinks: bool = True, subject: str | None = None) -> bytes:
    """The bytes of ``path`` when it is a regular file of at most ``limit`` bytes (see `open_regular`)."""
    with open_regular(path, what=what, error=error, follow_symlinks=follow_symlinks, subject=subject) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(display_path(path), f"{subject} is {size} bytes, more than the {limit} allowed" if subject
                        else f"is {size} bytes, more than the {limit} allowed for {what}")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise error(display_path(path), os_problem(exc, subject) if subject else f"cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(display_path(path), f"{subject} grew past the {limit} bytes allowed while being read" if subject
                    else f"grew past the {limit} bytes allowed for {what} while being read")
    return data
