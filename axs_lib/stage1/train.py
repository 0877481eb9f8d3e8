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

The session around the task (input checks, run directory and manifest, checkpoints, the loop's
logging, validation, early stopping, stop signals and non-finite guard) is `axs_lib.training`'s;
this module is what is Stage-1's: the tiles and their split, the U-Net, its loss and metrics. The
run directory's files and their names belong to `axs_lib.run_dir`; the training state saved and
restored is one `axs_lib.state.TrainingState`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from axs_lib.data import TileDataset, validation_loader
from axs_lib.errors import CheckpointError, UsageError
from axs_lib.fingerprint.data import data_fingerprint
from axs_lib.loader import ResumableLoader
from axs_lib.reproducibility import derive_seed, seed_globals
from axs_lib.run_dir import LOSS_PLOT, PLOTS, SPLIT_JSON, sample_image
from axs_lib.sampling import ResumableSampler
from axs_lib.split import leave_out_flagged, make_split
from axs_lib.stage1.config import (
    IMPLICIT_IN_OLDER_CHECKPOINTS,
    TrainConfig,
    config_warnings,
    diff_result_fields,
    resolve_auto_schedule,
    write_config_file,
)
from axs_lib.early_stopping import EarlyStopping
from axs_lib.stage1.losses import stage1_loss
from axs_lib.stage1.metrics import QualityMetrics, flat
from axs_lib.stage1.model import band_means, band_stats, build_unet, member_modules, member_predictions, state_difference
from axs_lib.state import TrainingState
from axs_lib.tiles import check_tiles, list_tiles
from axs_lib.training import (DataCheck, ResumeRequest, RunResult, Setup, Trainer, check_optimizer_state, device_name, lr_factor,
                              micro_batch_plan, resume_problems, run_training)
from axs_lib.workers import ignore_stop_signals, stop_signals_held

__all__ = ["ResumeRequest", "RunResult", "Stage1Trainer", "check_resume", "evaluate", "lr_factor", "train_stage1"]

logger = logging.getLogger(__name__)
SAMPLE_TILES = 3  # validation tiles shown in samples/step_<N>.png


def check_resume(ckpt: dict, config: TrainConfig, data_fp: dict, allow_world_size_change: bool = False) -> list[str]:
    """Every reason this checkpoint cannot continue this Stage-1 run exactly (empty when it can):
    its result fields (`diff_result_fields`: older checkpoints' implicit values count), then
    `axs_lib.training.resume_problems`."""
    return resume_problems(ckpt, diff_result_fields(ckpt.get("config") or {}, config.result_fields()), data_fp,
                           allow_world_size_change)


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

    `axs_lib.training.run_training` with `Stage1Trainer`: every input is checked before anything
    in the output directory is created, moved or removed (the directory itself, the checkpoint to
    resume from and its compatibility, the tiles, the split and the batch size); only then is the
    directory locked and, with ``overwrite``, the files that the earlier run recorded in its
    manifest removed. ``config_for_resume`` rebuilds the config on top of a checkpoint's stored
    result fields (see `axs_lib.commands.train`); ``log`` receives progress lines (default: the
    ``axs_lib.stage1.train`` logger).
    """
    return run_training(Stage1Trainer, config, resume, overwrite=overwrite, log=log or logger.info,
                        config_for_resume=config_for_resume, notes=notes)


RESUME_KEYS = ("step", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "sampler_state", "early_stopping")


def _check_state_shapes(ckpt: dict, path: Path, config: TrainConfig) -> None:
    """Refuse a checkpoint whose weights do not fit this model (a foreign file or another width)."""
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt.get(k), dict if k != "step" else int)]
    if missing:
        raise CheckpointError(path, f"is not a Stage-1 training checkpoint: missing or malformed {', '.join(missing)}")
    sampler_state = ckpt["sampler_state"]
    if not all(isinstance(sampler_state.get(k), int) and sampler_state[k] >= 0 for k in ("epoch", "position")):
        raise CheckpointError(path, f"sampler_state {sampler_state!r} is not an (epoch, position) pair")
    model = build_unet(config.members, width=config.width, dropout=config.dropout, head=config.head, block=config.block)
    stored = ckpt.get("model_state_dict")
    if not isinstance(stored, dict):
        raise CheckpointError(path, "has no model_state_dict: not a Stage-1 checkpoint")
    difference = state_difference(model, stored)
    if difference is not None:
        stored_config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        stored_members = stored_config.get("members", IMPLICIT_IN_OLDER_CHECKPOINTS["members"])
        its = f"; its config says {stored_members} members" if stored_members != config.members else ""
        raise CheckpointError(path, f"its model does not fit a Stage-1 U-Net of width {config.width} with a {config.head} head and {config.block} blocks"
                                    f"{members_note(config.members)} (first difference: {difference}{its})")
    check_optimizer_state(torch.optim.AdamW(model.parameters()), ckpt["optimizer_state_dict"], path)  # before anything is written


def _check_sampler_position(ckpt: dict, path: Path, num_train: int) -> None:
    """Refuse a sampler position past the end of this run's epoch (a crafted file, or --force-resume on fewer tiles).

    Positions count in the one global epoch order; an earlier version's per-rank shard position
    (``world_size`` > 1) is re-mapped by `reshard` instead."""
    position = ckpt["sampler_state"]["position"]
    if ckpt.get("world_size", 1) == 1 and position > num_train:
        raise CheckpointError(path, f"sampler_state position {position} is past the end of this run's {num_train}-sample "
                                    "epoch: the checkpoint is of another tile set")


class Stage1Trainer(Trainer):
    """Stage-1's part of a run: tiles, split, U-Net, loss and metrics (the session is `Trainer`'s).

    The training state is one `TrainingState` (model, optimizer, scheduler, sampler position,
    early stopping, last metrics), so what a checkpoint saves and what a resume restores are the
    same list of keys.
    """

    no_validation = "warning: no validation tiles: no validation metrics, best.pt or early stopping"

    # ------------------------------------------------------------------ before anything is written
    @classmethod
    def check_data(cls, config: TrainConfig, world, verify: bool) -> DataCheck:
        """List and check the tiles, make the split, resolve the automatic schedule, plan the micro-batches."""
        paths = list_tiles(config.data_dir, config.max_tiles)
        split = make_split(paths, config.split_seed, config.val_fraction, config.split_source)
        if config.clear_sky:
            split = leave_out_flagged(split)
        config = resolve_auto_schedule(config, len(split.train))
        check_tiles([*split.train, *split.val])  # every tile the run reads, before anything is written (cached)
        plan = micro_batch_plan(config, world)
        if plan.global_batch_size > len(split.train):
            raise UsageError(f"a global batch of {plan.global_batch_size} tiles (--batch-size {config.batch_size} x "
                             f"--accum-steps {config.accum_steps}) is larger than the {len(split.train)} training tiles")
        return DataCheck(config, plan, data_fingerprint(paths, split.manifest(), verify=verify), split)

    @classmethod
    def check_checkpoint(cls, ckpt: dict, path: Path, config: TrainConfig, data: DataCheck) -> None:
        _check_state_shapes(ckpt, path, config)
        _check_sampler_position(ckpt, path, len(data.data.train))

    @classmethod
    def config_differences(cls, stored: dict, current: dict) -> list[str]:
        return diff_result_fields(stored, current)

    @classmethod
    def config_warnings(cls, config: TrainConfig) -> list[str]:
        return config_warnings(config)

    # ------------------------------------------------------------------ set up
    def __init__(self, setup: Setup, device: torch.device, world, say: Callable[[str], None]):
        super().__init__(setup, device, world, say)
        config, split = self.config, setup.data
        self.train_set = TileDataset(split.train, config.seed, augment=config.augment, speckle_std=config.speckle_std)
        self.val_set = TileDataset(split.val, config.seed, augment=False) if split.val else None

        # The output starts at the training targets' per-band mean, so early samples are not white
        # (no random draw; skipped on resume, where the weights are loaded anyway).
        self.model = self._build_model(setup.ckpt is None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        warmup, total = config.warmup_steps, config.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(lr_factor, warmup=warmup, total=total))
        self.stopper = EarlyStopping(config.patience, config.min_delta, config.es_mode, config.es_metric)
        start = (0, 0)
        self.state = TrainingState(seed=config.seed, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                   early_stopping=self.stopper)
        if setup.ckpt is not None:
            self.state.load_state_dict(setup.ckpt, source=str(setup.ckpt_path), check_seed=False)  # checked with --force-resume
            start = self._resume_position(setup.ckpt)
            say(f"resuming from {setup.ckpt_path} at step {self.state.step}")
        # one global epoch order; the plan gives this rank its micro-batches of every step
        sampler = ResumableSampler(len(self.train_set), config.seed)
        loader = ResumableLoader(self.train_set, config.batch_size, seed=config.seed, sampler=sampler, plan=self.plan,
                                 num_workers=config.num_workers, pin_memory=self.pin, worker_init_fn=ignore_stop_signals)
        loader.load_state_dict({"epoch": start[0], "position": start[1]})
        val_loader = validation_loader(self.val_set, config.batch_size, config.num_workers, config.seed, self.pin) if self.val_set else None
        self.attach_data(loader, val_loader, position_restored=True)  # _resume_position maps earlier versions' positions
        self.autocast = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16,
                                          enabled=config.precision == "bf16-mixed")

    def _build_model(self, fresh: bool) -> nn.Module:
        """The U-Net with its output started at the training targets (no random draw; the statistics
        are skipped on resume, where the weights and buffers are loaded anyway)."""
        config = self.config
        self.output_means = self.target_stats = None
        if fresh and config.head == "linear":
            self.target_stats = band_stats(self.train_set)
            self.output_means = self.target_stats[0] if self.target_stats else None
        elif fresh:
            self.output_means = band_means(self.train_set)
        seed_globals(derive_seed(config.seed, "init"))  # members are built in turn: each draws its own weights
        start = {"target_stats": self.target_stats} if config.head == "linear" else {"output_bias": self.output_means}
        return build_unet(config.members, width=config.width, dropout=config.dropout, head=config.head, block=config.block,
                          **start).to(self.device)

    def _resume_position(self, ckpt: dict) -> tuple[int, int]:
        epoch, position = int(ckpt["sampler_state"]["epoch"]), int(ckpt["sampler_state"]["position"])
        old_size = int(ckpt.get("world_size", 1))
        if old_size != 1:  # an earlier version's per-rank shard position (--allow-world-size-change)
            position = reshard(position, old_size, 1, len(self.train_set))
            self.say(f"notice: a checkpoint sharded over {old_size} ranks: epoch {epoch} continues at position {position} "
                     f"of the global order, with a global batch of {self.setup.plan.global_batch_size} tiles (the earlier "
                     f"run's was {old_size} times its per-rank batch)")
        return epoch, position

    # ------------------------------------------------------------------ the task's step and validation
    def micro_batch_loss(self, batch: dict) -> torch.Tensor:
        sar, target, mask = (batch[k].to(self.device, non_blocking=self.pin) for k in ("sar", "optical", "mask"))
        with self.autocast():
            pred = self.model(sar)
        config = self.config
        losses = [stage1_loss(p.float(), target, mask, config.l1_weight, config.ssim_weight, self.model.band_scale)
                  for p in member_predictions(self.model, pred)]
        if len(losses) == 1:
            return losses[0]
        # The gradient is that of the members' summed losses, so each member gets exactly the gradient
        # of its own loss and trains bit for bit as a one-member run from its initial weights would;
        # the value is their mean, on the scale of a one-member run's loss in the logs.
        total = torch.stack(losses).sum()
        return total.detach() / len(losses) + (total - total.detach())  # value: exactly sum / K

    def gradient_groups(self) -> list[list[nn.Parameter]]:
        """One group per member, each clipped at ``grad_clip`` as a run of its own would be."""
        return [list(member.parameters()) for member in member_modules(self.model)]

    def validate(self) -> dict[str, float]:
        return evaluate(self.model, self.val_loader, self.device, self.config, self.autocast)

    def metrics_line(self, step: int, loss: float, metrics: dict[str, float]) -> str:
        return _metrics_line(step, self.config.steps, loss, metrics)

    def on_validated(self, step: int) -> None:
        if self.config.plots:
            self._refresh_plots(step)

    def _refresh_plots(self, step: int) -> None:
        from axs_lib.stage1 import plots  # matplotlib: imported by runs that draw, not by --no-plots
        self.save_run_info(record=[LOSS_PLOT, sample_image(step)])
        plots.refresh(self.output_dir, self.metrics_log.read(), self.model, self.val_set, self.device, step, SAMPLE_TILES,
                      events=self.events)


    # ------------------------------------------------------------------ the run directory's Stage-1 records
    def task_files(self) -> list:
        return [(SPLIT_JSON, self.setup.data.write)]

    def write_config(self, path: Path) -> None:
        write_config_file(self.config, path)

    def run_info_extras(self) -> dict[str, Any]:
        return {"output_bias_means": self.output_means, "target_stds": self.target_stats[1] if self.target_stats else None}

    def describe(self) -> str:
        split = self.setup.data
        return (f"device {device_name(self.device)}; {len(split.train)} train / {len(split.val)} val tiles; "
                f"world size {self.world.size}; step {self.state.step} of {self.config.steps}")

    def finish_note(self) -> str:
        return f"; plots in {self.output_dir / PLOTS}" if self.config.plots and self.val_set else ""


def members_note(members: int) -> str:
    return f" ({members} members)" if members > 1 else ""


def _metrics_line(step: int, total: int, loss: float, metrics: dict[str, float]) -> str:
    return (f"step {step}/{total}  loss {loss:.4f}  val_loss {metrics['val_loss']:.4f}  mae {metrics['mae']:.0f}  "
            f"psnr {metrics['psnr']:.2f} dB (pooled)  ssim {metrics['ssim']:.4f}  sam {metrics['sam']:.2f} deg")
