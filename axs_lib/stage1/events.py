"""TensorBoard event files mirroring ``metrics.jsonl``, written when ``tensorboard`` is installed.

Scalars go to ``<run>/tensorboard/`` as ``train/loss``, ``train/lr``, ``val/val_loss``,
``val/psnr``, ``val/ssim`` and ``val/sam``. On resume the writer purges events past the resumed
step, so the curves show no steps twice. ``metrics.jsonl`` stays the record of the run;
TensorBoard is a view of it.
"""

from __future__ import annotations

import importlib.util
from numbers import Real
from pathlib import Path

EVENTS_DIR = "tensorboard"


def available() -> bool:
    """Whether the ``tensorboard`` package is installed (checked without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


class EventLog:
    """A TensorBoard writer for metric records ``{"step", "split", <name>: <number>, ...}``."""

    def __init__(self, output_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # imported only when used: it is slow

        self.writer = SummaryWriter(log_dir=str(output_dir / EVENTS_DIR), purge_step=start_step or None)

    def add(self, record: dict) -> None:
        for name, value in record.items():
            if name not in ("step", "split") and isinstance(value, Real):
                self.writer.add_scalar(f"{record['split']}/{name}", value, record["step"])

    def close(self) -> None:
        self.writer.close()
