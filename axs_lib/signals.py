"""Stop signals in the main process: a flag that a training loop checks between steps.

Slurm (``scancel``, ``--signal``), systemd, Kubernetes and ``timeout`` signal every process of a
job, and a person presses Ctrl-C. A run that dies of the signal loses everything since its last
checkpoint; a run that stops between two steps can write a checkpoint at the step it reached and
leave with ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1), which is
what a requeueing job script expects. `StopRequest` turns SIGINT, SIGTERM and SIGUSR1 into such a
flag. Every loop of the project uses it: the Stage-1 trainer, `axs_lib.lightning.ExactResume`, and
a loop of the user's own (docs/own_loop.md)::

    with StopRequest() as stop:
        while state.step < steps:
            ...one optimizer step...
            if stop.requested:
                manager.save(state.state_dict(), state.step)
                sys.exit(stop.exit_code)

The other half of the policy is in `axs_lib.workers`: DataLoader workers ignore these signals
(`axs_lib.loader.ResumableLoader` sets that up for its workers), so the group signal never
kills a worker under the loop's feet; the main process shuts them down in order once it has
saved.

A second signal while the first is pending raises ``KeyboardInterrupt`` at once: a person who
presses Ctrl-C twice wants out now, checkpoint or not. The handlers are installed only in the
main thread (the only one Python runs signal handlers in); elsewhere the flag stays down and the
signals keep their previous meaning. Imports no torch.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)

# Signals a scheduler sends to the whole process group (SIGUSR1: Slurm's usual --signal choice).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138}  # 128 + signal number


def exit_code(signum: int) -> int:
    """The exit status of a process that stopped because of ``signum``: 128 + its number."""
    return EXIT_CODES.get(signum, 128 + int(signum))


class StopRequested(SystemExit):
    """Raised (by `axs_lib.lightning.ExactResume`) to end a run that a stop signal asked to stop,
    once its checkpoint is written. A ``SystemExit``: uncaught, the process exits with ``code``
    (``128 + signal number``) and prints no traceback."""

    def __init__(self, signum: int):
        super().__init__(exit_code(signum))
        self.signum = signum


class StopRequest:
    """SIGINT, SIGTERM and SIGUSR1 turned into a flag (`requested`) for the loop to check between steps.

    Use it as a context manager (handlers installed on entry, the previous ones put back on exit),
    or call `install` and `restore` where a framework's hooks decide the moments. ``signum`` is the
    first signal received (None before); `exit_code` the status to leave with.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived: checkpoint at the step just finished, then leave."""
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """``128 + signal number`` of the signal received (143 when none was: the scheduler's usual one)."""
        return exit_code(self.signum if self.signum is not None else signal.SIGTERM)

    @property
    def name(self) -> str:
        """The received signal's name (``"SIGTERM"``), or ``""``."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def install(self) -> "StopRequest":
        """Handle the stop signals from now on (in the main thread; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            logger.debug("StopRequest outside the main thread: stop signals keep their previous handlers")
            return self
        for signum in self.signals:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)  # installing twice keeps the first previous handler
        return self

    def restore(self) -> None:
        """Put back the handlers found by `install`, where ours is still the one installed
        (a framework that replaced it after us restores its own)."""
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal (Ctrl-C twice): stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


__all__ = ["EXIT_CODES", "STOP_SIGNALS", "StopRequest", "StopRequested", "exit_code"]
