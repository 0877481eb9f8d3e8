"""TensorBoard event files of a Stage-1 run: now `axs_lib.loggers.TensorBoardLogger`, behind one fan-out.

The trainer opens its loggers (CSV, TensorBoard, MLflow, W&B) through `axs_lib.loggers.open_loggers`.
This module keeps the names earlier code imported (``EventLog``, ``open_event_log``, ``EVENTS_DIR``,
``MISSING``, ``available``) as thin aliases of that home, with the same behaviour: event files in
``<run>/tensorboard/``, purged past the resumed step, and one warning when tensorboard was asked
for but is not installed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from axs_lib.loggers import TENSORBOARD_MISSING as MISSING
from axs_lib.loggers import TensorBoardLogger as EventLog
from axs_lib.loggers import tensorboard_available
from axs_lib.run_dir import TENSORBOARD as EVENTS_DIR

__all__ = ["EVENTS_DIR", "MISSING", "EventLog", "available", "open_event_log"]

log = logging.getLogger(__name__)


def available() -> bool:
    """Whether the ``tensorboard`` package is installed (checked without importing it)."""
    return tensorboard_available()


def open_event_log(output_dir: Path, start_step: int, enabled: bool = True) -> EventLog | None:
    """An `EventLog` when ``enabled`` and tensorboard is installed; else None, with one warning
    (``logging``) when it was enabled but tensorboard is missing."""
    if not enabled:
        return None
    if not available():
        log.warning(MISSING)
        return None
    return EventLog(output_dir, start_step)
