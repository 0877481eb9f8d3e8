"""Early stopping whose whole state is checkpointed, so a resumed run stops where an uninterrupted one does.

Rule: after each validation, the monitored metric improves when it beats the best so far by more
than ``min_delta`` (lower is better in ``min`` mode, higher in ``max``). Each validation without
improvement adds one to ``bad_validations``; when it reaches ``patience``, training stops. The
count is in validations, not steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    """Patience-based stopping on a validation metric (default: validation loss, lower is better)."""

    patience: int = 5
    min_delta: float = 0.0
    mode: str = "min"
    metric: str = "val_loss"
    best: float | None = None
    best_step: int | None = None
    bad_validations: int = 0
    stopped_step: int | None = None

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def update(self, value: float, step: int) -> bool:
        """Record a validation result; return True when it is a new best."""
        if self.improved(value):
            self.best, self.best_step, self.bad_validations = float(value), step, 0
            return True
        self.bad_validations += 1
        if self.bad_validations >= self.patience and self.stopped_step is None:
            self.stopped_step = step
        return False

    @property
    def should_stop(self) -> bool:
        return self.stopped_step is not None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore every field; a state of the wrong shape or type is refused (ValueError, one line)
        before any field changes."""
        fields = self.state_dict()
        if not isinstance(state, dict):
            raise ValueError(f"early-stopping state must be a dict, got {type(state).__name__}")
        unknown = sorted(str(k)[:40] for k in state if k not in fields)
        if unknown:
            raise ValueError(f"early-stopping state has unknown fields: {', '.join(unknown[:5])}")
        merged = {**fields, **state}
        for key, kind in _FIELD_TYPES.items():
            if not _is(merged[key], kind):
                raise ValueError(f"early-stopping state: {key} is {repr(merged[key])[:60]}, not {kind}")
        restored = EarlyStopping(**merged)  # checks mode, patience and min_delta
        if restored.bad_validations < 0:
            raise ValueError(f"early-stopping state: bad_validations is {restored.bad_validations}, not a count")
        for key in fields:
            setattr(self, key, getattr(restored, key))


_FIELD_TYPES = {"patience": "int", "min_delta": "number", "mode": "str", "metric": "str", "best": "number or None",
                "best_step": "int or None", "bad_validations": "int", "stopped_step": "int or None"}


def _is(value, kind: str) -> bool:
    if value is None:
        return kind.endswith("or None")
    if isinstance(value, bool):
        return False
    if kind.startswith("int"):
        return isinstance(value, int)
    if kind.startswith("number"):
        return isinstance(value, (int, float))
    return isinstance(value, str)
