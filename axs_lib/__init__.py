"""Axion-Sat: bit-exact reproducible PyTorch training for SAR-to-optical translation.

The public toolkit, in one place: ``from axs_lib import set_seed, ResumableLoader,
CheckpointManager``. Each name still lives in its own module (the module is the name's one home and
its documentation); this package only points at it. `__all__` is the list of what a user of the
toolkit needs, in the order a training loop meets it:

* seeding: `set_seed`, `derive_seed`, `seed_globals`, `seed_worker`, `get_seed_state`,
  `restore_seed_state`, and the rest of the reproducibility guide's API (`axs_lib.reproducibility`);
* data order and per-sample randomness: `ResumableSampler`, `SampleIndex` (`axs_lib.sampling`),
  `SeededDataset`, `sample_rng`, `sample_generator` (`axs_lib.samples`), `ResumableLoader`
  (`axs_lib.loader`);
* more than one rank: `MicroBatchPlan`, `GradientTree` (`axs_lib.distributed`);
* checkpoints: `TrainingState` (`axs_lib.state`), `CheckpointManager` (`axs_lib.run_dir`),
  `save_checkpoint`, `load_checkpoint` (`axs_lib.checkpoint`), `EarlyStopping`
  (`axs_lib.early_stopping`);
* a run's surroundings: `StopRequest` (`axs_lib.signals`), `pin` (portable CPU mode,
  `axs_lib.portable`);
* a trainer of one's own on the training session: `Trainer`, `run_training`, `ResumeRequest`,
  `DataCheck` (`axs_lib.training`; see examples/stage2_trainer.py);
* the errors the toolkit raises, all `AxsError`: `InputError`, `CheckpointError`, `UsageError`,
  `WriteError`, `PlanError`, `PortableError`.

The Lightning integration (`axs_lib.lightning`) needs the optional ``lightning`` extra and stays
in its own module.

Imports are lazy (PEP 562): ``import axs_lib`` loads none of the modules above, and a name is
imported the first time it is read. So ``import axs_lib`` and ``axs --help`` stay free of torch,
and a program pays only for what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that owns it
_HOMES: dict[str, str] = {
    # seeding (the reproducibility guide's API and derived randomness)
    "set_seed": "axs_lib.reproducibility",
    "derive_seed": "axs_lib.reproducibility",
    "seed_globals": "axs_lib.reproducibility",
    "seed_worker": "axs_lib.reproducibility",
    "get_seed_state": "axs_lib.reproducibility",
    "restore_seed_state": "axs_lib.reproducibility",
    "create_reproducible_generator": "axs_lib.reproducibility",
    "add_seed_to_checkpoint": "axs_lib.reproducibility",
    "validate_checkpoint_seed": "axs_lib.reproducibility",
    "verify_reproducibility": "axs_lib.reproducibility",
    # data order and per-sample randomness
    "ResumableSampler": "axs_lib.sampling",
    "SampleIndex": "axs_lib.sampling",
    "SeededDataset": "axs_lib.samples",
    "sample_rng": "axs_lib.samples",
    "sample_generator": "axs_lib.samples",
    "ResumableLoader": "axs_lib.loader",
    # more than one rank
    "MicroBatchPlan": "axs_lib.distributed",
    "GradientTree": "axs_lib.distributed",
    # checkpoints and what they hold
    "TrainingState": "axs_lib.state",
    "CheckpointManager": "axs_lib.run_dir",
    "save_checkpoint": "axs_lib.checkpoint",
    "load_checkpoint": "axs_lib.checkpoint",
    "EarlyStopping": "axs_lib.early_stopping",
    # a run's surroundings
    "StopRequest": "axs_lib.signals",
    "pin": "axs_lib.portable",
    # a trainer on the training session
    "Trainer": "axs_lib.training",
    "run_training": "axs_lib.training",
    "ResumeRequest": "axs_lib.training",
    "DataCheck": "axs_lib.training",
    # errors
    "AxsError": "axs_lib.errors",
    "InputError": "axs_lib.errors",
    "CheckpointError": "axs_lib.errors",
    "UsageError": "axs_lib.errors",
    "WriteError": "axs_lib.errors",
    "PlanError": "axs_lib.distributed",
    "PortableError": "axs_lib.portable",
}

# A literal list, so that static tools (linters, IDEs, type checkers) see the public names too;
# a test keeps it equal to _HOMES.
__all__ = [
    # seeding
    "set_seed", "derive_seed", "seed_globals", "seed_worker", "get_seed_state",
    "restore_seed_state", "create_reproducible_generator", "add_seed_to_checkpoint",
    "validate_checkpoint_seed", "verify_reproducibility",
    # data order and per-sample randomness
    "ResumableSampler", "SampleIndex", "SeededDataset", "sample_rng", "sample_generator",
    "ResumableLoader",
    # more than one rank
    "MicroBatchPlan", "GradientTree",
    # checkpoints
    "TrainingState", "CheckpointManager", "save_checkpoint", "load_checkpoint", "EarlyStopping",
    # a run's surroundings
    "StopRequest", "pin",
    # a trainer on the training session
    "Trainer", "run_training", "ResumeRequest", "DataCheck",
    # errors
    "AxsError", "InputError", "CheckpointError", "UsageError", "WriteError", "PlanError", "PortableError",
]


def __getattr__(name: str) -> Any:
    """Import ``name`` from its home module on first use, and keep it here for the next lookup."""
    home = _HOMES.get(name)
    if home is None:
        # AttributeError (not ImportError): ``from axs_lib import commands`` relies on it to fall
        # back to importing the submodule.
        raise AttributeError(f"module 'axs_lib' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # for type checkers and IDEs only; at run time the names arrive through __getattr__
    from axs_lib.checkpoint import load_checkpoint, save_checkpoint
    from axs_lib.distributed import GradientTree, MicroBatchPlan, PlanError
    from axs_lib.errors import AxsError, CheckpointError, InputError, UsageError, WriteError
    from axs_lib.loader import ResumableLoader
    from axs_lib.portable import PortableError, pin
    from axs_lib.reproducibility import (
        add_seed_to_checkpoint,
        create_reproducible_generator,
        derive_seed,
        get_seed_state,
        restore_seed_state,
        seed_globals,
        seed_worker,
        set_seed,
        validate_checkpoint_seed,
        verify_reproducibility,
    )
    from axs_lib.run_dir import CheckpointManager
    from axs_lib.samples import SeededDataset, sample_generator, sample_rng
    from axs_lib.sampling import ResumableSampler, SampleIndex
    from axs_lib.signals import StopRequest
    from axs_lib.early_stopping import EarlyStopping
    from axs_lib.state import TrainingState
    from axs_lib.training import DataCheck, ResumeRequest, Trainer, run_training
