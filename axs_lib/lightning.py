"""Exact resume for a PyTorch Lightning ``Trainer``: the toolkit's guarantees under Lightning's loop.

Plain Lightning (``seed_everything(workers=True)``, ``deterministic=True``, ``ckpt_path=...``) is
not exact across a resume or a change of worker count: the global generators continue from
wherever the killed process left them (or from the start), a plain DataLoader restarts its epoch
with a fresh shuffle and fresh worker seeds, and its checkpoints hold absolute paths
(``ModelCheckpoint``'s ``dirpath``) and pickled objects (``AttributeDict`` hyperparameters), so
two runs into different directories never write the same bytes and a file needs
``weights_only=False`` to load. This module closes each gap with the toolkit's own layers, hooked
in where Lightning already offers a seam (read from ``lightning/pytorch/loops/fit_loop.py``,
``training_epoch_loop.py`` and ``trainer/connectors/checkpoint_connector.py`` of Lightning 2.6):

* **Randomness** (`ExactResume.on_train_batch_start`): before every training batch the global
  generators (python, numpy, torch CPU and CUDA) are re-seeded from
  ``derive_seed(seed, "step", global_step, rank)``, as the Stage-1 trainer does, so dropout and
  anything else the model draws is a function of the step, not of the process's history.
* **Data** (`resumable_loader`): the training dataloader is an `axs_lib.loader.ResumableLoader`.
  Lightning leaves loaders that are not ``DataLoader`` instances alone (no sampler injection, no
  re-instantiation); it saves ``loader.state_dict()`` of every loader that has one in the fit
  loop's ``combined_loader`` entry and hands it back with ``load_state_dict`` on a restart. With a
  sized loader its fetcher does not read ahead, so the state is the batches the loop consumed, and
  on a mid-epoch restart it expects the loader to yield only the rest of the epoch, which is what
  `ResumableLoader` does, with any worker count. Samples are exact per (epoch, index) through
  `axs_lib.samples.SeededDataset` or an explicit per-sample generator.
* **Files** (`AxsCheckpointIO`, a Lightning ``CheckpointIO`` plugin): every checkpoint goes
  through `axs_lib.checkpoint.save_checkpoint` (atomic, checksummed, canonical bytes) after
  `portable` made it safe for ``torch.load(weights_only=True)`` with no allow-list (dict subclasses
  become dicts) and free of the run directory's path (a string under the run directory is stored
  as ``<run>/...`` and expanded again on load, so ``ModelCheckpoint`` keeps working). Files named
  ``checkpoint_step_<N>.pt`` in ``<run>/checkpoints`` are written by `axs_lib.run_dir.CheckpointManager`
  (``latest`` pointer, retention); loading uses `axs_lib.checkpoint.load_checkpoint` (checksum
  verified, pickled code refused).
* **Checkpoints and checks** (`ExactResume`): writes ``checkpoint_step_<N>.pt`` every
  ``checkpoint_every`` optimizer steps and at the last step, from ``on_train_batch_end`` (the
  moment Lightning's own restart logic is built for), adding the keys our resume checks read
  (``seed_info``, ``config``, ``world_size``, ``environment``); `ExactResume.resume` finds the
  newest valid checkpoint (``--resume auto``) and refuses one of another seed, config or world size
  with the trainer's message, and ``on_load_checkpoint`` repeats the check for a ``ckpt_path`` the
  user passed by hand. A fit that starts from step 0 (``ckpt_path=None``, or ``"last"`` with no
  last file, which Lightning turns into None) into a folder holding step checkpoints is refused at
  ``on_train_start``, before anything is written over them.
* **Stop signals** (`axs_lib.signals.StopRequest`, installed at ``on_train_start``, after
  Lightning's own SIGTERM handler, which would end the fit at the end of any batch with exit
  status 0): SIGTERM, SIGINT or SIGUSR1 is acted on at the next optimizer-step boundary: the
  checkpoint of that step is written and `StopRequested` (a ``SystemExit`` with status 143, 130 or
  138) ends the fit. `ResumableLoader`'s workers ignore the signals, and ``on_exception`` stops them
  (Lightning's teardown hooks do not run after an exception), so the exit never waits on them.
* **Gradient accumulation**: each micro-batch of a step gets its own stream (keyed by its place in
  the step), checkpoints are written only at step boundaries, and a resume from one is exact
  (``tests/test_lightning.py``). A file saved between the
  micro-batches of a step (``ModelCheckpoint`` after a resume, a manual ``trainer.save_checkpoint``)
  lacks the gradients gathered so far: it is marked when written and a resume from it is refused.
* **Several devices**: under Lightning's DDP each rank trains on its own shard (`resumable_loader`
  shards by the trainer's rank, the step seeds carry the rank, rank 0 writes, a stop signal on any
  rank stops all at the same step), exact for a fixed world size, which the checkpoint records.
  With ``global_batch_size`` the steps do not depend on the number of devices at all: a
  `StepLoader` hands each rank its micro-batches of the step (`axs_lib.distributed.MicroBatchPlan`),
  `ExactResume.backward` computes their gradients with per-micro-batch seeds and sums them in
  `axs_lib.distributed.GradientTree`'s fixed tree, and `GradientTreeStrategy` keeps
  DistributedDataParallel's own all-reduce out of the way.
* **Validation, loggers, progress bar**: none reaches the step checkpoints. Loggers and the
  progress bar keep no state there; validation runs after the step's checkpoint, in eval mode,
  and what it draws from the global generators is overwritten by the next batch's re-seeding.
  What remained is Lightning's count of validation batches in the fit loop's state, which
  `_clear_validation_progress` writes zeroed (see there: without it, a run that validates, and a
  resume from an epoch's last batch with a validation due, gave other bytes).

Every refusal is an `axs_lib.errors.AxsError` (`UsageError` for a checkpoint that cannot continue
this run, `CheckpointError` for a damaged one), raised out of `ExactResume.resume` or out of
``trainer.fit``; its text is the one line to print.

Lightning is an optional dependency (``pip install 'axs-lib[lightning]'``); nothing else in
``axs_lib`` imports this module.

Not covered: Lightning's own ``ModelCheckpoint`` naming, ``ckpt_path="last"``/``"hpc"`` lookups
(use `ExactResume.resume`), iterable-style training data, and more than one training dataloader
of which some are not resumable.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import signal
from pathlib import Path
from typing import Any, Callable

try:
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch.strategies import DDPStrategy
except ImportError:  # the one clear error; nothing else in axs_lib needs Lightning
    raise ImportError(
        "axs_lib.lightning needs PyTorch Lightning, which is not installed: pip install 'axs-lib[lightning]'"
    ) from None

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from axs_lib.checkpoint import load_checkpoint, save_checkpoint
from axs_lib.distributed import GradientTree, MicroBatchPlan, World
from axs_lib.errors import AxsError, UsageError
from axs_lib.loader import ResumableLoader
from axs_lib.reproducibility import add_seed_to_checkpoint, check_seed, derive_seed, last_seed_info, seed_globals
from axs_lib.run_dir import BEST, LATEST, CheckpointManager, check_resume, checkpoint_name, step_of
from axs_lib.sampling import ResumableSampler
from axs_lib.signals import StopRequest, StopRequested

log = logging.getLogger(__name__)

RUN_MARK = "<run>"  # stands for the run directory in stored strings
ACCUMULATING_KEY = "axs_mid_accumulation"  # in a file saved between the micro-batches of one step
GLOBAL_BATCH_KEY = "global_batch_size"  # in a checkpoint of steps summed over micro-batches (`ExactResume.backward`)
MICRO_BATCH_KEY = "micro_batch_size"  # beside it: the micro-batches shape the sum's tree and draw their own numbers
VALIDATION_PROGRESS = "epoch_loop.val_loop."  # prefix of the validation loop's entries in the fit loop's state


# --------------------------------------------------------------------------- portable content


def portable(obj: Any, root: os.PathLike | str | None = None) -> Any:
    """``obj`` made fit for a weights-only-safe, path-free checkpoint.

    Dict subclasses (Lightning's ``AttributeDict`` hyperparameters) become plain dicts, tuples and
    lists are rebuilt, and every string (key or value) that is the run directory ``root`` or a path
    under it is rewritten to start with ``<run>``. Anything else is kept as it is:
    `axs_lib.checkpoint.save_checkpoint` refuses, naming the key, what would still not load with
    ``weights_only=True``.
    """
    prefixes = _root_prefixes(root)
    return _map(obj, lambda s: _relative(s, prefixes))


def expand(obj: Any, root: os.PathLike | str | None) -> Any:
    """The inverse of `portable` for paths: ``<run>/...`` strings point into ``root`` again."""
    if root is None:
        return obj
    base = os.path.abspath(root)
    return _map(obj, lambda s: base + s[len(RUN_MARK):] if s == RUN_MARK or s.startswith(RUN_MARK + os.sep) else s)


def _root_prefixes(root: os.PathLike | str | None) -> list[str]:
    if root is None:
        return []
    forms = {os.path.abspath(root), os.path.realpath(root)}
    return sorted(forms, key=len, reverse=True)  # the longest match first


def _relative(text: str, prefixes: list[str]) -> str:
    for prefix in prefixes:
        if text == prefix or text.startswith(prefix + os.sep):
            return RUN_MARK + text[len(prefix):]
    return text


def _map(obj: Any, fix: Callable[[str], str]) -> Any:
    if isinstance(obj, str):
        return fix(obj)
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        return {_map(k, fix): _map(v, fix) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_map(v, fix) for v in obj)
    return obj


# --------------------------------------------------------------------------- CheckpointIO plugin


class AxsCheckpointIO(CheckpointIO):
    """Lightning's checkpoint files, written and read by `axs_lib.checkpoint`.

    ``Trainer(plugins=[AxsCheckpointIO(output_dir)])``. Every save is atomic, checksummed,
    weights-only-safe and free of the run directory's path (`portable`); a
    ``<output_dir>/checkpoints/checkpoint_step_<N>.pt`` target is written by the run's
    `CheckpointManager` (which also moves ``latest`` and applies ``keep_last``), any other path
    (``ModelCheckpoint``'s names) by `save_checkpoint` alone. Loading verifies the checksum and
    never unpickles code, whatever ``weights_only`` Lightning asks for.
    """

    def __init__(self, output_dir: os.PathLike | str, *, keep_last: int | None = None,
                 manager: CheckpointManager | None = None):
        self.manager = manager if manager is not None else CheckpointManager(output_dir, keep_last=keep_last, keep_best=False)
        self.root = Path(output_dir)
        self._written: set[str] = set()  # real paths of the files this plugin wrote

    def save_checkpoint(self, checkpoint: dict[str, Any], path: os.PathLike | str, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        content = portable(checkpoint, self.root)
        step = step_of(path.name)
        if step is not None and path.parent.resolve() == self.manager.folder.resolve():
            self.manager.save(content, step)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(content, path)
        self._written.add(os.path.realpath(path))

    def load_checkpoint(self, path: os.PathLike | str, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only=False (Lightning's default for its own files) is not honoured: ours never need it
        checkpoint = load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")
        return expand(checkpoint, self.root)

    def remove_checkpoint(self, path: os.PathLike | str) -> None:
        """Delete a checkpoint that ``ModelCheckpoint`` rotates out, if it is the run's own.

        The path comes from ``ModelCheckpoint``'s state, which a resume restores from a file: a
        crafted one could name ``<run>/x/../../anything``. So only a regular file directly in the
        run's ``checkpoints/`` folder (no ``..``, no link) is removed, never ``latest``, ``best.pt``
        or a ``checkpoint_step_<N>.pt`` (the manager's, with its own retention), and only one this
        plugin wrote or, written before a resume, one that loads as a checkpoint of ours
        (checksum verified). Anything else is left, with a warning.
        """
        reason = self._foreign(Path(path))
        if reason:
            log.warning("not removing %s: %s", path, reason)
            return
        Path(path).unlink(missing_ok=True)
        self._written.discard(os.path.realpath(path))

    def _foreign(self, path: Path) -> str:
        """Why ``path`` is not a checkpoint of this run that ModelCheckpoint may delete ("" when it is)."""
        text = os.fspath(path)
        if ".." in Path(text).parts:
            return "the path climbs out with '..'"
        folder = os.path.realpath(self.manager.folder)
        if os.path.realpath(os.path.dirname(os.path.abspath(text))) != folder:
            return f"not in the run's checkpoint folder {self.manager.folder}"
        if path.name in (LATEST, BEST) or step_of(path.name) is not None:
            return "the run's checkpoint manager keeps this file"
        if path.is_symlink() or not path.is_file():
            return "not a regular file"
        if os.path.realpath(path) in self._written:
            return ""
        try:
            load_checkpoint(path)
        except AxsError as exc:
            return f"not a checkpoint this run wrote ({exc})"
        return ""

    def teardown(self) -> None:
        self.manager.close()


# --------------------------------------------------------------------------- the training loader


def resumable_loader(dataset: Dataset, batch_size: int, *, seed: int, trainer: "pl.Trainer | None" = None,
                     shuffle: bool = True, global_batch_size: int | None = None, **kwargs: Any) -> ResumableLoader:
    """The training dataloader for `ExactResume`: a `ResumableLoader` sharded by the trainer's rank.

    Call it from ``LightningModule.train_dataloader`` (``trainer=self.trainer``). Wrap a dataset
    whose augmentation uses the global generators in `axs_lib.samples.SeededDataset` first.
    Other keyword arguments go to `ResumableLoader` (``num_workers``, ``drop_last``, ...).

    ``global_batch_size`` G (with ``ExactResume(..., global_batch_size=G)``): a `StepLoader`
    instead, for steps whose bits do not depend on the number of devices. Every batch it hands
    out is one optimizer step: this rank's micro-batches of ``batch_size`` samples out of the next
    G samples of the unsharded epoch order. Raises `axs_lib.distributed.PlanError` when the world
    size does not divide the G / ``batch_size`` micro-batches.
    """
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    if global_batch_size is not None:
        plan = MicroBatchPlan.from_global(global_batch_size, batch_size, world, rank)
        return StepLoader(dataset, batch_size, seed=seed, sampler=ResumableSampler(dataset, seed, shuffle=shuffle),
                          plan=plan, **kwargs)
    sampler = ResumableSampler(dataset, seed, shuffle=shuffle, num_replicas=world, rank=rank)  # type: ignore[arg-type]
    return ResumableLoader(dataset, batch_size, seed=seed, sampler=sampler, **kwargs)


class StepLoader(ResumableLoader):
    """A `ResumableLoader` over a micro-batch plan whose every batch is one optimizer step: the list
    of this rank's ``plan.per_rank`` micro-batches of it, in slot order.

    One Lightning batch per step, so Lightning's own counters (batches, steps, the ``loops`` state
    in every checkpoint) are the same for every number of devices; the loader's state moves one
    whole step per batch and is the same on every rank (`ResumableLoader` with ``plan``).
    """

    def __len__(self) -> int:
        return super().__len__() // self.plan.per_rank

    def __iter__(self):
        return _steps(super().__iter__(), self.plan.per_rank)

    def endless(self):
        return _steps(super().endless(), self.plan.per_rank)


def _steps(micro_batches, per_rank: int):
    """Groups of ``per_rank`` micro-batches (the plan hands out whole steps only)."""
    while group := list(itertools.islice(micro_batches, per_rank)):
        yield group


class GradientTreeStrategy(DDPStrategy):
    """Lightning's DDP (one process per device, the process group, rank-aware logging and
    checkpointing) without ``DistributedDataParallel``, for `ExactResume.backward`.

    DistributedDataParallel averages the ranks' gradients with a bucketed all-reduce whose order
    depends on the world size; here nothing reduces behind the module's back:
    `ExactResume.backward` sums every micro-batch's gradient in `axs_lib.distributed.GradientTree`'s
    one fixed tree, the same floating-point expression on 1, 2 or 8 devices. The parameters and
    buffers are broadcast from rank 0 once, as DistributedDataParallel does when it wraps them.
    """

    def configure_ddp(self) -> None:
        assert isinstance(self.model, pl.LightningModule)
        with torch.no_grad():
            for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
                torch.distributed.broadcast(tensor, src=0)


# --------------------------------------------------------------------------- the callback


class ExactResume(pl.Callback):
    """Bit-exact training, checkpoints and resume for a Lightning ``Trainer``.

    ::

        exact = ExactResume("runs/exp1", seed=42, config={"lr": 1e-3, "width": 16}, checkpoint_every=10)
        trainer = Trainer(max_steps=100, deterministic=True, enable_checkpointing=False,
                          callbacks=[exact], plugins=[exact.checkpoint_io])
        trainer.fit(module, ckpt_path=exact.resume("auto"))

    ``config``: the flat dict of settings that change the result (checked on resume, stored as
    the checkpoint's ``config``). The training dataloader must be a `ResumableLoader`
    (`resumable_loader`); the callback refuses to train otherwise.

    ``global_batch_size`` G: steps whose bits do not depend on the number of devices. The module
    trains with manual optimization and computes each step's gradients with `backward`; the
    training loader is ``resumable_loader(..., global_batch_size=G)``; on several devices the
    strategy is `GradientTreeStrategy`. Checkpoints then hold G and no world size, and resume on
    any number of devices that divides the G / micro-batch-size micro-batches. Without it, each
    rank trains on its own shard under Lightning's DDP, and a checkpoint resumes on its own world
    size only.
    """

    def __init__(self, output_dir: os.PathLike | str, *, seed: int, config: dict[str, Any] | None = None,
                 checkpoint_every: int | None = None, keep_last: int | None = None,
                 allow_world_size_change: bool = False, environment: bool = True, global_batch_size: int | None = None):
        for name, value in (("checkpoint_every", checkpoint_every), ("global_batch_size", global_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.global_batch_size = global_batch_size
        self._tree: GradientTree | None = None
        self._backward_at: int | None = None  # the step whose gradients `backward` computed last
        self._restored: tuple[str, Any] | None = None  # (file, its micro-batch size), checked when the loader is known
        self.seed = check_seed(seed)
        self.config = dict(config or {})
        self.checkpoint_every = checkpoint_every
        self.allow_world_size_change = allow_world_size_change
        self.manager = CheckpointManager(output_dir, keep_last=keep_last, keep_best=False)
        self.checkpoint_io = AxsCheckpointIO(output_dir, manager=self.manager)
        self._environment = environment
        self._fingerprint: dict[str, Any] | None = None
        self._saved_step: int | None = None
        self._writing_step = False  # inside save(): the file being written is a step checkpoint of ours
        self._stepped_at: int | None = None  # global_step after the last batch seen
        self._accumulating = False  # the last batch added gradients without an optimizer step
        self._loaders: list[ResumableLoader] = []
        self._stop: StopRequest | None = None

    @property
    def state_key(self) -> str:
        return "ExactResume"

    # ------------------------------------------------------------------ resume
    def resume(self, target: str | os.PathLike | None = "auto", *, world_size: int = 1,
               log: Callable[[str], None] | None = None) -> str | None:
        """The ``ckpt_path`` for ``trainer.fit``: None (fresh start), ``"auto"`` (newest valid checkpoint,
        None when there is none) or a file of this run; refused (`UsageError`) when it cannot continue
        this run exactly. Reads only; nothing is written.

        ``"auto"`` that finds nothing says so in one line (``no checkpoint in <folder>: starting from
        step 0``, to ``log``, else as a warning): a kill before the first checkpoint, or a wrong
        ``output_dir``, must not pass for a resume."""
        found = self.manager.resume(target, log=log)
        if found is None:
            if target == "auto":
                (log or logging.getLogger(__name__).warning)(f"no checkpoint in {self.manager.folder}: starting from step 0")
            return None
        path, checkpoint = found
        self._refuse_mismatch(checkpoint, path, world_size)
        self.manager.set_aside_unloadable()
        return str(path)

    def _refuse_mismatch(self, checkpoint: dict, path: os.PathLike | str, world_size: int) -> None:
        if checkpoint.get(ACCUMULATING_KEY):
            raise UsageError(f"{path}: cannot resume exactly: written in the middle of an accumulated step (its "
                             "gradients are not in the file); resume from a checkpoint_step_<N>.pt of ExactResume")
        stored = checkpoint.get(GLOBAL_BATCH_KEY)
        # global batches record no world size: a file of either kind is judged on its global batch alone
        any_world = self.allow_world_size_change or self.global_batch_size is not None or stored is not None
        problems = check_resume(checkpoint, seed=self.seed, config=self.config, world_size=world_size,
                                allow_world_size_change=any_world)
        if not _same_int(stored, self.global_batch_size):
            name = lambda g: "none (steps sharded by rank)" if g is None else repr(g)[:40]  # noqa: E731
            problems.append(f"global batch: checkpoint {name(stored)}, now {name(self.global_batch_size)}")
        if problems:
            raise UsageError(f"{path}: cannot resume exactly: " + "; ".join(problems))

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(trainer.strategy.checkpoint_io, AxsCheckpointIO):
            raise UsageError("ExactResume needs its checkpoint plugin: Trainer(..., plugins=[exact.checkpoint_io])")
        if self._environment and self._fingerprint is None:
            from axs_lib.fingerprint.environment import environment_fingerprint

            self._fingerprint = environment_fingerprint()

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        loaders = trainer.fit_loop._combined_loader.flattened if trainer.fit_loop._combined_loader is not None else []
        wrong = [type(dl).__name__ for dl in loaders if not isinstance(dl, ResumableLoader)]
        self._loaders = [dl for dl in loaders if isinstance(dl, ResumableLoader)]
        if wrong:
            raise UsageError(f"ExactResume needs the training dataloader to be an axs_lib.loader.ResumableLoader "
                             f"(see axs_lib.lightning.resumable_loader), got {', '.join(wrong)}")
        self._check_steps(trainer, pl_module)
        # Lightning has resolved ckpt_path by now ("last" with no last file becomes None): a fresh
        # start must not write step after step over an earlier run's checkpoints
        if trainer.ckpt_path is None:
            self.manager.resume(None)
        else:
            self.manager.resumed_from = Path(trainer.ckpt_path)
        if not torch.are_deterministic_algorithms_enabled():
            log.warning("deterministic algorithms are off: pass Trainer(deterministic=True) for bit-exact results")
        self._saved_step = self._stepped_at = trainer.global_step
        self._accumulating = False
        _finish_epoch_boundary_restart(trainer.fit_loop)
        # After Lightning's own SIGTERM handler (registered just before this hook): that one would
        # end the fit at the end of the batch, mid-accumulation and with exit status 0.
        self._stop = StopRequest().install()
        connector = getattr(trainer, "_signal_connector", None)
        if getattr(connector, "received_sigterm", False):  # it came during setup, to Lightning's handler
            self._stop.signum = signal.SIGTERM  # ours to act on, at the first step boundary
            connector.received_sigterm = False

    def _check_steps(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """A global batch (``global_batch_size``) needs its loader, manual optimization and no
        DistributedDataParallel; steps sharded by rank need no `StepLoader`."""
        steps = [dl for dl in self._loaders if isinstance(dl, StepLoader)]
        g = self.global_batch_size
        if g is None:
            if steps:
                raise UsageError("the training loader hands out global batches (resumable_loader(..., global_batch_size=G)): "
                                 "pass the same global_batch_size to ExactResume")
            if isinstance(trainer.strategy, GradientTreeStrategy):
                raise UsageError("GradientTreeStrategy leaves the sum of the ranks' gradients to ExactResume.backward: "
                                 "pass global_batch_size to ExactResume (or train with strategy='ddp')")
            return
        self._tree, self._backward_at = None, None
        if len(steps) != 1 or len(self._loaders) != 1 or steps[0].plan.global_batch_size != g:
            got = ", ".join(str(dl.plan.global_batch_size) if isinstance(dl, StepLoader) else type(dl).__name__ + " (no global batch)"
                            for dl in self._loaders)
            raise UsageError(f"ExactResume(global_batch_size={g}) needs one training loader from "
                             f"resumable_loader(..., global_batch_size={g}), got {got or 'none'}")
        plan = steps[0].plan
        if (plan.world_size, plan.rank) != (trainer.world_size, trainer.global_rank):
            raise UsageError(f"the training loader was planned for rank {plan.rank} of {plan.world_size}, this is rank "
                             f"{trainer.global_rank} of {trainer.world_size}: pass trainer=self.trainer to resumable_loader")
        restored, self._restored = self._restored, None  # this fit's checkpoint only
        if restored is not None and not _same_int(restored[1], plan.micro_batch_size):
            raise UsageError(f"{restored[0]}: cannot resume exactly: micro-batch size: checkpoint "
                             f"{repr(restored[1])[:40]}, now {plan.micro_batch_size}")
        if pl_module.automatic_optimization:
            raise UsageError("ExactResume(global_batch_size=...) computes each step's gradients in ExactResume.backward: "
                             "set automatic_optimization = False in the LightningModule")
        running = next((name for name, m in pl_module.named_modules()
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats), None)
        if running is not None:
            raise UsageError(f"ExactResume(global_batch_size=...): {running} keeps running statistics of the micro-batches "
                             "each device sees, which depend on the number of devices: use GroupNorm or LayerNorm, or "
                             "BatchNorm with track_running_stats=False")
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            raise UsageError("ExactResume(global_batch_size=...) sums the gradients itself: on several devices use "
                             "strategy=axs_lib.lightning.GradientTreeStrategy(), not DistributedDataParallel")

    def backward(self, module: "pl.LightningModule", micro_batches: list, loss_fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """This step's gradients, the same bits on any number of devices; returns the step's loss.

        ``micro_batches`` is the batch the `StepLoader` handed to ``training_step``: this rank's
        micro-batches of the step. Each goes through ``loss_fn`` (its mean loss) and
        ``manual_backward`` with the global generators seeded from its slot in the step (dropout
        belongs to the micro-batch, not to the rank), and `axs_lib.distributed.GradientTree` sums
        the gradients of all ranks' micro-batches in its fixed tree. ``.grad`` then holds the
        gradient of the global batch's mean loss (set, not added to: no ``zero_grad`` needed);
        call ``optimizer.step()`` next. The returned loss is the global batch's mean, the same on
        every rank.
        """
        if self.global_batch_size is None or not self._loaders:
            raise UsageError("ExactResume.backward needs ExactResume(global_batch_size=G) and "
                             "resumable_loader(..., global_batch_size=G) as the training loader")
        plan = self._loaders[0].plan
        if len(micro_batches) != plan.per_rank:
            raise UsageError(f"ExactResume.backward got {len(micro_batches)} micro-batches; this rank computes "
                             f"{plan.per_rank} per step: pass the batch the training loader handed out")
        trainable = [p for p in module.parameters() if p.requires_grad]
        if self._tree is None or len(trainable) != len(self._tree.parameters) or any(
                a is not b for a, b in zip(trainable, self._tree.parameters)):  # first step, or (un)frozen since
            self._tree = GradientTree(trainable, plan, World(rank=plan.rank, size=plan.world_size))
        for parameter in self._tree.parameters:
            parameter.grad = None  # the tree takes each slot's gradient from an empty .grad
        step = module.trainer.global_step
        try:
            for slot, micro in zip(plan.slots, micro_batches):
                seed_globals(derive_seed(self.seed, "step", step, "micro", slot))
                loss = loss_fn(micro) / plan.micro_batches
                module.manual_backward(loss)
                self._tree.add(loss)
        except BaseException:
            self._tree.reset()
            raise
        loss = self._tree.reduce()
        self._backward_at = step
        # the generators as the step began, on every rank: rank 0 saves their state in the checkpoint,
        # and after its last micro-batch it would hold the state of another slot for every world size
        seed_globals(derive_seed(self.seed, "step", step))
        return loss

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self.global_batch_size is not None:  # `backward` seeds each micro-batch from its slot; nothing from the rank
            seed_globals(derive_seed(self.seed, "step", trainer.global_step))
            return
        keys: tuple[str | int, ...] = ("step", trainer.global_step, trainer.global_rank)
        if trainer.accumulate_grad_batches > 1:  # each micro-batch of a step draws its own numbers
            keys += ("micro", batch_idx % trainer.accumulate_grad_batches)
        seed_globals(derive_seed(self.seed, *keys))

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # No optimizer step in this batch (accumulating): not a step boundary. Checked before
        # ModelCheckpoint's hook (Lightning runs checkpoint callbacks last), so a file it writes
        # now is marked (on_save_checkpoint) and refused on resume.
        self._accumulating = step == self._stepped_at
        if self._accumulating:
            return
        self._stepped_at = step
        if self.global_batch_size is not None and self._backward_at != step - 1:
            raise UsageError(f"step {step}: its gradients did not come from ExactResume.backward (with "
                             "global_batch_size, training_step computes them there, then calls optimizer.step())")
        stop = self._stop_requested(trainer)
        every = self.checkpoint_every
        if step != self._saved_step and ((every is not None and step % every == 0) or step == trainer.max_steps or stop):
            self.save(trainer, step)
        if stop:
            self._leave(trainer, step)

    def _stop_requested(self, trainer: "pl.Trainer") -> bool:
        """Whether a stop signal reached any rank (a collective on several ranks: all call it at each step)."""
        requested = self._stop is not None and self._stop.requested
        if trainer.world_size > 1:
            requested = bool(trainer.strategy.reduce_boolean_decision(requested, all=False))
        return requested

    def _leave(self, trainer: "pl.Trainer", step: int) -> None:
        """End the fit after a stop signal, the checkpoint of ``step`` written: `StopRequested`, a
        SystemExit with status 128 + signal number (Lightning tears down and re-raises it)."""
        self.manager.wait()
        signum = self._stop.signum if self._stop is not None and self._stop.signum is not None else signal.SIGTERM
        log.warning("stopped by %s at step %d: checkpoint written; continue with resume(\"auto\")",
                    signal.Signals(signum).name, step)
        raise StopRequested(signum)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step != self._saved_step and trainer.max_steps == -1:  # an epoch-limited run's last step
            self.save(trainer, trainer.global_step)
        self.manager.wait()
        self._release_signals()

    def save(self, trainer: "pl.Trainer", step: int) -> None:
        """Write ``checkpoints/checkpoint_step_<step>.pt`` (all ranks call it; rank 0 writes)."""
        if self.global_batch_size is not None and trainer.world_size > 1:
            _check_ranks_agree(trainer.lightning_module, step)
        # weights_only=False said outright: the full state (left unset, Lightning logs that it chose it at every save)
        self._writing_step = True
        try:
            trainer.save_checkpoint(self.manager.folder / checkpoint_name(step), weights_only=False)
        finally:
            self._writing_step = False
        self._saved_step = step

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        checkpoint["step"] = trainer.global_step
        checkpoint["config"] = dict(self.config)
        if self.global_batch_size is None:
            checkpoint["world_size"] = trainer.world_size
        else:  # the steps do not depend on the ranks, and the file says nothing about them
            checkpoint[GLOBAL_BATCH_KEY] = self.global_batch_size
            checkpoint[MICRO_BATCH_KEY] = self._loaders[0].plan.micro_batch_size if self._loaders else None
        if self._fingerprint is not None:
            checkpoint["environment"] = self._fingerprint
        info = last_seed_info()
        add_seed_to_checkpoint(checkpoint, info if info is not None and info.get("seed") == self.seed else {"seed": self.seed})
        if self._accumulating:  # the gradients of the step under way are not in the file: not resumable
            checkpoint[ACCUMULATING_KEY] = True
        if self._writing_step:
            _clear_validation_progress(checkpoint)

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        self._refuse_mismatch(checkpoint, trainer.ckpt_path or "<checkpoint>", trainer.world_size)
        if self.global_batch_size is not None:  # compared with the loader's at on_train_start
            self._restored = (str(trainer.ckpt_path or "<checkpoint>"), checkpoint.get(MICRO_BATCH_KEY))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "checkpoint_every": self.checkpoint_every}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # What matters was checked in on_load_checkpoint; the settings are this run's own. Only
        # the shape is checked here, as every load_state_dict of the toolkit does.
        if not isinstance(state_dict, dict) or not {"seed", "checkpoint_every"} <= state_dict.keys():
            got = sorted(map(str, state_dict))[:4] if isinstance(state_dict, dict) else type(state_dict).__name__
            raise UsageError(f"{self.manager.folder}: ExactResume state must be a dict with 'seed' and "
                             f"'checkpoint_every', got {str(got)[:120]}")

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # Lightning's teardown hooks do not run after an exception (a refusal, a stop signal, an
        # error in the module): stop the workers and finish a write in flight here, or the exit
        # would wait on workers that ignore multiprocessing's SIGTERM.
        self._release_signals()
        with contextlib.suppress(Exception):  # the exception under way is the one to report
            self._close()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._release_signals()
        self._close()

    def _release_signals(self) -> None:
        if self._stop is not None:
            self._stop.restore()

    def _close(self) -> None:
        # The trainer's objects refer to each other, so its loaders are freed by the cycle
        # collector, which may close their worker queues before DataLoader tells the workers to
        # stop: each worker would then wait out a 5 s join timeout and ignore the SIGTERM after
        # it. Stopping them here, while everything is alive, takes milliseconds.
        loaders, self._loaders = self._loaders, []
        for loader in loaders:
            loader.close()
        self.manager.close()  # a write in flight finishes (or reports its error)


def _check_ranks_agree(module: torch.nn.Module, step: int) -> None:
    """Refuse to save when the ranks' weights or buffers differ (`UsageError`, on every rank alike).

    With global batches every rank applies the same summed gradient, so they stay identical unless
    something rank-local changed them (a buffer updated in ``forward``, a gradient that did not go
    through `ExactResume.backward`); rank 0 would then save one rank's model as the run's.
    """
    digests = [(name, hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest())
               for name, t in module.state_dict().items() if isinstance(t, torch.Tensor)]
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, digests)
    for rank, theirs in enumerate(every[1:], 1):
        differ = next((a for (a, x), (_, y) in zip(every[0], theirs) if x != y), None)
        if differ is not None or len(theirs) != len(every[0]):
            raise UsageError(f"step {step}: rank {rank} holds another {differ or 'state dict'} than rank 0: something "
                             "rank-local changed the model (a buffer updated in forward, a gradient not summed by "
                             "ExactResume.backward); nothing was saved")


def _same_int(a: Any, b: Any) -> bool:
    """Equal, and both None or both integers (a crafted 16.0 or True is not a global batch)."""
    return (a is None and b is None) or (type(a) is int and type(b) is int and a == b)


def _clear_validation_progress(checkpoint: dict[str, Any]) -> None:
    """The validation loop's progress counters in a step checkpoint, as if validation had never run.

    Lightning keeps them in the fit loop's state (``epoch_loop.val_loop.batch_progress``: the
    batches of the last validation run and of this epoch's runs), so without this a run with
    validation writes other bytes than the same run without it, and `axs compare` would call the
    difference unexplained nondeterminism, although every weight, moment and generator state is
    the same. They are bookkeeping, not training state: a step checkpoint is written at a batch
    end, never inside a validation run, and on a restart from one Lightning only asks them whether
    it stopped in the middle of a validation run (never, for these files) and then fast-forwards
    them past the validation due at that batch. Zeroed in every step checkpoint, they give the
    same bytes with validation on or off, before and after a resume. The live counters (the
    progress bar's, the logs') are left alone; so are the files of ``ModelCheckpoint``, which may
    be written at the end of a validation run.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if isinstance(fit, dict):
        for key in [k for k in fit if isinstance(k, str) and k.startswith(VALIDATION_PROGRESS)]:
            fit[key] = _zeroed(fit[key])


def _zeroed(state: Any) -> Any:
    """``state`` with every count 0 and every flag False (a fresh ``_BatchProgress`` state)."""
    if isinstance(state, dict):
        return {key: _zeroed(value) for key, value in state.items()}
    if isinstance(state, bool):
        return False
    if isinstance(state, int):
        return 0
    return state


def _finish_epoch_boundary_restart(fit_loop: Any) -> None:
    """Resume from a checkpoint of an epoch's last batch as an uninterrupted run goes on.

    Lightning 2.6 (``_FitLoop.reset``) counts the restored epoch as finished, but keeps its
    restart stage "restarted mid-epoch" until the next epoch's first iteration is done, so
    ``on_advance_start`` skips that next epoch's ``on_train_epoch_start`` hooks and its ready and
    started counters: the training is right, the ``loops`` state in every later checkpoint is not
    the uninterrupted run's. Clearing the stage here (after ``reset``, before the epoch starts)
    lets the next epoch start as it would have. Lightning clears it itself after that iteration.
    """
    epoch_loop = fit_loop.epoch_loop
    if (getattr(fit_loop, "restarted_mid_epoch", False) and getattr(epoch_loop, "restarted_on_train_batch_end", False)
            and epoch_loop.batch_progress.is_last_batch):
        fit_loop.reset_restart_stage()


__all__ = ["AxsCheckpointIO", "ExactResume", "GradientTreeStrategy", "RUN_MARK", "StepLoader", "expand", "portable",
           "resumable_loader"]
