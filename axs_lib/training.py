"""The training session: everything a run does that is not its task's.

A trainer brings its data, model, loss and validation; this module brings the session around
them, so a second trainer (Stage-2 beside Stage-1) writes only those and inherits every promise of
the first. A run goes through named phases, in this order:

1. **prepare** (`prepare`): check every input before anything is written. Pin the CPU arithmetic
   (`axs_lib.portable`) or the thread count, check the output directory, find the checkpoint to
   resume and rebuild the config on its stored result fields, seed, let the task check its data
   (`Trainer.check_data`: tiles, split, batch sizes, data fingerprint), then apply the resume rule
   (`resume_problems`: seed, result fields, tiles, format, an earlier version's sharding) and the
   task's own checkpoint checks (`Trainer.check_checkpoint`: shapes, sampler position). A refusal
   here is one line and leaves the directory as it was.
2. **open** (`open_run_dir`): lock the run directory; only now remove the files an earlier run
   recorded (``--overwrite``), temp files of interrupted writes, and set aside checkpoints a
   resume will write again.
3. **start** (`Trainer.start`): write ``run.json`` (the manifest: a name is recorded before its
   file exists), ``environment.json``, the config file, the task's files; drop metrics a killed
   run logged after its last checkpoint; open the event log.
4. **steps** (`Trainer.train_step`, `Trainer.after_step`): each rank computes its micro-batches
   of the step (`axs_lib.distributed.MicroBatchPlan`), every micro-batch with the global
   generators seeded from ``step/<step>/<slot>``; `GradientTree` sums them in one fixed tree;
   then logging, validation, early stopping, checkpoints, the non-finite guard and stop signals
   (SIGTERM, SIGINT, SIGUSR1: checkpoint at the step reached, exit 128 + signal).
5. **finish** (`Trainer.finish`): the status, the best metric and the speed go to ``run.json``.

The task's part is a subclass of `Trainer`: ``check_data`` (a class method, run before anything
is written), ``__init__`` (datasets, model, optimizer, scheduler, early stopping, `TrainingState`,
then `Trainer.attach_data`), ``micro_batch_loss`` and ``validate``. Optional hooks:
``check_checkpoint``, ``config_differences`` and ``config_warnings`` (before anything is written);
``task_files``, ``run_info_extras``, ``write_config``, ``open_events`` and ``event_log_names`` (the
run's records); ``describe``, ``metrics_line``, ``on_validated`` and ``finish_note`` (what the run
says and draws); ``name`` and ``no_validation`` (its words). `run_training` is the entry point: ``run_training(MyTrainer, config,
ResumeRequest("auto"))``. The config is the task's dataclass; the session reads the fields listed
in `SessionConfig`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Protocol

import torch
from torch import nn
from tqdm import tqdm

from axs_lib import run_dir
from axs_lib.distributed import GradientTree, MicroBatchPlan, PlanError, World, any_rank, init_world, main_first, shutdown
from axs_lib.errors import EXIT_FAILURE, AxsError, CheckpointError, UsageError
from axs_lib.loggers import check_installed, open_loggers, requested
from axs_lib.loggers import run_files as logger_files
from axs_lib.fingerprint.environment import diff_environments, environment_fingerprint, environment_report, portable_fingerprint
from axs_lib.reproducibility import derive_seed, seed_globals, set_seed
from axs_lib.run_dir import CHECKPOINTS, CONFIG_FILE, ENVIRONMENT_JSON, METRICS, RUN_JSON, RUN_MARKER, CheckpointManager, MetricsLog, RunDir, write_json
from axs_lib.signals import StopRequest
from axs_lib.workers import reap_workers_at_exit, shutdown_workers

logger = logging.getLogger(__name__)


class SessionConfig(Protocol):
    """The fields of a task's config that the session reads (Stage-1's `TrainConfig` has them all)."""

    output_dir: str
    data_dir: str
    device: str
    seed: int
    deterministic: bool
    benchmark: bool
    portable: bool
    threads: int | None
    steps: int
    lr: float
    batch_size: int
    accum_steps: int
    log_every: int
    val_every: int
    checkpoint_every: int
    keep_last: int
    keep_best: bool
    checkpoint_mode: str
    early_stopping: bool
    es_metric: str
    min_delta: float
    patience: int
    on_nonfinite: str
    grad_clip: float | None
    quiet: bool

    def result_fields(self) -> dict[str, Any]: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class ResumeRequest:
    """How to start: fresh, from the run's newest valid checkpoint (``auto``), or from a file."""

    target: str | None = None  # None, "auto" or a checkpoint path
    force: bool = False  # continue despite a changed seed, config, tile set or format
    allow_world_size_change: bool = False  # continue a per-rank-sharded checkpoint of an earlier version
    adopt: bool = False  # continue another run's checkpoint (a file outside this run's checkpoints/) here


@dataclass
class RunResult:
    """How a run ended, for code that calls a trainer as a library (the CLI uses ``exit_code``)."""

    exit_code: int
    final_step: int
    output_dir: Path
    status: str
    best: dict[str, Any] | None = None
    checkpoints: list[str] = field(default_factory=list)


@dataclass
class DataCheck:
    """What a task's `Trainer.check_data` found: the config with anything automatic resolved, the
    micro-batch plan, the data fingerprint, and the task's own inputs (Stage-1: the split)."""

    config: Any
    plan: MicroBatchPlan
    data_fingerprint: dict
    data: Any = None


@dataclass
class Setup:
    """What every check produced, before anything was written: the run's inputs, all validated."""

    config: Any
    run: RunDir
    manager: CheckpointManager
    ckpt: dict | None
    ckpt_path: Path | None
    seed_info: dict
    data: Any  # the task's inputs, from its DataCheck
    data_fp: dict
    env_fp: dict
    plan: MicroBatchPlan
    pinning: dict | None  # portable mode's record (axs_lib.portable), None otherwise

    @property
    def checkpoint_environment(self) -> dict:
        """The fingerprint stored in checkpoints: in portable mode only what the pinning leaves free to differ."""
        return portable_fingerprint(self.env_fp, self.pinning) if self.pinning is not None else self.env_fp


# --------------------------------------------------------------------------- small pieces


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def progress_line(done: int, left: int, elapsed: float) -> str:
    """What the terminal bar shows, for a log file (nohup, Slurm): rate, elapsed time and time left."""
    rate = done / max(elapsed, 1e-9)
    eta = tqdm.format_interval(left / rate) if rate > 0 else "?"
    return f"{rate:.2f} steps/s  elapsed {tqdm.format_interval(elapsed)}  eta {eta}"


def pin_cpu(config: SessionConfig) -> dict | None:
    """Portable mode's pinning, or just the thread count; before anything computes (see axs_lib.portable)."""
    if config.portable:
        from axs_lib import portable

        if torch.device(config.device if config.device != "auto" else "cpu").type != "cpu" or (
                config.device == "auto" and torch.cuda.is_available()):
            raise UsageError("--portable pins the CPU's arithmetic: use it with --device cpu (GPU models stay "
                             "outside the cross-machine promise)")
        return portable.pin(config.threads)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    return None


def micro_batch_plan(config: SessionConfig, world: World) -> MicroBatchPlan:
    """The step's micro-batches and this rank's share of them; a world size that cannot split them is refused."""
    try:
        return MicroBatchPlan(config.batch_size, config.accum_steps, world.size, world.rank)
    except PlanError as exc:
        raise UsageError(f"--global-batch-size {config.batch_size * config.accum_steps} on {world.size} ranks: {exc}") from None


def resume_problems(ckpt: dict, config_problems: list[str], data_fp: dict, allow_world_size_change: bool = False) -> list[str]:
    """Every reason this checkpoint cannot continue this run exactly (empty when it can): the task's
    ``config_problems`` (`Trainer.config_differences`), then the format, the tile set and the sharding.

    The world size is not one: a step's micro-batches do not depend on it. Only a checkpoint of an
    earlier version, which sharded every step per rank and recorded its ``world_size``, cannot
    continue exactly on this one unless it was written by a single process.
    """
    problems = list(config_problems) + run_dir.check_resume(
        ckpt, data_fingerprint=data_fp, allow_world_size_change=True)  # the world size: below
    legacy = ckpt.get("world_size", 1)
    if legacy != 1 and not allow_world_size_change:
        problems.append(f"world size: the checkpoint was written by an earlier version that sharded each step over "
                        f"{legacy} ranks; this version's steps do not depend on the ranks (--allow-world-size-change "
                        "continues it on the global order, with other bits)")
    accum = (ckpt.get("config") or {}).get("accum_steps", 1)
    if "world_size" in ckpt and legacy == 1 and accum != 1:
        problems.append(f"accumulation: the checkpoint was written by an earlier version that drew all {accum} "
                        "micro-batches of a step from one seed and summed them in order; this version seeds each "
                        "micro-batch and sums them in a fixed tree, so it cannot continue exactly")
    return problems


def continues_inexactly(ckpt: dict | None, resume: ResumeRequest) -> bool:
    """Whether a resume from ``ckpt`` was let through although it gives other bits than the run would have."""
    return ckpt is not None and (resume.force or ckpt.get("world_size", 1) != 1)


def check_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: Any, path: Path | str) -> None:
    """Load ``state_dict`` into ``optimizer`` (None: the state it holds) and refuse, in one line, a state that does not fit its
    parameters: torch checks the groups' sizes when loading, but a moment estimate of another shape
    (a crafted or foreign file with a valid checksum) would only fail inside the first step, as a
    traceback, after the run directory is opened. Every per-parameter tensor of more than one
    element must have its parameter's shape (AdamW's moments, SGD's momentum)."""
    try:
        if state_dict is not None:
            optimizer.load_state_dict(state_dict)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(path, f"optimizer_state_dict does not fit this model's optimizer: {str(exc).splitlines()[0][:200]}") from None
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.numel() > 1 and value.shape != param.shape:
                    raise CheckpointError(path, f"optimizer_state_dict: its {key} has shape {tuple(value.shape)} for a "
                                                f"parameter of shape {tuple(param.shape)}")


# --------------------------------------------------------------------------- phases 1 and 2


def prepare(trainer: type[Trainer], config: SessionConfig, resume: ResumeRequest, overwrite: bool, world: World,
            say: Callable[[str], None], config_for_resume: Callable[[dict], Any] | None) -> Setup:
    """Check the output directory, the resume checkpoint, the task's data and the sizes; write nothing."""
    pinning = pin_cpu(config)
    output_dir = Path(config.output_dir)
    run = RunDir(output_dir)
    run.check(resume=resume.target is not None, overwrite=overwrite)
    manager = CheckpointManager(output_dir, keep_last=config.keep_last, keep_best=config.keep_best,
                                checkpoint_mode=config.checkpoint_mode)
    found = manager.resume(resume.target, log=say, adopt=resume.adopt) if resume.target is not None else None
    if resume.target == "auto" and found is None:
        say(f"no checkpoint in {manager.folder}: starting from step 0")
    ckpt_path, ckpt = found if found is not None else (None, None)
    if ckpt is not None:
        run_dir.check_known_keys(ckpt, ckpt_path)  # a crafted value is one line, not a traceback further on
    if ckpt is not None and config_for_resume is not None:
        config = config_for_resume(ckpt.get("config") or {})
        manager.keep_last, manager.keep_best, manager.checkpoint_mode = config.keep_last, config.keep_best, config.checkpoint_mode
        pinning = pin_cpu(config)  # flags not given take the checkpoint's values: --portable and --threads too

    check_installed(requested(config))  # a logger asked for but not installed: one line, nothing written
    seed_info = set_seed(config.seed, deterministic=config.deterministic, benchmark=config.benchmark)
    # a resume is accepted as exact only on content hashed now, never on a cached digest
    checked = trainer.check_data(config, world, verify=ckpt is not None)
    config = checked.config
    env_fp = environment_fingerprint()
    if ckpt is not None:
        differences = trainer.config_differences(ckpt.get("config") or {}, config.result_fields())
        problems = resume_problems(ckpt, differences, checked.data_fingerprint, resume.allow_world_size_change)
        if problems and not resume.force:
            raise UsageError(f"{ckpt_path}: cannot resume exactly: " + "; ".join(problems) + " (pass --force-resume to continue anyway)")
        trainer.check_checkpoint(ckpt, ckpt_path, config, checked)  # even --force-resume cannot load what does not fit
        for line in problems:
            say(f"warning: resuming despite a difference: {line}")
        here = portable_fingerprint(env_fp, pinning) if pinning is not None else env_fp
        for d in diff_environments(ckpt.get("environment"), here):
            say(f"warning: environment differs from the checkpoint's, bits may differ: {d['key']}: {d['a']!r} -> {d['b']!r}")
    return Setup(config, run, manager, ckpt, ckpt_path, seed_info, checked.data, checked.data_fingerprint, env_fp,
                 checked.plan, pinning)


def open_run_dir(setup: Setup, overwrite: bool, resume: ResumeRequest, owned: contextlib.ExitStack, say) -> None:
    """Create and lock the run directory; only now remove an earlier run's files or set files aside."""
    run = owned.enter_context(setup.run.open())
    if overwrite and resume.target is None:
        removed = run.clear_previous()
        if removed:
            say(f"--overwrite: removed {len(removed)} files of the earlier run (its manifest); other files kept")
    for name in run.remove_stale_temp_files():
        say(f"removed {name}, left by a write that was interrupted")
    for line in setup.manager.set_aside_unloadable():
        say(f"warning: set aside {line}: it does not load, and the resumed run writes that step again")
    if continues_inexactly(setup.ckpt, resume):  # the run writes other bits under the newer names: keep those
        for line in setup.manager.set_aside_newer(setup.ckpt["step"]):
            say(f"warning: set aside {line}: it is newer than step {setup.ckpt['step']}, which this run continues "
                "with other bits")


def run_training(trainer: type[Trainer], config: SessionConfig, resume: ResumeRequest, *, overwrite: bool = False,
                 log: Callable[[str], None] | None = None, config_for_resume: Callable[[dict], Any] | None = None,
                 notes: list[str] = ()) -> RunResult:
    """Run (or continue) the training ``trainer`` describes, with ``config``, in ``config.output_dir``.

    Every input is checked before anything in the output directory is created, moved or removed
    (`prepare`); only then is the directory locked and, with ``overwrite``, the files that the
    earlier run recorded in its manifest removed (`open_run_dir`).

    ``config_for_resume`` rebuilds the config on top of a checkpoint's stored result fields, so
    flags not given on a resume take the checkpoint's values (see `axs_lib.commands.train`).
    Under ``torchrun`` every rank calls this; rank 0 owns the output directory. ``log`` receives
    progress lines (default: this module's logger); ``notes`` are lines of the caller's, said with
    the task's config warnings once every input has passed.
    """
    device = resolve_device(config.device)
    world = init_world(device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    say = log or logger.info
    if not world.is_main:
        say = lambda line: None  # noqa: E731 - rank 0 speaks for the job
    with contextlib.ExitStack() as owned:
        owned.callback(shutdown, world)
        setup = prepare(trainer, config, resume, overwrite, world, say, config_for_resume)
        main_first(lambda: open_run_dir(setup, overwrite, resume, owned, say), world)
        # a setting's warning is said when the run starts; its result fields cannot change on a resume,
        # so a run resumed ten times does not say it ten times more
        warnings = trainer.config_warnings(setup.config) if setup.ckpt is None else []
        for line in [*warnings, *notes]:
            say(line)
        session = trainer(setup, device, world, say)
        owned.callback(session.manager.close)
        return session.run()


# --------------------------------------------------------------------------- phases 3 to 5


class Trainer:
    """The loop of a run in named phases; a task subclasses it (see the module docstring).

    The subclass's ``__init__`` calls ``super().__init__(setup, device, world, say)`` first, then
    builds its datasets, ``model``, ``optimizer``, ``scheduler``, ``stopper`` (`EarlyStopping`) and
    ``state`` (`TrainingState(..., loader=loader)`, restored from ``setup.ckpt`` when resuming, so
    the loader's position comes back with the rest), and finally calls `attach_data` with its
    training loader and validation loader.
    """

    REQUIRED = ("model", "optimizer", "scheduler", "stopper", "state", "loader")  # what run() needs of __init__

    name: ClassVar[str] = "train"  # the progress bar's label
    no_validation: ClassVar[str] = "warning: no validation data: no validation metrics, best.pt or early stopping"

    # ------------------------------------------------------------------ the task's part
    @classmethod
    def check_data(cls, config, world: World, verify: bool) -> DataCheck:
        """Check the task's inputs before anything is written (``verify``: hash content now, a resume)."""
        raise NotImplementedError

    @classmethod
    def check_checkpoint(cls, ckpt: dict, path: Path, config, data: DataCheck) -> None:
        """Refuse a checkpoint that passed the resume rule but cannot be loaded into this task's state."""

    @classmethod
    def config_differences(cls, stored: dict, current: dict) -> list[str]:
        """A line per result field whose value differs between a checkpoint's config and this run's."""
        return run_dir.diff_fields(stored, current)

    @classmethod
    def config_warnings(cls, config) -> list[str]:
        """Settings that are allowed but probably not meant, said once every input has passed."""
        return []

    def micro_batch_loss(self, batch: Any) -> torch.Tensor:
        """The loss of one micro-batch (not yet divided by the number of micro-batches), on the device."""
        raise NotImplementedError

    def gradient_groups(self) -> list[list[nn.Parameter]]:
        """The parameters whose gradient norm is clipped together (``grad_clip``), one list per group.

        One group by default: the whole model. A task that trains several independent networks
        side by side (Stage-1 ``--members``) gives one group per network, so each is clipped as a
        run of its own would be.
        """
        return [self.parameters]

    def validate(self) -> dict[str, float]:
        """The validation metrics (no randomness); called only when a validation loader was attached."""
        raise NotImplementedError

    def on_validated(self, step: int) -> None:
        """After each validation on rank 0 (Stage-1: refresh the plots)."""

    def task_files(self) -> list[tuple[str, Callable[[Path], None]]]:
        """The task's own files in the run directory: (name, writer of that path), written at start."""
        return []

    def run_info_extras(self) -> dict[str, Any]:
        """The task's own keys of ``run.json``."""
        return {}

    def describe(self) -> str:
        """The run's first line after the checks (device, data sizes, world size, step)."""
        return f"device {device_name(self.device)}; world size {self.world.size}; step {self.state.step} of {self.config.steps}"

    def open_events(self):
        """The views of ``metrics.jsonl``: ``metrics.csv`` always, TensorBoard, MLflow and W&B as the
        config asks (`axs_lib.loggers`). An object of one's own needs ``add(record)`` and
        ``close(status=None)`` (``interrupted`` after a stop signal)."""
        return open_loggers(self.output_dir, self.state.step, requested(self.config), params=self.config.to_dict(),
                            quiet=self.config.quiet)

    def event_log_names(self) -> list[str]:
        """The run-directory names the loggers write (recorded in the manifest before they open)."""
        return logger_files(requested(self.config))

    # ------------------------------------------------------------------ set up
    def __init__(self, setup: Setup, device: torch.device, world: World, say: Callable[[str], None]):
        self.setup, self.device, self.world, self.say = setup, device, world, say
        self.config = setup.config
        self.plan = setup.plan
        self.output_dir = setup.run.root
        self.manager = setup.manager
        self.manager.on_write = self._before_write
        run = setup.run  # its manifest: retention deletes only what this run wrote
        self.manager.owns = lambda name: f"{CHECKPOINTS}/{name}" in run.written
        self.metrics: dict[str, float] = dict(setup.ckpt.get("metrics") or {}) if setup.ckpt is not None else {}
        self.metrics_log = MetricsLog(self.output_dir / METRICS)
        self.events = None
        self.run_info: dict[str, Any] = {}
        self._run_info_lock = threading.Lock()
        self.pin = device.type == "cuda"
        self.val_loader = None
        reap_workers_at_exit()

    def attach_data(self, loader, val_loader=None, *, position_restored: bool = False) -> None:
        """The training loader (a `ResumableLoader` with the run's plan) and the validation loader; the
        loader's position joins the training state.

        On a resume the loader must already be at the checkpoint's position: restored with the state
        (``TrainingState(..., loader=loader)``), or by the task itself (``position_restored``, as
        Stage-1 does to map an earlier version's positions). A loader at the start of the data would
        resume inexactly without a word, so that is refused here.
        """
        restored = position_restored or self.state.components.get("sampler_state") is loader
        if self.setup.ckpt is not None and not restored:
            raise TypeError(f"{type(self).__name__}: the training loader's position was not restored from the checkpoint: "
                            "pass loader= to TrainingState before loading it, or restore it and pass position_restored=True")
        if self.setup.ckpt is not None:  # loaded already: checked again here for a task that did not before writing
            check_optimizer_state(self.optimizer, None, self.setup.ckpt_path)
        self.loader, self.val_loader = loader, val_loader
        self.state.components["sampler_state"] = loader
        self.parameters = list(self.model.parameters())
        # one micro-batch on one process: its gradient is the step's, nothing to sum
        self.tree = GradientTree(self.parameters, self.plan, self.world) if self.plan.micro_batches > 1 else None
        self.batches: Iterator = loader.endless()

    # ------------------------------------------------------------------ run directory records
    def _before_write(self, names: list[str]) -> None:
        """Manifest first: a name is in run.json before its file exists (see `axs_lib.run_dir`).
        With ``--checkpoint-mode async`` this runs in the writer thread."""
        self.save_run_info(record=names)

    def save_run_info(self, record: list[str] = (), **changes) -> None:
        with self._run_info_lock:  # the loop and the checkpoint writer thread both update run.json
            self.setup.run.record(*record)
            self.run_info.update(changes)
            if self.world.is_main:
                self.run_info["written"] = self.setup.run.manifest()
                write_json(self.output_dir / RUN_JSON, self.run_info)

    def start(self) -> None:
        """Phase 3: the run's records, before the first step."""
        setup, config = self.setup, self.config
        files = self.task_files()
        setup.run.record(*[name for name, _ in files], ENVIRONMENT_JSON, CONFIG_FILE, METRICS, *self.event_log_names())
        self.run_info = {
            RUN_MARKER: 1, "status": "running", "config": config.to_dict(), "seed": config.seed, "seed_info": setup.seed_info,
            "environment": setup.env_fp, "data_fingerprint": setup.data_fp, "world_size": self.world.size,
            "micro_batches": {"global_batch_size": self.plan.global_batch_size, "micro_batch_size": self.plan.micro_batch_size,
                              "per_rank": self.plan.per_rank},
            "portable": setup.pinning,
            "paths": {"data_dir": str(Path(config.data_dir).resolve()), "output_dir": str(self.output_dir.resolve())},
            "resumed_from": {"path": str(setup.ckpt_path), "step": self.state.step} if setup.ckpt is not None else None,
            "started_at": now(), "ended_at": None, "final_step": self.state.step, "best": None,
            **self.run_info_extras(),
        }
        if not self.world.is_main:
            return
        self.save_run_info()
        for name, write in files:
            write(self.output_dir / name)
        write_json(self.output_dir / ENVIRONMENT_JSON, environment_report(setup.env_fp))
        self.write_config(self.output_dir / CONFIG_FILE)
        self.metrics_log.truncate_after(self.state.step)  # drop what a killed run logged after its last checkpoint
        self.events = self.open_events()

    def write_config(self, path: Path) -> None:
        """The config file a rerun can be started from (``--config``)."""
        write_json(path, self.config.to_dict())

    def record(self, entry: dict) -> None:
        self.metrics_log.append(entry)
        if self.events is not None:
            self.events.add(entry)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        """The full training state: the same dict on every rank and for every world size.

        No ``world_size`` and no per-rank RNG states: the global generators are re-seeded before
        every micro-batch, and after each step they hold the next step's first seed (see
        `train_step`), so ``rng_state`` does not depend on which rank computed what.
        """
        checkpoint = self.state.state_dict()
        checkpoint.update({
            "metrics": self.metrics, "config": self.config.result_fields(), "environment": self.setup.checkpoint_environment,
            "data_fingerprint": self.setup.data_fp,
        })
        return checkpoint

    def save(self, *, best: bool, due: bool) -> None:
        checkpoint = self.checkpoint()
        main_first(lambda: self.manager.save(checkpoint, self.state.step, best=best, write_step=due), self.world)

    # ------------------------------------------------------------------ phase 4: a step
    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns the step's loss as a device tensor (no host sync here).

        This rank computes its micro-batches (``self.plan.slots``), each with the global
        generators seeded from ``step/<step>/<slot>``; `GradientTree` sums all slots' gradients
        (and losses) in the fixed tree, the same on every rank for every world size.
        """
        config, plan = self.config, self.plan
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for slot in plan.slots:
            seed_globals(derive_seed(config.seed, "step", step, slot))
            loss = self.micro_batch_loss(next(self.batches)) / plan.micro_batches
            loss.backward()
            if self.tree is not None:
                self.tree.add(loss)
            else:
                total += loss.detach()
        if self.tree is not None:
            total = self.tree.reduce()
        seed_globals(derive_seed(config.seed, "step", step + 1, 0))  # rng_state of a checkpoint: rank-free
        if config.on_nonfinite == "skip" and not bool(torch.isfinite(total)):  # a host sync, in skip mode only
            self.say(f"warning: step {step + 1}: non-finite loss {float(total)}; update skipped (--on-nonfinite skip)")
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
        else:
            if config.grad_clip:
                for group in self.gradient_groups():
                    nn.utils.clip_grad_norm_(group, config.grad_clip)
            try:
                self.optimizer.step()
            except RuntimeError as exc:  # AdamW turns lr / (1 - beta1**step) into a float: 1e38 overflows it
                if "overflow" not in str(exc):
                    raise
                raise UsageError(f"--lr {config.lr}: the optimizer step overflows ({exc}); use a learning rate "
                                 "that float32 arithmetic can hold") from None
            self.nonfinite |= ~torch.isfinite(total)
        self.scheduler.step()
        return total

    def check_finite(self, last_good: int | None) -> None:
        """Stop with a clear error when a loss since the last check was not finite (reads one device flag)."""
        if self.config.on_nonfinite != "stop" or not bool(self.nonfinite):
            return
        where = f"the last good checkpoint is step {last_good}" if last_good else "no checkpoint was written"
        raise AxsError(f"{self.output_dir}: step {self.state.step}: the loss is not finite (NaN or inf); training stopped "
                       f"and nothing was saved from the bad steps ({where}); lower --lr, check the tiles, "
                       "or pass --on-nonfinite skip", exit_code=EXIT_FAILURE)

    def after_step(self, loss: torch.Tensor, stop_request: StopRequest, bar) -> str | None:
        """Log, validate, checkpoint and decide whether to go on; returns why the run ends, or None."""
        config, world = self.config, self.world
        step = self.state.step
        bar.update(1)
        sync_here = self.device.type != "cuda"  # free on CPU: check every step
        val_due = self.val_loader is not None and (step % config.val_every == 0 or step == config.steps)
        # the training loss is logged at every one of the first --log-every steps and at validations
        # too, so the loss plot of a short run has a train line beside the validation points
        log_due = step % config.log_every == 0 or step == config.steps or val_due or step <= config.log_every
        interrupted = any_rank(stop_request.signum is not None, world)
        due = step % config.checkpoint_every == 0 or step == config.steps or interrupted
        if sync_here or log_due or val_due or due:
            self.check_finite(self.last_good)
        if log_due and world.is_main:
            self._log_step(step, loss, bar)
        new_best = self._validate(step, loss, bar) if val_due else False
        early_stop = config.early_stopping and self.stopper.should_stop
        due = due or early_stop
        if due or (new_best and config.keep_best):
            self.save(best=new_best, due=due)
            if due:
                self.last_good = step
        if early_stop:
            self.say(f"early stopping at step {step}: no {config.es_metric} improvement > {config.min_delta} "
                     f"in {config.patience} validations (best {self.stopper.best:.6g} at step {self.stopper.best_step})")
            return "early_stopped"
        if interrupted:
            signum = stop_request.signum or signal.SIGTERM
            self.exit_code = stop_request.exit_code
            self.manager.wait()
            self.say(f"interrupted by {signal.Signals(signum).name} at step {step}: checkpoint written; "
                     "continue with the same command plus --resume auto")
            return "interrupted"
        return None

    def _log_step(self, step: int, loss: torch.Tensor, bar) -> None:
        config = self.config
        value, lr = float(loss), self.scheduler.get_last_lr()[0]
        self.record({"step": step, "split": "train", "loss": value, "lr": lr})
        bar.set_postfix(loss=f"{value:.4f}")
        if bar.disable and not config.quiet:
            self.say(f"step {step}/{config.steps}  loss {value:.4f}  lr {lr:.3g}  "
                     + progress_line(step - self.start_step, config.steps - step, time.perf_counter() - self.started))

    def _validate(self, step: int, loss: torch.Tensor, bar) -> bool:
        """Validation at ``step`` on every rank (same weights, same result, so all agree on early
        stopping); rank 0 records it. Returns whether it is the best so far."""
        self.metrics = self.validate()
        new_best = self.stopper.update(self.metrics[self.config.es_metric], step)
        if self.world.is_main:
            self.record({"step": step, "split": "val", **self.metrics})
            line = self.metrics_line(step, float(loss), self.metrics)
            bar.write(line) if not bar.disable else self.say(line)
            self.on_validated(step)
        return new_best

    def metrics_line(self, step: int, loss: float, metrics: dict[str, float]) -> str:
        return f"step {step}/{self.config.steps}  loss {loss:.4f}  " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        missing = [name for name in self.REQUIRED if not hasattr(self, name)]
        if missing:
            raise TypeError(f"{type(self).__name__}.__init__ did not set {', '.join(missing)} (see Trainer; the loader "
                            "comes with attach_data)")
        config, state = self.config, self.state
        self.start()
        self.say(self.describe())
        if self.val_loader is None:
            self.say(self.no_validation)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.skipped = 0
        self.last_good = state.step if self.setup.ckpt is not None else None
        status, self.exit_code = "completed", 0
        self.start_step, self.started = state.step, time.perf_counter()
        bar = tqdm(total=config.steps, initial=state.step, desc=self.name, unit="step",
                   disable=config.quiet or not self.world.is_main or not sys.stderr.isatty(), dynamic_ncols=True)
        self.model.train()
        try:
            with StopRequest() as stop_request, bar:  # workers ignore the signals (axs_lib.workers)
                while state.step < config.steps:
                    loss = self.train_step(state.step)
                    state.step += 1
                    ended = self.after_step(loss, stop_request, bar)
                    if ended is not None:
                        status = ended
                        break
            self.manager.wait()
        except BaseException:
            with contextlib.suppress(BaseException):
                self.manager.close()  # a write in flight finishes; its file is complete or absent
            self.save_run_info(status="failed", ended_at=now(), final_step=state.step)
            raise
        finally:  # a stop that then failed (its last checkpoint write, say) is a failure, not a stop
            self.close("interrupted" if status == "interrupted" and sys.exc_info()[0] is None else None)
        return self.finish(status)

    def close(self, status: str | None = None) -> None:
        """Stop the data workers and close the event log, however the run ended (``status``: what
        the loggers are told; None: failed while an exception propagates, else finished)."""
        self.batches.close()  # the iterator as this session holds it (it may wrap the loader's own stream)
        self.loader.close()
        shutdown_workers(self.val_loader)
        if self.events is not None:
            takes_status = status is not None and len(inspect.signature(self.events.close).parameters) > 0
            self.events.close(status) if takes_status else self.events.close()  # a task's own close() may take none

    def finish(self, status: str) -> RunResult:
        """Phase 5: the status, the best metric and the speed to ``run.json``; the result."""
        config, state, stopper = self.config, self.state, self.stopper
        elapsed = time.perf_counter() - self.started
        best = {"metric": config.es_metric, "value": stopper.best, "step": stopper.best_step} if stopper.best is not None else None
        self.save_run_info(status=status, ended_at=now(), final_step=state.step, best=best, skipped_steps=self.skipped,
                           steps_per_second=round((state.step - self.start_step) / elapsed, 3) if elapsed > 0 else None)
        ckpt_dir = self.manager.folder
        self.say(f"{status} at step {state.step}; checkpoints in {ckpt_dir}" + self.finish_note())
        return RunResult(self.exit_code, state.step, self.output_dir, status, best, sorted(p.name for p in ckpt_dir.glob("*.pt")))

    def finish_note(self) -> str:
        """What the last line adds after the checkpoints' folder (Stage-1: where the plots are)."""
        return ""
