"""Fault injection for the reliability tests: make one named file write fail as a real machine would.

Set ``AXS_FAULT=<kind>:<file name>`` in a run's environment. When an atomic write of a file with
that name has put its bytes in the temp file but not yet renamed it:

* ``kill``: the temp file is cut to half its length and the process SIGKILLs itself, as a crash
  in the middle of a checkpoint write would leave it;
* ``enospc``: the write fails with ``OSError(ENOSPC)``, as on a full disk.

Unset (the normal case), this costs one environment lookup per write.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path
from typing import IO

ENV = "AXS_FAULT"


def before_commit(path: os.PathLike | str, f: IO) -> None:
    """Called by `axs_lib.checkpoint.atomic_open` after writing ``f`` and before renaming it to ``path``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    kind, _, name = spec.partition(":")
    if Path(path).name != name:
        return
    if kind == "kill":
        f.flush()
        f.truncate(f.tell() // 2)
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
