"""DataLoader worker processes and the signals a scheduler sends: one policy for every loader.

Slurm, systemd, Kubernetes and ``timeout`` signal every process of a job, so DataLoader workers get
SIGTERM at the same moment as the main process. The main process must checkpoint and stop cleanly;
a worker that died first would turn that into a DataLoader error. So:

* workers are seeded and ignore the stop signals (`init_worker`, the ``worker_init_fn`` of every
  loader of ours) and are shut down by the main process through their queues (`shutdown_workers`);
* the stop signals are held back while workers are forked (`stop_signals_held`), so one that lands
  before a worker ignores it waits and is discarded instead of killing the worker;
* workers still alive when the interpreter exits are SIGKILLed (`reap_workers_at_exit`), since
  multiprocessing's SIGTERM would be ignored.

The main process's side (the stop signals as a flag the loop checks between steps) is
`axs_lib.signals.StopRequest`.

Imports no torch: the toolkit's loader and the Stage-1 data module both use it (`init_worker`
imports `axs_lib.reproducibility` when it runs, in a worker, where torch is loaded anyway).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import signal
from typing import Any, Callable

# Signals a scheduler sends to the whole process group (one list, in `axs_lib.signals`, whose
# `StopRequest` is the main process's side). Workers leave them to the main process, which
# checkpoints and then shuts the workers down; a worker that died of SIGTERM first would turn a
# clean stop into a DataLoader error.
from axs_lib.signals import STOP_SIGNALS


def ignore_stop_signals(worker_id: int = 0) -> None:
    """In a DataLoader worker: leave SIGINT/SIGTERM/SIGUSR1 to the main process.

    The main process shuts its workers down through their queues (`ResumableLoader.close`, the end
    of an iteration), so they never need a signal. The one place that does send SIGTERM is
    multiprocessing's exit handler for daemonic children still alive when the interpreter exits;
    `reap_workers_at_exit` makes that a SIGKILL first, so a forgotten loader cannot hang the exit.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    release_stop_signals()  # one that arrived since the fork is discarded now


def init_worker(worker_id: int, user_init: Callable[[int], None] | None = None) -> None:
    """The ``worker_init_fn`` of every loader of ours: `seed_worker`, ignore the stop signals, then ``user_init``.

    A scheduler's signal to the process group is the main process's to act on (it checkpoints,
    then shuts the workers down through their queues); a worker it killed would turn the stop into
    a DataLoader error. The signals are ignored (and one held since the fork, see
    `stop_signals_held`, discarded) before the user's own init, which may decide otherwise.
    ``functools.partial(init_worker, user_init=fn)`` adds a user's init.
    """
    from axs_lib.reproducibility import seed_worker

    seed_worker(worker_id)
    ignore_stop_signals(worker_id)
    if user_init is not None:
        user_init(worker_id)


def shutdown_workers(loader: Any) -> None:
    """Stop a ``DataLoader``'s persistent workers now, through their queues (they ignore SIGTERM).

    It is what DataLoader's own iterator runs when it is collected; a loader held in a reference
    cycle is collected late, by when its queues may be closed and each worker costs a 5 s join
    timeout. A no-op for a loader that has no workers running (or is None).
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        loader._iterator = None
        iterator._shutdown_workers()


@contextlib.contextmanager
def stop_signals_held():
    """Hold the stop signals back in this thread while it starts DataLoader workers (``iter(loader)``).

    A worker ignores them from its ``worker_init_fn`` on, but torch's worker start-up first installs
    a SIGTERM handler of its own (a SIGTERM from anyone but the parent kills the worker), so a
    scheduler's SIGTERM to the process group in that window killed a worker and the run failed
    instead of checkpointing (``make soak`` caught it). A forked worker inherits this thread's
    signal mask: the signal waits, pending, until `ignore_stop_signals` ignores it (which discards
    it) and unblocks. In this process it is delivered when the block ends, a few ms later.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def release_stop_signals() -> None:
    """In a worker forked under `stop_signals_held`: let the stop signals in again (`ignore_stop_signals`
    does, once they are ignored, so one held since the fork is discarded rather than delivered)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


_reaper_registered = False


def reap_workers_at_exit() -> None:
    """Register (once, in the main process) an exit handler that SIGKILLs leftover DataLoader workers.

    Registered after ``multiprocessing`` set up its own exit handler, so it runs before it (atexit
    is last in, first out): the workers it would SIGTERM, which ignore that, are already gone.
    """
    global _reaper_registered
    if not _reaper_registered:
        import multiprocessing.util  # noqa: F401 - registers its exit handler now if not yet, so ours runs first
        atexit.register(_kill_leftover_workers)
        _reaper_registered = True


def _kill_leftover_workers() -> None:
    # torch's SIGCHLD handler would raise "worker killed" into this handler at the first death
    # and leave the other workers to the SIGTERM that they ignore
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    leftover = [child for child in multiprocessing.active_children() if child.daemon]
    for child in leftover:
        child.kill()
    for child in leftover:
        child.join(timeout=5)
