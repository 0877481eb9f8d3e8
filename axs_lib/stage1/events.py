"""TensorBoard event files mirroring ``metrics.jsonl``, written when ``tensorboard`` is installed.

Scalars go to ``<run>/tensorboard/`` as ``train/loss``, ``train/lr``, ``val/val_loss``,
``val/psnr``, ``val/ssim`` and ``val/sam``; the sample pictures of `axs_lib.stage1.plots` go there
too, as the image ``samples`` at each validation step (the very pixels of ``samples/step_<N>.png``).
On resume the writer purges events past the resumed step, so the curves show no steps twice.
``metrics.jsonl`` stays the record of the run; TensorBoard is a view of it.

TensorBoard is optional. When it was asked for but is not installed, `open_event_log` says so
once, as a ``logging`` warning, instead of silently writing nothing.
"""

from __future__ import annotations

import importlib.util
import logging
from numbers import Real
from pathlib import Path

import numpy as np

EVENTS_DIR = "tensorboard"
MISSING = ("tensorboard is not installed: no TensorBoard event files "
           "(pip install 'axs-lib[tensorboard]', or pass --no-tensorboard to silence this)")

log = logging.getLogger(__name__)


def available() -> bool:
    """Whether the ``tensorboard`` package is installed (checked without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


class EventLog:
    """A TensorBoard writer for metric records ``{"step", "split", <name>: <number>, ...}``."""

    def __init__(self, output_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # imported only when used: it is slow

        # purge what a killed run logged *after* the resumed step; the point at that step is the
        # checkpoint's own and stays (metrics.jsonl keeps it too)
        self.writer = SummaryWriter(log_dir=str(output_dir / EVENTS_DIR), purge_step=start_step + 1 if start_step else None)

    def add(self, record: dict) -> None:
        for name, value in record.items():
            if name not in ("step", "split") and isinstance(value, Real):
                self.writer.add_scalar(f"{record['split']}/{name}", value, record["step"])

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 picture, e.g. the rendered samples figure."""
        self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def open_event_log(output_dir: Path, start_step: int, enabled: bool = True) -> EventLog | None:
    """An `EventLog` when ``enabled`` and tensorboard is installed; else None, with one warning
    (``logging``) when it was enabled but tensorboard is missing."""
    if not enabled:
        return None
    if not available():
        log.warning(MISSING)
        return None
    return EventLog(output_dir, start_step)
