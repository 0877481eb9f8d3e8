"""Training state: everything a checkpoint must hold to continue exactly, listed once.

`TrainingState` gathers the objects of a training loop that have ``state_dict()`` /
``load_state_dict()`` (model, optimizer, scheduler, the resumable loader, early stopping, ...), the
step counter and plain extras, and turns them into one checkpoint dict and back. Save and restore
walk the same table of components, so a key cannot be saved and forgotten on restore (the
``Stateful`` protocol of torchdata and torchtitan's checkpoint manager work the same way).

Key names follow the reproducibility guide: ``model`` is stored as ``model_state_dict``,
``optimizer`` as ``optimizer_state_dict``, ``scheduler`` as ``scheduler_state_dict``, ``loader`` as
``sampler_state`` (its ``{"epoch", "position"}``); any other component under its own name. The
checkpoint also carries ``step``, ``epoch`` (the loader's), ``seed_info`` and ``rng_state`` (the
guide's), and the extras. With per-step seeding (``seed_globals(derive_seed(seed, "step", step))``
at the top of every step) the saved RNG state is informational: the next step re-seeds anyway.

Restore is all or nothing as far as we can make it: every key is checked to be present, and of
the right type, before any component is touched; a component that refuses its state (the
toolkit's own refuse a state of the wrong shape or type) is reported as one line naming the file
and the key (`CheckpointError`).

``extras`` is the caller's own dict, kept by reference: a value set in it later (``extras["best"]
= ...``) is in the next checkpoint, and a restore writes the saved values back into it.

A checkpoint of another seed is refused by `load_state_dict` (``seed_info`` against this state's
``seed``): it would continue the old run's state and label the files with the new seed. A caller
that has checked the difference already and means to go on passes ``check_seed=False``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from axs_lib.checkpoint import RESERVED_KEYS
from axs_lib.errors import CheckpointError

KEY_NAMES = {"model": "model_state_dict", "optimizer": "optimizer_state_dict",
             "scheduler": "scheduler_state_dict", "loader": "sampler_state"}
RESERVED = RESERVED_KEYS  # format_version, both checksums and the guide's keys: one list, in axs_lib.checkpoint


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class TrainingState:
    """The state of a training loop as one checkpoint dict.

    ``TrainingState(model=m, optimizer=o, scheduler=s, loader=l, seed=42, extras={"metrics": {}})``;
    ``state.step`` is the number of optimizer steps done (advance it in the loop);
    ``state.state_dict()`` is the checkpoint; ``state.load_state_dict(ckpt)`` restores every component,
    ``step`` and ``extras``. Components are passed as keyword arguments; None values are ignored.
    """

    def __init__(self, *, seed: int | None = None, step: int = 0, extras: dict[str, Any] | None = None, **components: Any):
        if extras is not None and not isinstance(extras, dict):
            raise TypeError(f"extras must be a dict, got {type(extras).__name__}")
        self.seed = seed
        self.step = int(step)
        self.extras: dict[str, Any] = extras if extras is not None else {}  # the caller's dict: see the module notes
        self.components: dict[str, Stateful] = {}
        for name, obj in components.items():
            if obj is None:
                continue
            if not isinstance(obj, Stateful):
                raise TypeError(f"{name}: {type(obj).__name__} has no state_dict()/load_state_dict()")
            key = KEY_NAMES.get(name, name)
            if key in RESERVED or key in self.extras:
                raise ValueError(f"{name}: the checkpoint key {key!r} is reserved or used twice")
            self.components[key] = obj

    @property
    def epoch(self) -> int:
        loader = self.components.get(KEY_NAMES["loader"])
        return int(loader.state_dict().get("epoch", 0)) if loader is not None else 0

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: components, ``step``, ``epoch``, extras, the guide's ``seed_info``/``rng_state``."""
        from axs_lib.reproducibility import add_seed_to_checkpoint, last_seed_info

        checkpoint: dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        for key, obj in self.components.items():
            checkpoint[key] = obj.state_dict()
        for key, value in self.extras.items():
            if key in checkpoint or key in RESERVED:
                raise ValueError(f"extra {key!r} collides with a checkpoint key")
            checkpoint[key] = value
        seed_info = last_seed_info()
        if seed_info is None or (self.seed is not None and seed_info.get("seed") != self.seed):
            seed_info = {"seed": self.seed} if self.seed is not None else None
        return add_seed_to_checkpoint(checkpoint, seed_info) if seed_info is not None else checkpoint

    def load_state_dict(self, checkpoint: dict[str, Any], *, source: str = "<checkpoint>", check_seed: bool = True) -> None:
        """Restore every component, the step and the extras from ``checkpoint`` (keys checked first).

        Refused (`CheckpointError`, one line): a checkpoint that is not a dict, lacks a key, holds a
        component state that is not a dict or that the component refuses, or (unless
        ``check_seed=False``) was written with another seed than this state's.
        """
        if not isinstance(checkpoint, dict):
            raise CheckpointError(source, "cannot restore the training state: the checkpoint is a "
                                          f"{type(checkpoint).__name__}, not a dict")
        missing = [k for k in ("step", *self.components, *self.extras) if k not in checkpoint]
        if missing:
            raise CheckpointError(source, f"cannot restore the training state: missing {', '.join(missing)}")
        step = checkpoint["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(source, f"step is {_short(step)}, not a count of steps")
        wrong = [f"{k} ({type(checkpoint[k]).__name__})" for k in self.components if not isinstance(checkpoint[k], dict)]
        if wrong:
            raise CheckpointError(source, f"cannot restore the training state: not a dict: {', '.join(wrong)}")
        if check_seed and self.seed is not None:
            info = checkpoint.get("seed_info")
            stored = info.get("seed") if isinstance(info, dict) else checkpoint.get("seed")
            if stored != self.seed:
                raise CheckpointError(source, f"cannot continue this run exactly: seed: checkpoint {_short(stored)}, "
                                      f"now {self.seed} (a run with another seed starts fresh, in another directory)")
        for key, obj in self.components.items():
            try:
                obj.load_state_dict(checkpoint[key])
            except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as exc:
                raise CheckpointError(source, f"{key}: {_first_line(exc)}") from None
        for key in self.extras:
            self.extras[key] = checkpoint[key]
        self.step = step


def _first_line(exc: BaseException) -> str:
    """An exception as one line (torch's shape-mismatch messages run over many)."""
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = " ".join(lines[:2]) if lines and lines[0].endswith(":") else lines[0]
    return line if len(line) <= 300 else line[:297] + "..."


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
