"""Reading a file the user named, without hanging and without running out of memory.

Any path we are given may name something that is not a file: a FIFO (an ordinary ``open`` waits
for a writer forever), ``/dev/zero`` or ``/dev/urandom`` (a read never ends), a directory, a
socket, or a multi-gigabyte file where a small one belongs. So every small input (``--config``,
``run.json``, the ``latest`` pointer) and every checkpoint is opened here:

* ``O_NONBLOCK``, so opening a FIFO returns at once instead of waiting for a writer;
* then ``fstat`` on the open descriptor, and anything but a regular file is refused by kind: what
  is checked is what is read, nothing can be swapped in between;
* `read_regular` reads at most ``limit + 1`` bytes, so a file that grows while being read cannot
  take more memory than the limit allows;
* ``follow_symlinks=False`` (``O_NOFOLLOW``) for files that belong to a run, where a link would
  make us read (or later write) another run's file.

Errors are one line naming the path (an `axs_lib.errors.InputError`, or the subclass the caller
passes: `axs_lib.errors.CheckpointError` for checkpoints). Imports no torch.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from axs_lib.errors import InputError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
NO_SUCH_FILE = "no such file"


def kind_of(mode: int) -> str:
    """``a FIFO (named pipe)``, ``a directory``, ... for a ``st_mode`` that is not a regular file."""
    return next((word for test, word in _KINDS if test(mode)), "not a regular file")


def open_regular(path: os.PathLike | str, *, what: str = "a regular file", error: type[InputError] = InputError,
                 follow_symlinks: bool = True) -> BinaryIO:
    """``path`` open for binary reading if it is a regular file; ``error(path, problem)`` otherwise.

    ``what`` completes "is a FIFO (named pipe), not <what>". A missing file raises with the problem
    `NO_SUCH_FILE`, so callers that accept absence can tell it apart.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(path, "broken symbolic link" if os.path.islink(path) else NO_SUCH_FILE) from None
    except IsADirectoryError:
        raise error(path, f"is a directory, not {what}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            problem = "is a symbolic link; refusing to follow it" if not follow_symlinks else "symbolic link loop"
            raise error(path, problem) from None
        raise error(path, f"cannot open: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte in the name
        raise error(path, f"cannot open: {exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(path, f"is {kind_of(mode)}, not {what}")
        os.set_blocking(fd, True)  # a regular file never blocks; later reads behave as usual
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: os.PathLike | str, limit: int, *, what: str = "a regular file",
                 error: type[InputError] = InputError, follow_symlinks: bool = True) -> bytes:
    """The bytes of ``path`` when it is a regular file of at most ``limit`` bytes (see `open_regular`)."""
    with open_regular(path, what=what, error=error, follow_symlinks=follow_symlinks) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(path, f"is {size} bytes, more than the {limit} allowed for {what}")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise error(path, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(path, f"grew past the {limit} bytes allowed for {what} while being read")
    return data
