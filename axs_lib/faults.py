"""Fault injection for the reliability tests: make one named file write fail as a real machine would.

Set ``AXS_FAULT=<kind>:<file name>`` in a run's environment. When an atomic write (or link) of a
file with that name has put its bytes in the temp file but not yet renamed it:

* ``kill``: the temp file is cut to half its length (when it is a written file, not a link) and
  the process SIGKILLs itself, as a crash in the middle of a checkpoint write would leave it;
* ``enospc``: the write fails with ``OSError(ENOSPC)``, as on a full disk;
* ``slow``: the writing thread prints ``axs fault: slow commit of <path>`` on stderr and sleeps
  3 seconds before the rename, so a signal can arrive while a (background) write is in flight;
* ``stop``: the writing thread prints ``axs fault: stopped before committing <path>`` on stderr
  and blocks forever, so a test can SIGKILL the process at that point from outside (while a
  background checkpoint write is in flight, the other threads go on running).

Unset (the normal case), this costs one environment lookup per write.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO

ENV = "AXS_FAULT"


def before_commit(path: os.PathLike | str, f: IO | None = None) -> None:
    """Called by `axs_lib.checkpoint` just before a new ``path`` is renamed into place.

    ``f`` is the temp file that was written (None when the new file is a link to another).
    """
    spec = os.environ.get(ENV)
    if not spec:
        return
    kind, _, name = spec.partition(":")
    if Path(path).name != name:
        return
    if kind == "kill":
        if f is not None:
            f.flush()
            f.truncate(f.tell() // 2)
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    elif kind == "slow":
        print(f"axs fault: slow commit of {path}", file=sys.stderr, flush=True)
        time.sleep(3)
    elif kind == "stop":
        if f is not None:
            f.flush()
        print(f"axs fault: stopped before committing {path}", file=sys.stderr, flush=True)
        threading.Event().wait()  # never set: only this thread stops
