"""Errors that the command line turns into one clear line and an exit status.

Library code raises these instead of printing: the `axs` command (and the thin scripts over it)
catches them, prints ``axs: error: <message>`` on stderr and exits with ``exit_code``. A message
names the file it is about and what is wrong with it, so no traceback is needed to act on it.
"""

from __future__ import annotations

import errno
import os

EXIT_OK = 0
EXIT_FAILURE = 1  # the check ran and found a difference or a bad file
EXIT_USAGE = 2  # bad arguments or bad input: nothing was done


class AxsError(Exception):
    """A problem the user can fix, reported as one line with ``exit_code``."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(AxsError):
    """A file or directory given to us is missing, unreadable or malformed."""

    def __init__(self, path: os.PathLike | str, problem: str, *, exit_code: int | None = None):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", exit_code=exit_code)


class CheckpointError(InputError):
    """A checkpoint cannot be trusted: truncated, corrupted, unsafe or of an unknown format."""


class UsageError(AxsError):
    """Arguments that contradict each other or are out of range."""


class WriteError(AxsError, OSError):
    """A file could not be written: a full disk, a read-only filesystem, no permission (exit status 1).

    Raised by the atomic writes (`axs_lib.atomic`), so the previous version of the file is intact
    and no temp file is left. It is an `OSError` too, with the original ``errno``, so code that
    handles ``OSError`` (a cache that may fail quietly, the checkpoint writer's own message) is
    unchanged; the command line shows it as one line like any `AxsError`.
    """

    exit_code = EXIT_FAILURE

    def __init__(self, path: os.PathLike | str, exc: OSError):
        OSError.__init__(self, exc.errno, exc.strerror or str(exc), os.fspath(path))
        self.path = os.fspath(path)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        self.message = (f"{self.path}: cannot write: {exc.strerror or exc}; its previous version, if any, is intact"
                        + ("; free some space and run again" if full else ""))

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # OSError pickles its args, which this constructor does not take (a pool worker's error)
        return type(self), (self.path, OSError(self.errno, self.strerror))
