"""Stage-1 trainer benchmark: what exactness costs inside a training loop, as side-by-side ratios.

Every contender runs once per repeat, in an order rotated from one repeat to the next, in this
process, on the same tiles, thread count and device; a ratio is taken between the runs of one
repeat and the figure is the median over repeats, printed with its range.

Contenders (steps/s, each timed from the first step to the end of the last, final checkpoint
write included; the trainer's own ``steps_per_second`` from ``run.json``):

* **trainer, sync** and **trainer, async**: ``axs train stage1`` through its command line,
  ``--checkpoint-mode sync`` and ``async``, ``--no-plots --no-tensorboard --quiet`` (optional
  outputs), everything else as a user runs it: per-step reseeding, validation, ``best.pt``,
  ``latest``, metrics log, run manifest.
* **plain loop, same work**: the same UNet and initialisation, the same dataset, sampler and
  loader (so the same batches), loss, AdamW, LR schedule, gradient clipping and precision; the
  loss read at the trainer's log steps; validation (the trainer's own `evaluate`) at the same
  steps; a bare ``torch.save`` of model, optimizer and scheduler state at the same checkpoint
  steps (and of ``best.pt`` where the trainer would write only that). No reseeding, no checksum,
  no fsync, no manifest. Target: trainer >= 0.97x of this, in both checkpoint modes.
* **plain loop, bare**: the same loop with no validation and no checkpoints: the figure earlier
  versions of this benchmark reported, shown for comparison.
* **trainer, --no-deterministic**: the cost of the determinism flags (a cuDNN/cuBLAS matter: about
  1.0 on a CPU, the guide's 10-30 % is a GPU figure).
* **trainer, bf16-mixed** (on CUDA, or with ``--bf16``): ``--precision bf16-mixed`` vs 32.

Beside the wall-time ratios, trainer vs plain loop is also given in steps per CPU-second of this
process (``time.process_time`` over the same span): on a shared machine other processes' load
moves wall time far more than CPU time, but CPU time does not see fsync waits or loader workers.

Loop stall per checkpoint: how long the trainer's loop is blocked in `CheckpointManager.save`
(timed around each call), as a ratio to the plain loop's bare ``torch.save`` at the same steps of
the same repeat. Async (the host snapshot; the write runs in the background): target <= 0.3x.
Sync (the whole durable write): target <= 1.2x. The write alone, outside a loop, is
``benchmarks.bench_checkpoint``'s figure.

Start to first step: wall time from launching ``python -m axs_lib.cli train stage1`` on 6 tiles
(synthetic 120 x 120, or the six real BigEarthNet demo tiles with ``--startup-tiles demo``; the
tile content does not change the figure) to its first train record in ``metrics.jsonl``
(``--log-every 1``): interpreter, imports, input checks, data fingerprint, setup and one step,
each launch a fresh run directory (the data-fingerprint cache is warm after the first launch).
Target < 3 s on a CPU. ``python -c "import ..."`` of the same modules is timed beside it.

``python -m benchmarks.bench_train`` (about 2 minutes on a 2-core CPU), ``--quick`` (about 40 s),
``--device cuda`` (larger model, batch and worker count; see ``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from axs_lib import cli
from axs_lib.data import TileDataset, validation_loader
from axs_lib.ingest import write_demo_tiles, write_synthetic_tiles
from axs_lib.loader import ResumableLoader
from axs_lib.reproducibility import derive_seed, seed_globals, set_seed
from axs_lib.run_dir import BEST, METRICS, RUN_JSON, CheckpointManager
from axs_lib.sampling import ResumableSampler
from axs_lib.split import leave_out_flagged, make_split
from axs_lib.stage1.config import TrainConfig, resolve_auto_schedule
from axs_lib.stage1.losses import stage1_loss
from axs_lib.stage1.model import UNet, band_means, band_stats
from axs_lib.stage1.train import evaluate, lr_factor
from axs_lib.tiles import list_tiles
from axs_lib.workers import ignore_stop_signals, shutdown_workers

REPO = Path(__file__).resolve().parent.parent
SEED = 42
STARTUP_TILES = 6
TARGETS = {  # (comparison, bound): ratio >= bound for speed, <= bound for time
    "trainer_sync_vs_plain": (">=", 0.97),
    "trainer_async_vs_plain": (">=", 0.97),
    "async_stall_vs_torch_save": ("<=", 0.3),
    "sync_stall_vs_torch_save": ("<=", 1.2),
    "startup_s": ("<", 3.0),
}

PRESETS = {
    "default": dict(tiles=48, tile_size=120, width=4, batch_size=2, steps=100, checkpoint_every=50,
                    repeats=3, startup_repeats=3, num_workers=0, threads=1),
    "quick": dict(tiles=16, tile_size=120, width=4, batch_size=2, steps=40, checkpoint_every=20,
                  repeats=1, startup_repeats=2, num_workers=0, threads=1),
    # a GPU step of the tiny CPU model is all kernel launches: the trainer's default width, a
    # bigger batch, and workers so that tile decoding does not set the pace
    "cuda": dict(tiles=64, tile_size=120, width=16, batch_size=8, steps=200, checkpoint_every=50,
                 repeats=3, startup_repeats=3, num_workers=4, threads=4),
}

LABELS = {
    "trainer_sync": "trainer, sync checkpoints",
    "trainer_async": "trainer, async checkpoints",
    "plain_same": "plain loop, same work",
    "plain_bare": "plain loop, bare (no val/ckpt)",
    "trainer_nondet": "trainer, --no-deterministic",
    "trainer_bf16": "trainer, bf16-mixed (sync)",
    "plain_same_bf16": "plain loop, same work, bf16",
}


# --------------------------------------------------------------------------- helpers


def _median(values) -> float:
    return statistics.median(list(values))


def _spread(values) -> dict:
    """Median and range of a list of figures."""
    values = list(values)
    return {"median": _median(values), "min": min(values), "max": max(values), "n": len(values)}


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load() -> str:
    with contextlib.suppress(OSError, AttributeError):
        return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    return "n/a"


def _progress(message: str) -> None:
    """A line on stderr while the benchmark runs (the table goes to stdout at the end)."""
    print(f"  [bench_train] {message}", file=sys.stderr, flush=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def trainer_argv(s: SimpleNamespace, data_dir: Path, out_dir: Path, *, mode: str = "sync", deterministic: bool = True,
                 precision: str = "32") -> list[str]:
    """``axs train stage1`` arguments for one trainer run of this benchmark."""
    argv = [
        "train", "stage1", "--data-dir", str(data_dir), "--output-dir", str(out_dir), "--seed", str(SEED),
        "--steps", str(s.steps), "--batch-size", str(s.batch_size), "--width", str(s.width),
        "--checkpoint-every", str(s.checkpoint_every), "--val-every", str(s.val_every), "--checkpoint-mode", mode,
        "--precision", precision, "--num-workers", str(s.num_workers), "--device", s.device,
        "--no-plots", "--no-tensorboard", "--quiet",
    ]
    if not deterministic:
        argv.append("--no-deterministic")
    return argv


# --------------------------------------------------------------------------- the two loops


class SaveTimer:
    """What the trainer's loop spends, seen only through the public toolkit the trainer is built on:

    * every `CheckpointManager.save` call: how long the loop is blocked by it;
    * inside each, the manager's ``on_write`` hook (the trainer's run-manifest update before the
      write, ``run.json``, written atomically) and an async writer's wait for the previous write
      (`AsyncCheckpointWriter.wait`);
    * the loop's span in process CPU time: from the first batch the trainer asks of
      `ResumableLoader.endless` to that iterator's close, which ends the trainer's loop.

    Nothing private to the trainer is patched, so a refactored trainer is measured the same way,
    and one that stops drawing its batches through ``endless`` is reported rather than measured
    as nothing (`loop_cpu_seconds`).
    """

    def __init__(self):
        self.calls: list[dict[str, float]] = []
        self._current: dict[str, float] | None = None
        self.cpu_marks: list[float] = []  # process CPU time at the loop's first batch request and at its end

    def _timed(self, original, part: str | None):
        @functools.wraps(original)
        def timed(*args, **kwargs):
            outer = part is None and self._current is None
            if outer:
                self._current = {"save": 0.0, "manifest": 0.0, "wait": 0.0}
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                if outer:
                    self._current["save"] = seconds
                    self.calls.append(self._current)
                    self._current = None
                elif part is not None and self._current is not None:
                    self._current[part] += seconds

        timed.bench_timed = True
        return timed

    def _save(self, original):
        timed = self._timed(original, None)

        @functools.wraps(original)
        def save(manager, *args, **kwargs):
            hook = manager.on_write  # the manifest hook the trainer gave its manager (public attribute)
            if hook is not None and not getattr(hook, "bench_timed", False):
                manager.on_write = self._timed(hook, "manifest")
            return timed(manager, *args, **kwargs)

        return save

    def _endless(self, original):
        marks = self.cpu_marks

        @functools.wraps(original)
        def endless(loader, *args, **kwargs):
            def marked():
                marks.append(time.process_time())  # runs at the first batch request: the loop's first step
                try:
                    yield from original(loader, *args, **kwargs)
                finally:
                    marks.append(time.process_time())  # the trainer closes its batches when its loop ends
            return marked()

        return endless

    def loop_cpu_seconds(self) -> float:
        if len(self.cpu_marks) != 2:
            raise RuntimeError(f"the trainer drew its batches through ResumableLoader.endless {len(self.cpu_marks) // 2} "
                               "times, not once: this benchmark no longer sees where its loop starts and ends")
        return self.cpu_marks[1] - self.cpu_marks[0]

    @contextlib.contextmanager
    def patched(self):
        from axs_lib.checkpoint_writer import AsyncCheckpointWriter

        wrappers = [(CheckpointManager, "save", self._save), (AsyncCheckpointWriter, "wait", lambda f: self._timed(f, "wait")),
                    (ResumableLoader, "endless", self._endless)]
        originals = []
        try:
            for owner, name, wrap in wrappers:
                original = getattr(owner, name)
                originals.append((owner, name, original))
                setattr(owner, name, wrap(original))
            yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


def run_trainer(argv: list[str], out_dir: Path) -> dict:
    """Run the trainer in this process through its command line; its figures from ``run.json``."""
    captured = io.StringIO()
    timer = SaveTimer()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), timer.patched():
        code = cli.main(argv)
    if code != 0:
        raise RuntimeError(f"axs {' '.join(argv)} exited {code}:\n{captured.getvalue()}")
    info = json.loads((out_dir / RUN_JSON).read_text())
    return {"steps_per_s": info["steps_per_second"], "steps": info["final_step"], "cpu_s": timer.loop_cpu_seconds(),
            "saves_s": [c["save"] for c in timer.calls], "save_parts": timer.calls}


def plain_loop(s: SimpleNamespace, data_dir: Path, out_dir: Path, *, same_work: bool, precision: str = "32",
               deterministic: bool = True) -> dict:
    """The trainer's training with nothing of ours: optionally its validation and a bare torch.save."""
    cfg = TrainConfig(steps=s.steps)
    device = _device(s.device)
    pin = device.type == "cuda"
    set_seed(SEED, deterministic=deterministic)  # the determinism flags of the trainer run it is compared with
    split = make_split(list_tiles(data_dir, None), cfg.split_seed, cfg.val_fraction, cfg.split_source)
    split = leave_out_flagged(split) if cfg.clear_sky else split
    cfg = resolve_auto_schedule(cfg, len(split.train))  # the trainer's warm-up for these steps
    train_set = TileDataset(split.train, SEED, augment=cfg.augment, speckle_std=cfg.speckle_std)
    val_set = TileDataset(split.val, SEED, augment=False) if split.val and same_work else None
    seed_globals(derive_seed(SEED, "init"))
    if cfg.head == "linear":
        model = UNet(width=s.width, dropout=cfg.dropout, head="linear", target_stats=band_stats(train_set)).to(device)
    else:
        model = UNet(width=s.width, dropout=cfg.dropout, head="sigmoid", output_bias=band_means(train_set)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, warmup=cfg.warmup_steps, total=s.steps))
    autocast = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    loader = ResumableLoader(train_set, s.batch_size, seed=SEED, sampler=ResumableSampler(len(train_set), SEED),
                             num_workers=s.num_workers, pin_memory=pin, worker_init_fn=ignore_stop_signals)
    batches = loader.endless()
    val_loader = validation_loader(val_set, s.batch_size, s.num_workers, SEED, pin) if val_set is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    saves: list[float] = []
    best = float("inf")

    def save(name: str, step: int) -> None:
        state = {"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                 "scheduler_state_dict": scheduler.state_dict(), "step": step}
        start = time.perf_counter()
        torch.save(state, out_dir / name)
        saves.append(time.perf_counter() - start)

    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        for step in range(1, s.steps + 1):
            batch = next(batches)
            sar, target, mask = (batch[k].to(device, non_blocking=pin) for k in ("sar", "optical", "mask"))
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                pred = model(sar)
            loss = stage1_loss(pred.float(), target, mask, cfg.l1_weight, cfg.ssim_weight, model.band_scale)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            last = step == s.steps
            if step % cfg.log_every == 0 or last:
                loss.item()  # the trainer reads its loss at its log steps
            if not same_work:
                continue
            new_best = False
            if val_loader is not None and (step % s.val_every == 0 or last):
                val_loss = evaluate(model, val_loader, device, cfg, autocast)["val_loss"]
                new_best, best = val_loss < best, min(best, val_loss)
            if step % s.checkpoint_every == 0 or last:
                save(f"step_{step}.pt", step)
            elif new_best:
                save(BEST, step)
    finally:
        batches.close()
        loader.close()
        shutdown_workers(val_loader)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"steps_per_s": s.steps / seconds, "steps": s.steps, "cpu_s": cpu, "saves_s": saves}


def contenders(s: SimpleNamespace, data_dir: Path, work: Path) -> dict[str, Callable[[int], dict]]:
    """Each contender as ``run(repeat) -> figures``."""

    def trainer(name: str, **kwargs) -> Callable[[int], dict]:
        def run(r: int) -> dict:
            out = work / f"{name}_{r}"
            return run_trainer(trainer_argv(s, data_dir, out, **kwargs), out)
        return run

    def plain(name: str, **kwargs) -> Callable[[int], dict]:
        return lambda r: plain_loop(s, data_dir, work / f"{name}_{r}", **kwargs)

    runs = {
        "trainer_sync": trainer("trainer_sync", mode="sync"),
        "trainer_async": trainer("trainer_async", mode="async"),
        "plain_same": plain("plain_same", same_work=True),
        "plain_bare": plain("plain_bare", same_work=False),
        "trainer_nondet": trainer("trainer_nondet", mode="sync", deterministic=False),
    }
    if s.bf16:
        runs["trainer_bf16"] = trainer("trainer_bf16", mode="sync", precision="bf16-mixed")
        runs["plain_same_bf16"] = plain("plain_same_bf16", same_work=True, precision="bf16-mixed")
    return runs


def measure_loops(s: SimpleNamespace, data_dir: Path, work: Path) -> dict:
    """Every contender once per repeat, order rotated; steps/s, per-repeat ratios and checkpoint stalls."""
    warm = SimpleNamespace(**{**vars(s), "steps": 3})
    for precision in ("32", "bf16-mixed") if s.bf16 else ("32",):  # first kernels, allocator: not measured
        plain_loop(warm, data_dir, work / "warmup", same_work=True, precision=precision)
    runs = contenders(s, data_dir, work)
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(s.repeats):
        for name in _rotated(list(runs), r):
            _progress(f"repeat {r + 1}/{s.repeats}: {LABELS[name]}, {s.steps} steps")
            result = runs[name](r)
            if result["steps"] != s.steps:
                raise RuntimeError(f"{name} ran {result['steps']} steps, not {s.steps}")
            results[name].append(result)
            with contextlib.suppress(FileNotFoundError):  # keep the disk use of a run to one run
                shutil.rmtree(work / f"{name}_{r}")
    for name in ("trainer_sync", "trainer_async"):
        got, want = [len(x["saves_s"]) for x in results[name]], [len(x["saves_s"]) for x in results["plain_same"]]
        if got != want:
            raise RuntimeError(f"{name} wrote checkpoints {got} times per run, the plain loop {want}: not the same work")

    sps = {name: [x["steps_per_s"] for x in rs] for name, rs in results.items()}

    def ratio(a: str, b: str) -> dict:
        return _spread(x / y for x, y in zip(sps[a], sps[b]))

    def cpu_ratio(a: str, b: str) -> dict:
        """Steps per CPU-second of ``a`` over ``b``: steadier than wall time on a shared machine,
        blind to I/O waits (fsync) and to work done in other processes (loader workers)."""
        return _spread(y["cpu_s"] / x["cpu_s"] for x, y in zip(results[a], results[b]))

    def stall(mode: str) -> dict:
        return _spread(_median(t["saves_s"]) / _median(p["saves_s"])
                       for t, p in zip(results[f"trainer_{mode}"], results["plain_same"]))

    ratios = {
        "trainer_sync_vs_plain": ratio("trainer_sync", "plain_same"),
        "trainer_async_vs_plain": ratio("trainer_async", "plain_same"),
        "trainer_sync_vs_bare_loop": ratio("trainer_sync", "plain_bare"),
        "plain_same_vs_bare_loop": ratio("plain_same", "plain_bare"),
        "det_vs_nondet": ratio("trainer_sync", "trainer_nondet"),
        "cpu_trainer_sync_vs_plain": cpu_ratio("trainer_sync", "plain_same"),
        "cpu_trainer_async_vs_plain": cpu_ratio("trainer_async", "plain_same"),
        "async_stall_vs_torch_save": stall("async"),
        "sync_stall_vs_torch_save": stall("sync"),
    }
    if s.bf16:
        ratios["trainer_bf16_vs_32"] = ratio("trainer_bf16", "trainer_sync")
        ratios["trainer_bf16_vs_plain_bf16"] = ratio("trainer_bf16", "plain_same_bf16")
    save_ms = {name: 1e3 * _median(t for x in results[name] for t in x["saves_s"])
               for name in ("trainer_sync", "trainer_async", "plain_same")}
    parts_ms = {mode: {part: 1e3 * _median(c[part] for x in results[f"trainer_{mode}"] for c in x["save_parts"])
                       for part in ("manifest", "wait")} for mode in ("sync", "async")}
    # where a trainer run's extra time goes: its saves beyond the plain loop's torch.save, the rest
    gaps_ms = {}
    for mode in ("sync", "async"):
        pairs = list(zip(results[f"trainer_{mode}"], results["plain_same"]))
        gaps_ms[mode] = {
            "run": 1e3 * _median(s.steps / t["steps_per_s"] - s.steps / p["steps_per_s"] for t, p in pairs),
            "saves": 1e3 * _median(sum(t["saves_s"]) - sum(p["saves_s"]) for t, p in pairs),
        }
    return {"steps_per_s": {name: _spread(v) for name, v in sps.items()}, "ratios": ratios, "save_ms": save_ms,
            "gaps_ms": gaps_ms,
            "save_parts_ms": parts_ms, "saves_per_run": len(results["plain_same"][0]["saves_s"])}


# --------------------------------------------------------------------------- start-up


def _logged_step(metrics: Path, step: int) -> bool:
    try:
        text = metrics.read_text()
    except FileNotFoundError:
        return False
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if record.get("split") == "train" and record.get("step") == step:
                return True
    return False


def _seconds_to_step(cmd: list[str], metrics: Path, env: dict, log: Path) -> float:
    """Launch ``cmd``; seconds until ``metrics`` holds the train record of step 1; then stop it."""
    with open(log, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while not _logged_step(metrics, 1):
                if proc.poll() is not None:
                    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} before its first step:\n{log.read_text()}")
                time.sleep(0.005)
            return time.perf_counter() - start
        finally:
            proc.kill()
            proc.wait()


def startup_tiles(data_dir: Path, kind: str) -> str:
    """Write the 6 tiles of the start-up figure; say which they are."""
    if kind == "demo":  # unpacking the wheel's archives takes longer than the figure itself
        write_demo_tiles(data_dir)
        return f"{STARTUP_TILES} real BigEarthNet demo tiles"
    write_synthetic_tiles(data_dir, count=STARTUP_TILES, size=120, seed=0)
    return f"{STARTUP_TILES} synthetic 120x120 tiles"


def measure_startup(s: SimpleNamespace, data_dir: Path, work: Path, env: dict) -> dict:
    """Process start to the end of the first step of a fresh run, beside python + the same imports."""
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {"trainer": []} if s.no_import_baseline else {"trainer": [], "imports": []}
    imports = [sys.executable, "-c", "import axs_lib.cli, axs_lib.commands.train, axs_lib.stage1.train"]
    for r in range(s.startup_repeats):
        for mode in _rotated(list(times), r):
            _progress(f"start-up {r + 1}/{s.startup_repeats}: {mode}")
            if mode == "imports":
                start = time.perf_counter()
                subprocess.run(imports, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
                times[mode].append(time.perf_counter() - start)
                continue
            out = work / f"run_{r}"
            cmd = [sys.executable, "-m", "axs_lib.cli", "train", "stage1", "--data-dir", str(data_dir), "--output-dir", str(out),
                   "--seed", str(SEED), "--steps", "2", "--batch-size", "2", "--log-every", "1", "--device", s.device,
                   "--no-plots", "--no-tensorboard", "--quiet"]
            times[mode].append(_seconds_to_step(cmd, out / METRICS, env, work / f"run_{r}.log"))
    return {"startup_s": _spread(times["trainer"]), "imports_s": _spread(times["imports"]) if "imports" in times else None}


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> SimpleNamespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repeat of 40 steps, 2 start-ups (about 40 s on a CPU)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda, for every contender; cuda picks "
                                                    "the 'cuda' preset (width 16, batch 8, 200 steps, 4 workers, 4 threads)")
    p.add_argument("--demo-tiles", action="store_true", help="train on the six real demo tiles instead of synthetic ones")
    p.add_argument("--tiles", type=int, help="synthetic tiles (default 48; quick 16; cuda 64)")
    p.add_argument("--tile-size", type=int, help="synthetic tile side in pixels (default 120)")
    p.add_argument("--width", type=int, help="U-Net base width (default 4: small, so overheads show most; cuda 16)")
    p.add_argument("--batch-size", type=int, help="tiles per batch (default 2; cuda 8)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 100; quick 40; cuda 200)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint cadence (default 50, the trainer's; quick 20; cuda 50)")
    p.add_argument("--val-every", type=int, help="validation cadence (default: same as --checkpoint-every)")
    p.add_argument("--repeats", type=int, help="runs of each contender (default 3; quick 1)")
    p.add_argument("--startup-repeats", type=int, help="launches for the start-up figure (default 3; quick 2)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers, every contender (default 0; cuda 4)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default 1: on a busy 2-core machine two OpenMP threads wait on "
                        "each other and the noise swamps the ratios; cuda 4)")
    p.add_argument("--bf16", action="store_true", help="also the bf16-mixed contenders (always on CUDA)")
    p.add_argument("--startup-tiles", choices=("synthetic", "demo"), default="synthetic",
                   help="the 6 tiles of the start-up figure: synthetic 120x120 (default) or the real demo tiles "
                        "(needs the data extra; unpacking them takes longer than the measurement)")
    p.add_argument("--skip-startup", action="store_true", help="no start-up figure")
    p.add_argument("--no-import-baseline", action="store_true", help="do not time python + imports beside the start-up")
    args = p.parse_args(argv)
    device = _device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    preset = PRESETS["quick" if args.quick else "cuda" if device.type == "cuda" else "default"]
    if args.quick and device.type == "cuda":
        preset = {**PRESETS["cuda"], "repeats": 1, "startup_repeats": 2, "steps": 100}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.val_every is None:
        args.val_every = args.checkpoint_every
    args.bf16 = args.bf16 or device.type == "cuda"
    args.device = device.type if args.device == "auto" else args.device
    return SimpleNamespace(**vars(args))


def _verdict(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    op, bound = TARGETS[key]
    ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
    return f"target {op} {bound:g}: {'meets' if ok else 'MISSES'}"


def _fmt(spread: dict, unit: str = "", digits: int = 3) -> str:
    return (f"{spread['median']:.{digits}f}{unit} [{spread['min']:.{digits}f}-{spread['max']:.{digits}f}]")


def report(s: SimpleNamespace, tiles_desc: str, split, loops: dict, startup: dict | None, total: float, load_before: str) -> None:
    """Print the table."""
    device = torch.device(s.device)
    where = f"{device.type} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    print(f"train: {tiles_desc} ({len(split.train)} train, {len(split.val)} val), UNet width {s.width}, batch {s.batch_size}, "
          f"{s.steps} steps, checkpoint every {s.checkpoint_every}, validation every {s.val_every}, {s.num_workers} workers")
    print(f"  machine: {os.cpu_count()} CPU cores ({_cpu_name()}), device {where}, torch {torch.__version__}, "
          f"{s.threads} threads; load average {load_before} before, {_load()} after; {total:.0f} s in all")
    print(f"  steps/s, median [min-max] of {s.repeats} runs each, order rotated per repeat:")
    for name, spread in loops["steps_per_s"].items():
        print(f"    {LABELS[name]:<34} {_fmt(spread, digits=2)}")
    print("  ratios, median [min-max] of the per-repeat ratios:")
    rows = [
        ("trainer_sync_vs_plain", "trainer (sync) vs plain loop, same work", "steps/s"),
        ("trainer_async_vs_plain", "trainer (async) vs plain loop, same work", "steps/s"),
        ("trainer_sync_vs_bare_loop", "trainer (sync) vs bare plain loop", "steps/s, the earlier kind of figure"),
        ("plain_same_vs_bare_loop", "plain loop, same work vs bare", "steps/s: what validation + torch.save cost"),
        ("det_vs_nondet", "deterministic vs not (trainer)", "steps/s" + ("" if device.type == "cuda" else
                                                                         ", CPU: the guide's 10-30% is a GPU figure")),
        ("cpu_trainer_sync_vs_plain", "trainer (sync) vs plain, same work", "steps per CPU-second of this process: "
         "steadier on a busy machine, blind to fsync waits and loader workers"),
        ("cpu_trainer_async_vs_plain", "trainer (async) vs plain, same work", "steps per CPU-second, likewise"),
        ("trainer_bf16_vs_32", "trainer bf16-mixed vs 32", "steps/s"),
        ("trainer_bf16_vs_plain_bf16", "trainer vs plain loop, both bf16", "steps/s"),
    ]
    for key, label, unit in rows:
        if key in loops["ratios"]:
            verdict = _verdict(key, loops["ratios"][key]["median"])
            print(f"    {label:<42} {_fmt(loops['ratios'][key])}x  ({unit}{'; ' + verdict if verdict else ''})")
    for mode in ("sync", "async"):
        gap = loops["gaps_ms"][mode]
        print(f"    trainer ({mode}) run minus plain loop run: {gap['run']:.0f} ms per {s.steps} steps, of which "
              f"{gap['saves']:.0f} ms in checkpoint saves beyond the plain loop's torch.save (medians)")
    ms = loops["save_ms"]
    print(f"  loop stall per checkpoint ({loops['saves_per_run']} per run), median of the per-repeat ratios to the plain "
          f"loop's bare torch.save ({ms['plain_same']:.1f} ms):")
    for mode, what in (("async", "snapshot; written in the background"), ("sync", "the whole durable write")):
        key, parts = f"{mode}_stall_vs_torch_save", loops["save_parts_ms"][mode]
        print(f"    {mode:<5} CheckpointManager.save {ms['trainer_' + mode]:7.1f} ms  {_fmt(loops['ratios'][key])}x  "
              f"({what}; {_verdict(key, loops['ratios'][key]['median'])})")
        print(f"          of which the run manifest (run.json) before the write {parts['manifest']:.1f} ms"
              + (f", waiting for the previous write {parts['wait']:.1f} ms" if mode == "async" else ""))
    if startup is not None:
        print(f"  start to first step, {startup['tiles']}, subprocess, median [min-max] of {s.startup_repeats}: "
              f"{_fmt(startup['startup_s'], ' s', 2)}  ({_verdict('startup_s', startup['startup_s']['median'])}"
              f"{'' if device.type == 'cpu' else ' (a CPU target)'}"
              + (f"; python + the same imports alone {_fmt(startup['imports_s'], ' s', 2)}" if startup["imports_s"] else "")
              + ")")


def main(argv=None) -> dict:
    """Run the trainer benchmarks, print a table of ratios and figures, and return them."""
    s = parse_args(argv)
    saved_threads, saved_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    saved_cache = os.environ.get("XDG_CACHE_HOME")
    load_before = _load()
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="axs-bench-train-") as tmp:
            tmp = Path(tmp)
            os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")  # keep the data-fingerprint cache out of ~/.cache
            pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
            env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "PYTHONPATH": pythonpath}
            torch.set_num_threads(s.threads)
            data_dir = tmp / "tiles"
            if s.demo_tiles:
                paths = write_demo_tiles(data_dir)
                tiles_desc = f"{len(paths)} real demo tiles"
            else:
                paths = write_synthetic_tiles(data_dir, count=s.tiles, size=s.tile_size, seed=0)
                tiles_desc = f"{len(paths)} synthetic {s.tile_size}x{s.tile_size} tiles"
            split = make_split(paths, TrainConfig().split_seed, TrainConfig().val_fraction, TrainConfig().split_source)
            loops = measure_loops(s, data_dir, tmp / "runs")
            startup = None
            if not s.skip_startup:
                small = tmp / "tiles6"
                desc = startup_tiles(small, s.startup_tiles)
                startup = {**measure_startup(s, small, tmp / "startup", env), "tiles": desc}
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_det)
        if saved_cache is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = saved_cache
    total = time.perf_counter() - started
    report(s, tiles_desc, split, loops, startup, total, load_before)
    ratios = loops["ratios"]
    results = {
        "steps_per_s": {name: v["median"] for name, v in loops["steps_per_s"].items()},
        "steps_per_s_spread": loops["steps_per_s"],
        "ratios": ratios,
        "trainer_sync_vs_plain_ratio": ratios["trainer_sync_vs_plain"]["median"],
        "trainer_async_vs_plain_ratio": ratios["trainer_async_vs_plain"]["median"],
        "trainer_vs_bare_loop_ratio": ratios["trainer_sync_vs_bare_loop"]["median"],
        "det_vs_nondet_ratio": ratios["det_vs_nondet"]["median"],
        "cpu_trainer_sync_vs_plain_ratio": ratios["cpu_trainer_sync_vs_plain"]["median"],
        "cpu_trainer_async_vs_plain_ratio": ratios["cpu_trainer_async_vs_plain"]["median"],
        "bf16_vs_32_ratio": ratios["trainer_bf16_vs_32"]["median"] if "trainer_bf16_vs_32" in ratios else None,
        "async_stall_ratio": ratios["async_stall_vs_torch_save"]["median"],
        "sync_stall_ratio": ratios["sync_stall_vs_torch_save"]["median"],
        "save_ms": loops["save_ms"],
        "startup_s": startup["startup_s"]["median"] if startup else None,
        "imports_s": startup["imports_s"]["median"] if startup and startup["imports_s"] else None,
        "save_parts_ms": loops["save_parts_ms"],
        "gaps_ms": loops["gaps_ms"],
        "targets": {k: f"{op} {bound:g}" for k, (op, bound) in TARGETS.items()},
        "device": s.device,
        "seconds": total,
    }
    return results


if __name__ == "__main__":
    main()
