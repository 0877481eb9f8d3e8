"""Errors that the command line turns into one clear line and an exit status.

Library code raises these instead of printing: the `axs` command (and the thin scripts over it)
catches them, prints ``axs: error: <message>`` on stderr and exits with ``exit_code``. A message
names the file it is about and what is wrong with it, so no traceback is needed to act on it.
"""

from __future__ import annotations

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
