"""The Stage-1 training loop, readable top to bottom.

Every random draw that shapes the result is derived from the seed and a counter
(`axs_lib.reproducibility.derive_seed`): weights from ``init``, the epoch order from
``shuffle/<epoch>``, each sample's augmentation from ``augment/<epoch>/<index>``, and the global
generators (dropout) are re-seeded from ``step/<step>/<rank>`` at every optimizer step. So the
state at a step is a pure function of (seed, tiles, result config), and a checkpoint needs only
model, optimizer, scheduler, sampler position and early-stopping state to continue exactly: a run
killed at any moment and resumed ends byte-identical to one that never stopped, whatever the
number of DataLoader workers.

Under ``torchrun`` each rank trains on its shard of every epoch with its own ``step/<step>/<rank>``
stream, gradients are averaged in a fixed layout (`axs_lib.distributed`), every rank validates
(same weights, same result, so all agree on early stopping) and rank 0 writes files. Results
depend on the world size, not on timing.

Order of work at optimizer step N: train step -> (validation, ``best.pt``) -> checkpoint ->
``latest`` pointer. A checkpoint is written at every ``checkpoint_every`` steps, at the last step,
when early stopping triggers, and when SIGINT or SIGTERM asks the run to stop.
"""

from __future__ import annotations

import contextlib
import errno
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from axs_lib.checkpoint import FORMAT_KEY, FORMAT_VERSION, atomic_link, load_checkpoint, save_checkpoint, write_latest
from axs_lib.data import TileDataset, make_loader
from axs_lib.distributed import any_rank, average_gradients, gather, init_world, main_first, shutdown
from axs_lib.errors import EXIT_FAILURE, AxsError, UsageError
from axs_lib.fingerprint.data import data_fingerprint
from axs_lib.fingerprint.environment import diff_environments, environment_fingerprint, environment_report
from axs_lib.reproducibility import add_seed_to_checkpoint, derive_seed, get_seed_state, seed_globals, set_seed
from axs_lib.sampling import EpochSampler
from axs_lib.split import make_split
from axs_lib.stage1 import plots, run_dir
from axs_lib.stage1.config import TrainConfig, diff_result_fields
from axs_lib.stage1.early_stopping import EarlyStopping
from axs_lib.stage1.events import EventLog
from axs_lib.stage1.events import available as events_available
from axs_lib.stage1.losses import masked_ssim, psnr, spectral_angle, stage1_loss
from axs_lib.stage1.model import UNet
from axs_lib.tiles import list_tiles, read_tile

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}
SAMPLE_TILES = 3  # validation tiles shown in samples/step_<N>.png


@dataclass
class ResumeRequest:
    """How to start: fresh, from the run's newest valid checkpoint (``auto``), or from a file."""

    target: str | None = None  # None, "auto" or a checkpoint path
    force: bool = False  # continue despite a changed seed, config, tile set, world size or format
    allow_world_size_change: bool = False  # continue on another number of ranks, re-sharding the epoch


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


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the run can checkpoint and leave."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for signum in EXIT_INTERRUPTED:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_resume(ckpt: dict, config: TrainConfig, data_fp: dict, world_size: int, allow_world_size_change: bool = False) -> list[str]:
    """Every reason this checkpoint cannot continue this run exactly (empty when it can)."""
    problems = []
    if ckpt.get(FORMAT_KEY) != FORMAT_VERSION:
        problems.append(f"checkpoint format: checkpoint {ckpt.get(FORMAT_KEY)!r}, this version writes {FORMAT_VERSION}")
    problems += diff_result_fields(ckpt.get("config", {}), config.result_fields())
    stored_fp = ckpt.get("data_fingerprint") or {}
    if stored_fp.get("sha256") != data_fp["sha256"]:
        problems.append(
            f"tile set: checkpoint {stored_fp.get('num_tiles')} tiles ({str(stored_fp.get('sha256'))[:12]}), "
            f"now {data_fp['num_tiles']} tiles ({data_fp['sha256'][:12]})"
        )
    if ckpt.get("world_size", 1) != world_size and not allow_world_size_change:
        problems.append(f"world size: checkpoint {ckpt.get('world_size', 1)}, now {world_size} "
                        "(--allow-world-size-change re-shards deterministically, with other bits)")
    return problems


def evaluate(model: nn.Module, loader, device: torch.device, config: TrainConfig) -> dict[str, float]:
    """Validation loss, PSNR, SSIM and SAM, averaged over validation tiles (no randomness used)."""
    model.eval()
    totals = {"val_loss": 0.0, "psnr": 0.0, "ssim": 0.0, "sam": 0.0}
    count = 0
    with torch.no_grad():
        for batch in loader:
            sar, target, mask = (batch[k].to(device) for k in ("sar", "optical", "mask"))
            pred = model(sar)
            n = sar.shape[0]
            totals["val_loss"] += n * stage1_loss(pred, target, mask, config.l1_weight, config.ssim_weight).item()
            totals["ssim"] += n * masked_ssim(pred, target, mask).item()
            for i in range(n):
                totals["psnr"] += psnr(pred[i : i + 1], target[i : i + 1], mask[i : i + 1])
                totals["sam"] += spectral_angle(pred[i : i + 1], target[i : i + 1], mask[i : i + 1])
            count += n
    model.train()
    return {k: v / count for k, v in totals.items()}


def reshard(position: int, old_size: int, new_size: int, shard_size: int) -> int:
    """Sampler position after a world-size change: the same share of the epoch already consumed.

    ``position`` counts samples within one rank's shard, so ``position * old_size`` samples of the
    epoch were consumed; each of ``new_size`` ranks continues at ``that // new_size``.
    """
    return min(position * old_size // new_size, shard_size - 1)


def train_stage1(config: TrainConfig, resume: ResumeRequest, *, overwrite: bool = False,
                 log: Callable[[str], None] = print, config_for_resume: Callable[[dict], TrainConfig] | None = None) -> RunResult:
    """Run (or continue) a Stage-1 training described by ``config`` in ``config.output_dir``.

    ``config_for_resume`` rebuilds the config on top of a checkpoint's stored result fields, so
    flags not given on a resume take the checkpoint's values; see `axs_lib.commands.train`.
    Under ``torchrun`` every rank calls this; rank 0 owns the output directory.
    """
    output_dir = Path(config.output_dir)
    device = _device(config.device)
    world = init_world(device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if not world.is_main:
        log = lambda line: None  # noqa: E731 - rank 0 speaks for the job
    with contextlib.ExitStack() as owned:
        owned.callback(shutdown, world)

        def open_run_dir() -> None:
            run_dir.prepare(output_dir, resume=resume.target is not None, overwrite=overwrite)
            owned.enter_context(run_dir.locked(output_dir))
            if overwrite and resume.target is None:
                run_dir.remove_outputs(output_dir)
            for name in run_dir.remove_stale_temp_files(output_dir):
                log(f"removed {name}, left by a write that was interrupted")

        main_first(open_run_dir, world)
        return _train(config, resume, output_dir, device, world, log, config_for_resume)


def _train(config, resume, output_dir, device, world, log, config_for_resume) -> RunResult:
    # -------------------------------------------------------------------- checkpoint to resume from
    ckpt, ckpt_path = None, None
    if resume.target == "auto":
        found = run_dir.find_resume_checkpoint(output_dir, log)
        if found is None:
            log(f"no valid checkpoint in {output_dir / run_dir.CHECKPOINTS}: starting from step 0")
        else:
            ckpt_path, ckpt = found
    elif resume.target is not None:
        ckpt_path = Path(resume.target)
        ckpt = load_checkpoint(ckpt_path)
    if ckpt is not None and config_for_resume is not None:
        config = config_for_resume(ckpt.get("config", {}))

    # -------------------------------------------------------------------- seeds, flags, data
    seed_info = set_seed(config.seed, deterministic=config.deterministic, benchmark=config.benchmark)
    paths = list_tiles(config.data_dir, config.max_tiles)
    split = make_split(paths, config.seed, config.val_fraction, config.split_source)
    for path in [*split.train, *split.val]:
        read_tile(path)  # every tile checked before anything is written, not when the sampler reaches it
    if config.batch_size * world.size > len(split.train):
        raise UsageError(f"--batch-size {config.batch_size} x {world.size} ranks is larger than the {len(split.train)} training tiles")
    data_fp = data_fingerprint(paths, split.manifest())
    env_fp = environment_fingerprint()
    if ckpt is not None:
        problems = check_resume(ckpt, config, data_fp, world.size, resume.allow_world_size_change)
        if problems and not resume.force:
            raise UsageError(f"{ckpt_path}: cannot resume exactly: " + "; ".join(problems) + " (pass --force-resume to continue anyway)")
        for line in problems:
            log(f"warning: resuming despite a difference: {line}")
        for d in diff_environments(ckpt.get("environment"), env_fp):
            log(f"warning: environment differs from the checkpoint's, bits may differ: {d['key']}: {d['a']!r} -> {d['b']!r}")

    ckpt_dir = output_dir / run_dir.CHECKPOINTS
    metrics_log = run_dir.MetricsLog(output_dir / "metrics.jsonl")
    if world.is_main:
        split.write(output_dir / "split.json")
        run_dir.write_json(output_dir / "environment.json", environment_report(env_fp))
        ckpt_dir.mkdir(exist_ok=True)
    train_set = TileDataset(split.train, config.seed, augment=config.augment, speckle_std=config.speckle_std)
    val_set = TileDataset(split.val, config.seed, augment=False) if split.val else None
    if val_set is None:
        log("warning: no validation tiles: no validation metrics, best.pt or early stopping")

    # -------------------------------------------------------------------- model and optimizer
    seed_globals(derive_seed(config.seed, "init"))
    model = UNet(width=config.width, dropout=config.dropout).to(device)
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps))
    stopper = EarlyStopping(config.patience, config.min_delta, config.es_mode, config.es_metric)
    step, sampler_state, last_metrics = 0, (0, 0), {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state_dict"])
        optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        stopper.load_state_dict(ckpt["early_stopping"])
        step = int(ckpt["step"])
        epoch, position = int(ckpt["sampler_state"]["epoch"]), int(ckpt["sampler_state"]["position"])
        old_size = int(ckpt.get("world_size", 1))
        if old_size != world.size:
            position = reshard(position, old_size, world.size, math.ceil(len(train_set) / world.size))
            log(f"notice: world size {old_size} -> {world.size}: epoch {epoch} continues at position {position} of each rank's shard")
        sampler_state = (epoch, position)
        last_metrics = dict(ckpt.get("metrics") or {})
        log(f"resuming from {ckpt_path} at step {step}")
    sampler = EpochSampler(len(train_set), config.seed, start=sampler_state, rank=world.rank, world_size=world.size)
    events = EventLog(output_dir, step) if world.is_main and config.tensorboard and events_available() else None
    if world.is_main:
        metrics_log.truncate_after(step)  # drop what a killed run logged after its last checkpoint

    def record(entry: dict) -> None:
        metrics_log.append(entry)
        if events is not None:
            events.add(entry)

    run_info = {
        "status": "running", "config": config.to_dict(), "seed": config.seed, "seed_info": seed_info,
        "environment": env_fp, "data_fingerprint": data_fp, "world_size": world.size,
        "paths": {"data_dir": str(Path(config.data_dir).resolve()), "output_dir": str(output_dir.resolve())},
        "resumed_from": {"path": str(ckpt_path), "step": step} if ckpt is not None else None,
        "started_at": _now(), "ended_at": None, "final_step": step, "best": None,
    }

    def save_run_info(**changes) -> None:
        run_info.update(changes)
        if world.is_main:
            run_dir.write_json(output_dir / "run.json", run_info)

    save_run_info()

    def make_checkpoint() -> dict:
        """The full training state; every rank's RNG state included (a collective: all ranks call it)."""
        rank_states = gather(get_seed_state(), world)
        checkpoint = {
            "step": step,
            "epoch": sampler_state[0],
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(),
            "sampler_state": {"epoch": sampler_state[0], "position": sampler_state[1]},
            "early_stopping": stopper.state_dict(),
            "metrics": last_metrics,
            "config": config.result_fields(),
            "environment": env_fp,
            "data_fingerprint": data_fp,
            "world_size": world.size,
            "rank_rng_states": rank_states,
        }
        return add_seed_to_checkpoint(checkpoint, seed_info)

    def write(names: list[str], *, latest: str | None) -> None:
        checkpoint = make_checkpoint()
        main_first(lambda: _write_checkpoints(ckpt_dir, names, checkpoint, latest), world)

    # -------------------------------------------------------------------- loaders
    pin = device.type == "cuda"
    train_iter = iter(make_loader(train_set, sampler, config.batch_size, config.num_workers, config.seed, pin))
    val_loader = make_loader(val_set, None, config.batch_size, config.num_workers, config.seed, pin) if val_set else None

    status, exit_code = "completed", 0
    start_step, started = step, time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc="train", unit="step",
               disable=config.quiet or not world.is_main or not sys.stderr.isatty(), dynamic_ncols=True)
    model.train()
    try:
        with _StopRequest() as stop_request, bar:
            while step < config.steps:
                # ------------------------------------------------ one optimizer step
                seed_globals(derive_seed(config.seed, "step", step, world.rank))
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for _ in range(config.accum_steps):
                    batch = next(train_iter)
                    sar, target, mask = (batch[k].to(device, non_blocking=pin) for k in ("sar", "optical", "mask"))
                    loss = stage1_loss(model(sar), target, mask, config.l1_weight, config.ssim_weight) / config.accum_steps
                    loss.backward()
                    step_loss += loss.item()
                    sampler_state = sampler.state_after(batch)
                average_gradients(parameters, world)
                if config.grad_clip:
                    nn.utils.clip_grad_norm_(parameters, config.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                if world.is_main and (step % config.log_every == 0 or step == config.steps):
                    record({"step": step, "split": "train", "loss": step_loss, "lr": scheduler.get_last_lr()[0]})

                # ------------------------------------------------ validation (every rank: same weights, same result)
                new_best = False
                if val_loader is not None and (step % config.val_every == 0 or step == config.steps):
                    last_metrics = evaluate(model, val_loader, device, config)
                    new_best = stopper.update(last_metrics[config.es_metric], step)
                    if world.is_main:
                        record({"step": step, "split": "val", **last_metrics})
                        line = _metrics_line(step, config.steps, step_loss, last_metrics)
                        bar.write(line) if not bar.disable else log(line)
                        if config.plots:
                            plots.refresh(output_dir, metrics_log.read(), model, val_set, device, step, SAMPLE_TILES)

                # ------------------------------------------------ checkpoint
                early_stop = config.early_stopping and stopper.should_stop
                interrupted = any_rank(stop_request.signum is not None, world)
                due = step % config.checkpoint_every == 0 or step == config.steps or early_stop or interrupted
                names = (["best.pt"] if new_best else []) + ([run_dir.checkpoint_name(step)] if due else [])
                if names:  # best.pt first: a resume from this step's checkpoint would not write it again
                    write(names, latest=names[-1] if due else None)
                if early_stop:
                    status = "early_stopped"
                    log(f"early stopping at step {step}: no {config.es_metric} improvement > {config.min_delta} "
                        f"in {config.patience} validations (best {stopper.best:.6g} at step {stopper.best_step})")
                    break
                if interrupted:
                    status, exit_code = "interrupted", EXIT_INTERRUPTED.get(stop_request.signum, 143)
                    log(f"interrupted at step {step}: checkpoint written; continue with the same command plus --resume auto")
                    break
    except BaseException:
        save_run_info(status="failed", ended_at=_now(), final_step=step)
        raise
    finally:
        del train_iter
        if events is not None:
            events.close()

    elapsed = time.perf_counter() - started
    best = {"metric": config.es_metric, "value": stopper.best, "step": stopper.best_step} if stopper.best is not None else None
    save_run_info(status=status, ended_at=_now(), final_step=step, best=best,
                  steps_per_second=round((step - start_step) / elapsed, 3) if elapsed > 0 else None)
    log(f"{status} at step {step}; checkpoints in {ckpt_dir}" + (f"; plots in {output_dir / 'plots'}" if config.plots and val_set else ""))
    return RunResult(exit_code, step, output_dir, status, best, sorted(p.name for p in ckpt_dir.glob("*.pt")))


def _write_checkpoints(ckpt_dir: Path, names: list[str], checkpoint: dict, latest: str | None) -> None:
    """Write one checkpoint under each of ``names`` (saved once, then linked) and move ``latest``.

    A failed write is one clear error with exit status 1; what was there before stays intact.
    """
    path = ckpt_dir / names[0]
    try:
        save_checkpoint(checkpoint, path)
        for name in names[1:]:
            path = ckpt_dir / name
            atomic_link(ckpt_dir / names[0], path)
        if latest:
            write_latest(ckpt_dir, latest)
    except OSError as exc:
        hint = "free some space, then " if exc.errno == errno.ENOSPC else ""
        raise AxsError(
            f"{path}: cannot write checkpoint: {exc.strerror or exc}; earlier checkpoints and the latest "
            f"pointer are intact; {hint}rerun with --resume auto to continue from the latest one",
            exit_code=EXIT_FAILURE,
        ) from None


def _metrics_line(step: int, total: int, loss: float, metrics: dict[str, float]) -> str:
    return (f"step {step}/{total}  loss {loss:.4f}  val_loss {metrics['val_loss']:.4f}  "
            f"psnr {metrics['psnr']:.2f} dB  ssim {metrics['ssim']:.4f}  sam {metrics['sam']:.2f} deg")
