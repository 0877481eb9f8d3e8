"""The Stage-1 training loop, readable top to bottom.

Every random draw that shapes the result is derived from the seed and a counter
(`axs_lib.reproducibility.derive_seed`): weights from ``init``, the epoch order from
``shuffle/<epoch>``, each sample's augmentation from ``augment/<epoch>/<index>``, and the global
generators (dropout) are re-seeded from ``step/<step>/<micro-batch>`` before every micro-batch.
So the state at a step is a pure function of (seed, tiles, result config), and a checkpoint needs
only model, optimizer, scheduler, sampler position and early-stopping state to continue exactly:
a run killed at any moment and resumed ends byte-identical to one that never stopped, whatever the
number of DataLoader workers.

A step is ``--accum-steps`` micro-batches of ``--batch-size`` tiles (``--global-batch-size`` /
``--micro-batch-size`` say the same), consecutive in the epoch order. Under ``torchrun`` the
ranks split the micro-batches and `axs_lib.distributed.GradientTree` sums their gradients in one
fixed tree over the micro-batch slots, so the world size changes who computes what and nothing
else: 1, 2 or 4 ranks write the same bytes, and a checkpoint resumes on any of them. Every rank
validates (same weights, same result, so all agree on early stopping) and rank 0 writes files.
With ``--portable`` the CPU arithmetic is pinned as well (`axs_lib.portable`): the same bytes on
any core count and x86-64 CPU with AVX2.

Order of work at optimizer step N: train step -> (validation, ``best.pt``) -> checkpoint ->
``latest`` pointer. A checkpoint is written at every ``checkpoint_every`` steps, at the last step,
when early stopping triggers, and when SIGINT, SIGTERM or SIGUSR1 asks the run to stop (exit
130, 143, 138). A non-finite loss stops the run before anything of the bad steps is saved
(``--on-nonfinite stop``) or drops that step's update (``skip``).

No host synchronisation in the step path on GPU: the loss stays on the device and is read at log,
validation and checkpoint steps only (with ``--on-nonfinite skip`` every step has to look at it).

The run directory's files and their names belong to `axs_lib.run_dir`; the training state saved
and restored is one `axs_lib.state.TrainingState`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from axs_lib import run_dir
from axs_lib.data import TileDataset, validation_loader
from axs_lib.loader import ResumableLoader
from axs_lib.signals import EXIT_CODES, StopRequest
from axs_lib.workers import ignore_stop_signals, reap_workers_at_exit, stop_signals_held
from axs_lib.distributed import GradientTree, MicroBatchPlan, PlanError, any_rank, init_world, main_first, shutdown
from axs_lib.errors import EXIT_FAILURE, AxsError, CheckpointError, UsageError
from axs_lib.fingerprint.data import data_fingerprint
from axs_lib.fingerprint.environment import (diff_environments, environment_fingerprint, environment_report,
                                              portable_fingerprint)
from axs_lib.reproducibility import derive_seed, seed_globals, set_seed
from axs_lib.loggers import open_loggers, requested
from axs_lib.loggers import run_files as logger_files
from axs_lib.run_dir import (CONFIG_FILE, ENVIRONMENT_JSON, METRICS, PLOTS, RUN_JSON, RUN_MARKER, SAMPLES, SPLIT_JSON,
                             CheckpointManager, MetricsLog, RunDir, write_json)
from axs_lib.sampling import ResumableSampler
from axs_lib.split import leave_out_flagged, make_split
from axs_lib.stage1.config import TrainConfig, config_warnings, diff_result_fields, resolve_auto_schedule, write_config_file
from axs_lib.stage1.early_stopping import EarlyStopping
from axs_lib.stage1.losses import stage1_loss
from axs_lib.stage1.metrics import QualityMetrics, flat
from axs_lib.stage1.model import UNet, band_means, band_stats
from axs_lib.state import TrainingState
from axs_lib.tiles import check_tiles, list_tiles

logger = logging.getLogger(__name__)
EXIT_INTERRUPTED = EXIT_CODES  # 128 + signal number (axs_lib.signals)
SAMPLE_TILES = 3  # validation tiles shown in samples/step_<N>.png


@dataclass
class ResumeRequest:
    """How to start: fresh, from the run's newest valid checkpoint (``auto``), or from a file."""

    target: str | None = None  # None, "auto" or a checkpoint path
    force: bool = False  # continue despite a changed seed, config, tile set or format
    allow_world_size_change: bool = False  # continue a per-rank-sharded checkpoint of an earlier version
    adopt: bool = False  # continue another run's checkpoint (a file outside this run's checkpoints/) here


@dataclass
class RunResult:
    """How a run ended, for code that calls `train_stage1` as a library (the CLI uses ``exit_code``)."""

    exit_code: int
    final_step: int
    output_dir: Path
    status: str
    best: dict[str, Any] | None = None
    checkpoints: list[str] = field(default_factory=list)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_resume(ckpt: dict, config: TrainConfig, data_fp: dict, allow_world_size_change: bool = False) -> list[str]:
    """Every reason this checkpoint cannot continue this run exactly (empty when it can).

    The world size is not one: a step's micro-batches do not depend on it. Only a checkpoint of an
    earlier version, which sharded every step per rank and recorded its ``world_size``, cannot
    continue exactly on this one unless it was written by a single process.
    """
    problems = diff_result_fields(ckpt.get("config") or {}, config.result_fields()) + run_dir.check_resume(
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


def continues_inexactly(ckpt: dict | None, resume: "ResumeRequest") -> bool:
    """Whether a resume from ``ckpt`` was let through although it gives other bits than the run would have."""
    return ckpt is not None and (resume.force or ckpt.get("world_size", 1) != 1)


def evaluate(model: nn.Module, loader, device: torch.device, config: TrainConfig, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Validation loss (tile-weighted mean) and the overall quality metrics of `axs_lib.stage1.metrics`
    (pooled PSNR, MAE, RMSE and SAM; SSIM at each tile's 2-98 % range), the same code as ``axs evaluate``.

    A tile without any valid pixel takes no part, so it can neither score perfect nor turn the
    result into NaN. No randomness is used.
    """
    model.eval()
    loss_sum, count = 0.0, 0
    quality = QualityMetrics()
    band_scale = getattr(model, "band_scale", None)
    with stop_signals_held():  # workers start here (the first time): see stop_signals_held
        batches = iter(loader)
    with torch.no_grad():
        for batch in batches:
            sar, target, mask = (batch[k].to(device) for k in ("sar", "optical", "mask"))
            with autocast():
                pred = model(sar).float()
            n = sar.shape[0]
            loss_sum += n * stage1_loss(pred, target, mask, config.l1_weight, config.ssim_weight, band_scale).item()
            quality.update(pred, target, mask)
            count += n
    model.train()
    return {"val_loss": loss_sum / count, **flat(quality.result())}


def reshard(position: int, old_size: int, new_size: int, shard_size: int) -> int:
    """Sampler position after a world-size change: the same share of the epoch already consumed.

    Used for checkpoints of the earlier per-rank sharding (``new_size`` 1: the global order).

    ``position`` counts samples within one rank's shard, so ``position * old_size`` samples of the
    epoch were consumed; each of ``new_size`` ranks continues at ``that // new_size``.
    """
    return min(position * old_size // new_size, shard_size - 1)


def train_stage1(config: TrainConfig, resume: ResumeRequest, *, overwrite: bool = False,
                 log: Callable[[str], None] | None = None,
                 config_for_resume: Callable[[dict], TrainConfig] | None = None, notes: list[str] = ()) -> RunResult:
    """Run (or continue) a Stage-1 training described by ``config`` in ``config.output_dir``.

    Every input is checked before anything in the output directory is created, moved or removed:
    the directory itself, the checkpoint to resume from and its compatibility, the tiles, the split
    and the batch size. Only then is the directory locked and, with ``overwrite``, the files that
    the earlier run recorded in its manifest removed.

    ``config_for_resume`` rebuilds the config on top of a checkpoint's stored result fields, so
    flags not given on a resume take the checkpoint's values; see `axs_lib.commands.train`.
    Under ``torchrun`` every rank calls this; rank 0 owns the output directory.
    ``log`` receives progress lines (default: the ``axs_lib.stage1.train`` logger); ``notes`` are
    lines of the caller's, said with the config's warnings once every input has passed.
    """
    device = _device(config.device)
    world = init_world(device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    say = log or logger.info
    if not world.is_main:
        say = lambda line: None  # noqa: E731 - rank 0 speaks for the job
    with contextlib.ExitStack() as owned:
        owned.callback(shutdown, world)
        setup = _check_inputs(config, resume, overwrite, device, world, say, config_for_resume)
        main_first(lambda: _open_run_dir(setup, overwrite, resume, owned, say), world)
        for line in [*config_warnings(setup.config), *notes]:
            say(line)
        trainer = Stage1Trainer(setup, device, world, say)
        owned.callback(trainer.manager.close)
        return trainer.run()


@dataclass
class _Setup:
    """What every check produced, before anything was written: the run's inputs, all validated."""

    config: TrainConfig
    run: RunDir
    manager: CheckpointManager
    ckpt: dict | None
    ckpt_path: Path | None
    seed_info: dict
    split: Any
    paths: list
    data_fp: dict
    env_fp: dict
    plan: MicroBatchPlan
    pinning: dict | None  # portable mode's record (axs_lib.portable), None otherwise

    @property
    def checkpoint_environment(self) -> dict:
        """The fingerprint stored in checkpoints: in portable mode only what the pinning leaves free to differ."""
        return portable_fingerprint(self.env_fp, self.pinning) if self.pinning is not None else self.env_fp


def _pin_cpu(config: TrainConfig) -> dict | None:
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


def _plan(config: TrainConfig, world) -> MicroBatchPlan:
    try:
        return MicroBatchPlan(config.batch_size, config.accum_steps, world.size, world.rank)
    except PlanError as exc:
        raise UsageError(f"--global-batch-size {config.batch_size * config.accum_steps} on {world.size} ranks: {exc}") from None


def _check_inputs(config, resume, overwrite, device, world, say, config_for_resume) -> _Setup:
    """Check the output directory, the resume checkpoint, the tiles and the sizes; write nothing."""
    pinning = _pin_cpu(config)
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
        pinning = _pin_cpu(config)  # flags not given take the checkpoint's values: --portable and --threads too

    seed_info = set_seed(config.seed, deterministic=config.deterministic, benchmark=config.benchmark)
    paths = list_tiles(config.data_dir, config.max_tiles)
    split = make_split(paths, config.split_seed, config.val_fraction, config.split_source)
    if config.clear_sky:
        split = leave_out_flagged(split)
    config = resolve_auto_schedule(config, len(split.train))
    check_tiles([*split.train, *split.val])  # every tile the run reads, before anything is written (cached)
    plan = _plan(config, world)
    if plan.global_batch_size > len(split.train):
        raise UsageError(f"a global batch of {plan.global_batch_size} tiles (--batch-size {config.batch_size} x "
                         f"--accum-steps {config.accum_steps}) is larger than the {len(split.train)} training tiles")
    # a resume is accepted as exact only on content hashed now, never on a cached digest
    data_fp = data_fingerprint(paths, split.manifest(), verify=ckpt is not None)
    env_fp = environment_fingerprint()
    if ckpt is not None:
        problems = check_resume(ckpt, config, data_fp, resume.allow_world_size_change)
        if problems and not resume.force:
            raise UsageError(f"{ckpt_path}: cannot resume exactly: " + "; ".join(problems) + " (pass --force-resume to continue anyway)")
        _check_state_shapes(ckpt, ckpt_path, config)  # even --force-resume cannot load weights that do not fit
        _check_sampler_position(ckpt, ckpt_path, len(split.train))
        for line in problems:
            say(f"warning: resuming despite a difference: {line}")
        here = portable_fingerprint(env_fp, pinning) if pinning is not None else env_fp
        for d in diff_environments(ckpt.get("environment"), here):
            say(f"warning: environment differs from the checkpoint's, bits may differ: {d['key']}: {d['a']!r} -> {d['b']!r}")
    return _Setup(config, run, manager, ckpt, ckpt_path, seed_info, split, paths, data_fp, env_fp, plan, pinning)


RESUME_KEYS = ("step", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "sampler_state", "early_stopping")


def _check_state_shapes(ckpt: dict, path: Path, config: TrainConfig) -> None:
    """Refuse a checkpoint whose weights do not fit this model (a foreign file or another width)."""
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt.get(k), dict if k != "step" else int)]
    if missing:
        raise CheckpointError(path, f"is not a Stage-1 training checkpoint: missing or malformed {', '.join(missing)}")
    sampler_state = ckpt["sampler_state"]
    if not all(isinstance(sampler_state.get(k), int) and sampler_state[k] >= 0 for k in ("epoch", "position")):
        raise CheckpointError(path, f"sampler_state {sampler_state!r} is not an (epoch, position) pair")
    expected = {k: tuple(v.shape) for k, v in UNet(width=config.width, dropout=config.dropout, head=config.head).state_dict().items()}
    stored = ckpt.get("model_state_dict")
    if not isinstance(stored, dict):
        raise CheckpointError(path, "has no model_state_dict: not a Stage-1 checkpoint")
    got = {k: tuple(v.shape) for k, v in stored.items() if isinstance(v, torch.Tensor)}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or [k for k in expected if got.get(k) != expected[k]]
        raise CheckpointError(path, f"its model does not fit a Stage-1 U-Net of width {config.width} with a {config.head} head "
                                    f"(first difference: {diff[0]})")


def _check_sampler_position(ckpt: dict, path: Path, num_train: int) -> None:
    """Refuse a sampler position past the end of this run's epoch (a crafted file, or --force-resume on fewer tiles).

    Positions count in the one global epoch order; an earlier version's per-rank shard position
    (``world_size`` > 1) is re-mapped by `reshard` instead."""
    position = ckpt["sampler_state"]["position"]
    if ckpt.get("world_size", 1) == 1 and position > num_train:
        raise CheckpointError(path, f"sampler_state position {position} is past the end of this run's {num_train}-sample "
                                    "epoch: the checkpoint is of another tile set")


def _open_run_dir(setup: _Setup, overwrite: bool, resume: ResumeRequest, owned: contextlib.ExitStack, say) -> None:
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


class Stage1Trainer:
    """Setup plus a loop: model, optimizer and data built from `_Setup`, then ``run()`` to the end.

    The training state is one `TrainingState` (model, optimizer, scheduler, sampler position,
    early stopping, last metrics), so what a checkpoint saves and what a resume restores are the
    same list of keys.
    """

    def __init__(self, setup: _Setup, device: torch.device, world, say: Callable[[str], None]):
        self.setup, self.device, self.world, self.say = setup, device, world, say
        config = self.config = setup.config
        self.output_dir = setup.run.root
        self.manager = setup.manager
        self.manager.on_write = self._before_write
        self.train_set = TileDataset(setup.split.train, config.seed, augment=config.augment, speckle_std=config.speckle_std)
        self.val_set = TileDataset(setup.split.val, config.seed, augment=False) if setup.split.val else None

        # The output starts at the training targets' per-band mean, so early samples are not white
        # (no random draw; skipped on resume, where the weights are loaded anyway).
        self.model = self._build_model(setup.ckpt is None)
        self.parameters = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=config.weight_decay)
        warmup, total = config.warmup_steps, config.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(lr_factor, warmup=warmup, total=total))
        self.stopper = EarlyStopping(config.patience, config.min_delta, config.es_mode, config.es_metric)
        self.metrics: dict[str, float] = {}
        start = (0, 0)
        self.state = TrainingState(seed=config.seed, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                   early_stopping=self.stopper)
        if setup.ckpt is not None:
            self.state.load_state_dict(setup.ckpt, source=str(setup.ckpt_path), check_seed=False)  # checked with --force-resume
            self.metrics = dict(setup.ckpt.get("metrics") or {})
            start = self._resume_position(setup.ckpt)
            say(f"resuming from {setup.ckpt_path} at step {self.state.step}")
        self.pin = device.type == "cuda"
        reap_workers_at_exit()
        self.plan = setup.plan
        # one global epoch order; the plan gives this rank its micro-batches of every step
        sampler = ResumableSampler(len(self.train_set), config.seed)
        self.loader = ResumableLoader(self.train_set, config.batch_size, seed=config.seed, sampler=sampler, plan=self.plan,
                                      num_workers=config.num_workers, pin_memory=self.pin, worker_init_fn=ignore_stop_signals)
        # one micro-batch on one process: its gradient is the step's, nothing to sum
        self.tree = GradientTree(self.parameters, self.plan, world) if self.plan.micro_batches > 1 else None
        self.loader.load_state_dict({"epoch": start[0], "position": start[1]})
        self.state.components["sampler_state"] = self.loader
        self.batches = self.loader.endless()
        self.val_loader = validation_loader(self.val_set, config.batch_size, config.num_workers, config.seed, self.pin) if self.val_set else None
        self.metrics_log = MetricsLog(self.output_dir / METRICS)
        self.events = None
        self.run_info: dict[str, Any] = {}
        self._run_info_lock = threading.Lock()
        self.autocast = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16,
                                          enabled=config.precision == "bf16-mixed")

    def _build_model(self, fresh: bool) -> UNet:
        """The U-Net with its output started at the training targets (no random draw; the statistics
        are skipped on resume, where the weights and buffers are loaded anyway)."""
        config = self.config
        self.output_means = self.target_stats = None
        if fresh and config.head == "linear":
            self.target_stats = band_stats(self.train_set)
            self.output_means = self.target_stats[0] if self.target_stats else None
        elif fresh:
            self.output_means = band_means(self.train_set)
        seed_globals(derive_seed(config.seed, "init"))
        if config.head == "linear":
            return UNet(width=config.width, dropout=config.dropout, head="linear", target_stats=self.target_stats).to(self.device)
        return UNet(width=config.width, dropout=config.dropout, head="sigmoid", output_bias=self.output_means).to(self.device)

    def _resume_position(self, ckpt: dict) -> tuple[int, int]:
        epoch, position = int(ckpt["sampler_state"]["epoch"]), int(ckpt["sampler_state"]["position"])
        old_size = int(ckpt.get("world_size", 1))
        if old_size != 1:  # an earlier version's per-rank shard position (--allow-world-size-change)
            position = reshard(position, old_size, 1, len(self.train_set))
            self.say(f"notice: a checkpoint sharded over {old_size} ranks: epoch {epoch} continues at position {position} "
                     f"of the global order, with a global batch of {self.setup.plan.global_batch_size} tiles (the earlier "
                     f"run's was {old_size} times its per-rank batch)")
        return epoch, position

    # ------------------------------------------------------------------ run directory records
    def _before_write(self, names: list[str]) -> None:
        """Manifest first: a name is in run.json before its file exists (see `axs_lib.run_dir`).
        With ``--checkpoint-mode async`` this runs in the writer thread."""
        self._save_run_info(record=names)

    def _save_run_info(self, record: list[str] = (), **changes) -> None:
        with self._run_info_lock:  # the loop and the checkpoint writer thread both update run.json
            self.setup.run.record(*record)
            self.run_info.update(changes)
            if self.world.is_main:
                self.run_info["written"] = self.setup.run.manifest()
                write_json(self.output_dir / RUN_JSON, self.run_info)

    def _write_run_files(self) -> None:
        setup, config = self.setup, self.config
        names = [SPLIT_JSON, ENVIRONMENT_JSON, CONFIG_FILE, METRICS, *logger_files(requested(config))]
        setup.run.record(*names)
        self.run_info = {
            RUN_MARKER: 1, "status": "running", "config": config.to_dict(), "seed": config.seed, "seed_info": setup.seed_info,
            "environment": setup.env_fp, "data_fingerprint": setup.data_fp, "world_size": self.world.size,
            "micro_batches": {"global_batch_size": self.plan.global_batch_size, "micro_batch_size": self.plan.micro_batch_size,
                              "per_rank": self.plan.per_rank},
            "portable": setup.pinning,
            "paths": {"data_dir": str(Path(config.data_dir).resolve()), "output_dir": str(self.output_dir.resolve())},
            "resumed_from": {"path": str(setup.ckpt_path), "step": self.state.step} if setup.ckpt is not None else None,
            "started_at": _now(), "ended_at": None, "final_step": self.state.step, "best": None,
            "output_bias_means": self.output_means,
            "target_stds": self.target_stats[1] if self.target_stats else None,
        }
        if not self.world.is_main:
            return
        self._save_run_info()
        setup.split.write(self.output_dir / SPLIT_JSON)
        write_json(self.output_dir / ENVIRONMENT_JSON, environment_report(setup.env_fp))
        write_config_file(config, self.output_dir / CONFIG_FILE)
        self.metrics_log.truncate_after(self.state.step)  # drop what a killed run logged after its last checkpoint
        self.events = open_loggers(self.output_dir, self.state.step, requested(config), params=config.to_dict(),
                                   quiet=config.quiet)

    def _record(self, entry: dict) -> None:
        self.metrics_log.append(entry)
        if self.events is not None:
            self.events.add(entry)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        """The full training state: the same dict on every rank and for every world size.

        No ``world_size`` and no per-rank RNG states: the global generators are re-seeded before
        every micro-batch, and after each step they hold the next step's first seed (see
        `_train_step`), so ``rng_state`` does not depend on which rank computed what.
        """
        checkpoint = self.state.state_dict()
        checkpoint.update({
            "metrics": self.metrics, "config": self.config.result_fields(), "environment": self.setup.checkpoint_environment,
            "data_fingerprint": self.setup.data_fp,
        })
        return checkpoint

    def _save(self, *, best: bool, due: bool) -> None:
        checkpoint = self.checkpoint()
        main_first(lambda: self.manager.save(checkpoint, self.state.step, best=best, write_step=due), self.world)

    # ------------------------------------------------------------------ the loop
    def _train_step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns the step's loss as a device tensor (no host sync here).

        This rank computes its micro-batches (``self.plan.slots``), each with the global
        generators seeded from ``step/<step>/<slot>``; `GradientTree` sums all slots' gradients
        (and losses) in the fixed tree, the same on every rank for every world size.
        """
        config, model, plan = self.config, self.model, self.plan
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for slot in plan.slots:
            seed_globals(derive_seed(config.seed, "step", step, slot))
            batch = next(self.batches)
            sar, target, mask = (batch[k].to(self.device, non_blocking=self.pin) for k in ("sar", "optical", "mask"))
            with self.autocast():
                pred = model(sar)
            loss = stage1_loss(pred.float(), target, mask, config.l1_weight, config.ssim_weight,
                               model.band_scale) / plan.micro_batches
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
                nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
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

    def _check_finite(self, last_good: int | None) -> None:
        """Stop with a clear error when a loss since the last check was not finite (reads one device flag)."""
        if self.config.on_nonfinite != "stop" or not bool(self.nonfinite):
            return
        where = f"the last good checkpoint is step {last_good}" if last_good else "no checkpoint was written"
        raise AxsError(f"{self.output_dir}: step {self.state.step}: the loss is not finite (NaN or inf); training stopped "
                       f"and nothing was saved from the bad steps ({where}); lower --lr, check the tiles, "
                       "or pass --on-nonfinite skip", exit_code=EXIT_FAILURE)

    def run(self) -> RunResult:
        config, world, state = self.config, self.world, self.state
        self._write_run_files()
        split = self.setup.split
        self.say(f"device {_device_name(self.device)}; {len(split.train)} train / {len(split.val)} val tiles; "
                 f"world size {world.size}; step {state.step} of {config.steps}")
        if self.val_set is None:
            self.say("warning: no validation tiles: no validation metrics, best.pt or early stopping")
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.skipped = 0
        last_good = state.step if self.setup.ckpt is not None else None
        status, exit_code = "completed", 0
        start_step, started = state.step, time.perf_counter()
        tty = sys.stderr.isatty()
        bar = tqdm(total=config.steps, initial=state.step, desc="train", unit="step",
                   disable=config.quiet or not world.is_main or not tty, dynamic_ncols=True)
        self.model.train()
        try:
            with StopRequest() as stop_request, bar:  # workers ignore the signals (axs_lib.workers)
                while state.step < config.steps:
                    loss = self._train_step(state.step)
                    state.step += 1
                    step = state.step
                    bar.update(1)
                    sync_here = self.device.type != "cuda"  # free on CPU: check every step
                    val_due = self.val_loader is not None and (step % config.val_every == 0 or step == config.steps)
                    # the training loss is logged at every one of the first --log-every steps and at validations
                    # too, so the loss plot of a short run has a train line beside the validation points
                    log_due = step % config.log_every == 0 or step == config.steps or val_due or step <= config.log_every
                    early_stop_possible = config.early_stopping
                    interrupted = any_rank(stop_request.signum is not None, world)
                    due = step % config.checkpoint_every == 0 or step == config.steps or interrupted
                    if sync_here or log_due or val_due or due:
                        self._check_finite(last_good)
                    if log_due and world.is_main:
                        value, lr = float(loss), self.scheduler.get_last_lr()[0]
                        self._record({"step": step, "split": "train", "loss": value, "lr": lr})
                        bar.set_postfix(loss=f"{value:.4f}")
                        if bar.disable and not config.quiet:
                            self.say(f"step {step}/{config.steps}  loss {value:.4f}  lr {lr:.3g}  "
                                     + _progress(step - start_step, config.steps - step, time.perf_counter() - started))

                    new_best = False
                    if val_due:
                        self.metrics = evaluate(self.model, self.val_loader, self.device, config, self.autocast)
                        new_best = self.stopper.update(self.metrics[config.es_metric], step)
                        if world.is_main:
                            self._record({"step": step, "split": "val", **self.metrics})
                            line = _metrics_line(step, config.steps, float(loss), self.metrics)
                            bar.write(line) if not bar.disable else self.say(line)
                            if config.plots:
                                self._refresh_plots(step)
                    early_stop = early_stop_possible and self.stopper.should_stop
                    due = due or early_stop
                    if due or (new_best and config.keep_best):
                        self._save(best=new_best, due=due)
                        if due:
                            last_good = step
                    if early_stop:
                        status = "early_stopped"
                        self.say(f"early stopping at step {step}: no {config.es_metric} improvement > {config.min_delta} "
                                 f"in {config.patience} validations (best {self.stopper.best:.6g} at step {self.stopper.best_step})")
                        break
                    if interrupted:
                        signum = stop_request.signum or signal.SIGTERM
                        status, exit_code = "interrupted", stop_request.exit_code
                        self.manager.wait()
                        self.say(f"interrupted by {signal.Signals(signum).name} at step {step}: checkpoint written; "
                                 "continue with the same command plus --resume auto")
                        break
            self.manager.wait()
        except BaseException:
            with contextlib.suppress(BaseException):
                self.manager.close()  # a write in flight finishes; its file is complete or absent
            self._save_run_info(status="failed", ended_at=_now(), final_step=state.step)
            raise
        finally:
            self.batches.close()
            self.loader.close()
            _shutdown_workers(self.val_loader)
            if self.events is not None:
                self.events.close()

        elapsed = time.perf_counter() - started
        stopper = self.stopper
        best = {"metric": config.es_metric, "value": stopper.best, "step": stopper.best_step} if stopper.best is not None else None
        self._save_run_info(status=status, ended_at=_now(), final_step=state.step, best=best, skipped_steps=self.skipped,
                            steps_per_second=round((state.step - start_step) / elapsed, 3) if elapsed > 0 else None)
        ckpt_dir = self.manager.folder
        self.say(f"{status} at step {state.step}; checkpoints in {ckpt_dir}"
                 + (f"; plots in {self.output_dir / PLOTS}" if config.plots and self.val_set else ""))
        return RunResult(exit_code, state.step, self.output_dir, status, best, sorted(p.name for p in ckpt_dir.glob("*.pt")))

    def _refresh_plots(self, step: int) -> None:
        from axs_lib.stage1 import plots  # matplotlib: imported by runs that draw, not by --no-plots
        self._save_run_info(record=[f"{PLOTS}/loss.png", f"{SAMPLES}/step_{step}.png"])
        plots.refresh(self.output_dir, self.metrics_log.read(), self.model, self.val_set, self.device, step, SAMPLE_TILES,
                      events=self.events)


def _shutdown_workers(loader) -> None:
    """Stop a DataLoader's persistent workers now, through their queues (they ignore SIGTERM)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        loader._iterator = None
        iterator._shutdown_workers()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def _progress(done: int, left: int, elapsed: float) -> str:
    """What the terminal bar shows, for a log file (nohup, Slurm): rate, elapsed time and time left."""
    rate = done / max(elapsed, 1e-9)
    eta = tqdm.format_interval(left / rate) if rate > 0 else "?"
    return f"{rate:.2f} steps/s  elapsed {tqdm.format_interval(elapsed)}  eta {eta}"


def _metrics_line(step: int, total: int, loss: float, metrics: dict[str, float]) -> str:
    return (f"step {step}/{total}  loss {loss:.4f}  val_loss {metrics['val_loss']:.4f}  mae {metrics['mae']:.0f}  "
            f"psnr {metrics['psnr']:.2f} dB (pooled)  ssim {metrics['ssim']:.4f}  sam {metrics['sam']:.2f} deg")
