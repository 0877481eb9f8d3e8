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

Restore is all or nothing as far as we can make it: every key is checked to be present before
any component is touched.
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
        self.seed = seed
        self.step = int(step)
        self.extras: dict[str, Any] = dict(extras or {})
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

    def load_state_dict(self, checkpoint: dict[str, Any], *, source: str = "<checkpoint>") -> None:
        """Restore every component, the step and the extras from ``checkpoint`` (keys checked first)."""
        missing = [k for k in ("step", *self.components, *self.extras) if k not in checkpoint]
        if missing:
            raise CheckpointError(source, f"cannot restore the training state: missing {', '.join(missing)}")
        step = checkpoint["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(source, f"step is {step!r}, not a count of steps")
        for key, obj in self.components.items():
            obj.load_state_dict(checkpoint[key])
        for key in self.extras:
            self.extras[key] = checkpoint[key]
        self.step = step
