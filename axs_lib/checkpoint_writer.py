"""Asynchronous checkpoint writes: the training loop pays for a host snapshot, not for the disk.

The shape follows ``torch.distributed.checkpoint.async_save`` (and torchtitan's use of it): stage
the state into CPU memory, then serialise and write it in a background thread. Staging copies
storage by storage into buffers that are kept and reused from one checkpoint to the next (pinned
when CUDA is available, so the device-to-host copy is a DMA), and views of one storage stay
views, as in DCP's ``StateDictStager``. On top of that we keep the guarantees of a synchronous
`axs_lib.checkpoint.write_checkpoint_files`:

* Same bytes. The background thread runs that very function on the snapshot, and a snapshot
  serialises exactly like the state it copies (`axs_lib.checkpoint.HostCopies`), so a file is
  byte-identical to what sync mode writes for the same content.
* Nothing half-written. The file is written to a temp name, fsynced and renamed; extra names are
  atomic links; ``latest`` moves only after that, so a SIGKILL at any instant leaves every earlier
  checkpoint and ``latest`` valid.
* One write in flight. ``submit`` first waits for the previous write, which also bounds memory
  to one snapshot and lets the buffers be reused safely.
* No silent failure. An error in the background (a full disk is the usual one: one `AxsError`
  line, exit status 1) is raised by the next ``submit``, ``wait`` or ``close``.

The caller may change the model and optimizer as soon as ``submit`` returns.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable
from pathlib import Path

import torch

from axs_lib.checkpoint import HostCopies, canonical, check_savable, write_checkpoint_files

__all__ = ["AsyncCheckpointWriter", "write_checkpoint_files"]

log = logging.getLogger(__name__)


class AsyncCheckpointWriter:
    """Write checkpoints in a background thread, one at a time, from reusable host buffers.

    ``pin_memory`` defaults to whether CUDA is available. Use as a context manager or call
    `close` at the end of the run: it waits for the write in flight and raises its error.
    """

    def __init__(self, *, pin_memory: bool | None = None):
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: list[torch.Tensor] = []  # one per storage of the last snapshot, in visiting order
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._digest: str | None = None
        self._closed = False

    # ------------------------------------------------------------------ public
    def submit(self, directory: os.PathLike | str, names: list[str] | tuple[str, ...], checkpoint: dict,
               latest: str | None = None, before: Callable[[], None] | None = None) -> None:
        """Snapshot ``checkpoint`` into host memory and write it in the background.

        Same arguments and same files as `write_checkpoint_files`. Blocks only while an earlier
        write finishes (raising its error, if it had one) and while the state is copied.
        ``before`` runs in the background thread before the first byte is written (the run
        directory's manifest update: a name is recorded before its file exists).
        """
        if self._closed:
            raise RuntimeError("AsyncCheckpointWriter.submit after close")
        if not names:
            raise ValueError("submit needs at least one name")
        self.wait()
        check_savable(checkpoint)  # content that could not be read back fails here, in the caller
        snapshot = self._snapshot(checkpoint)
        self._thread = threading.Thread(
            target=self._write, args=(Path(directory), list(names), snapshot, latest, before),
            name="axs-checkpoint-writer",
        )  # not a daemon: an interpreter that exits still finishes the write in flight
        self._thread.start()

    def wait(self) -> str | None:
        """Wait for the write in flight; raise its error, else return the checksum of the last write."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._digest

    def close(self) -> None:
        """Wait for the write in flight (raising its error) and release the buffers."""
        try:
            self.wait()
        finally:
            self._closed = True
            self._buffers = []

    def __enter__(self) -> AsyncCheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception is already on its way: finish the write, but do not hide that exception
            self.close()
        except Exception as error:  # noqa: BLE001 - reported, not raised, so the first error wins
            log.error("checkpoint write in flight also failed: %s", error)

    # ------------------------------------------------------------------ internals
    def _snapshot(self, checkpoint: dict) -> dict:
        """A copy of ``checkpoint`` whose tensors live in this writer's host buffers."""
        used: list[torch.Tensor] = []

        def alloc(nbytes: int) -> torch.Tensor:
            i = len(used)
            if i < len(self._buffers) and self._buffers[i].numel() == nbytes:
                buffer = self._buffers[i]
            else:
                buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
            used.append(buffer)
            return buffer

        copies = HostCopies(alloc, copy_cpu=True)
        copies.non_blocking = self.pin_memory
        with torch.no_grad():
            snapshot = canonical(checkpoint, copies)
        if self.pin_memory and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the background thread reads the buffers: copies must be done
        self._buffers = used
        return snapshot

    def _write(self, directory: Path, names: list[str], snapshot: dict, latest: str | None,
               before: Callable[[], None] | None = None) -> None:
        try:
            if before is not None:
                before()
            self._digest = write_checkpoint_files(directory, names, snapshot, latest=latest)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's next submit/wait/close
            self._error = error
