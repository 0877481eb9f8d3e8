"""Stage-1 trainer benchmark: what exactness costs, as ratios measured side by side in one run.

Four comparisons, each between two things run alternately on the same machine, same tiles, same
thread count, with the median of a few repeats:

* **trainer vs plain loop** (steps/s): ``axs train stage1`` called in-process (checkpoints every
  ``--checkpoint-every`` steps plus the last, validation as configured, ``best.pt``, metrics log,
  per-step reseeding, ``--no-plots --quiet``) against a plain PyTorch loop over the same UNet, the
  same dataset, sampler and loader (so the same batches), the same loss, AdamW, LR schedule and
  gradient clipping, with no checkpoints and no validation. Both count the same steps, and both
  time from the loader's creation to the end of the last step (the trainer's own figure in
  ``run.json``; it includes the final checkpoint write), so warm-up is equal. Both run with the same
  determinism flags (the trainer's default, deterministic). Target: ratio >= 0.95.
* **deterministic vs non-deterministic** (steps/s): the same trainer run with and without
  ``--no-deterministic``. The guide's 10-30 % warning is about cuDNN/cuBLAS on a GPU; on a CPU
  ``torch.use_deterministic_algorithms`` changes few kernels.
* **checkpoint write**: `axs_lib.checkpoint.save_checkpoint` of the trainer's full checkpoint dict
  (read back from the run) against bare ``torch.save`` of the same model and optimizer state to a
  file, both in the same directory. Target: ratio <= 1.2. The time of ours is broken down into its
  stages (weights-only guard, SHA-256 content digest, canonical copy, serialisation, fsync, rename
  and directory fsync), and bare ``torch.save`` + fsync is shown as the durable baseline.
* **resume vs fresh start-up**: wall time from launching ``python -m axs_lib.cli train stage1`` to
  the end of its first optimizer step (seen as the first line in ``metrics.jsonl``, with
  ``--log-every 1``), resuming from the run's first checkpoint (load, checksum, resume checks) vs
  starting fresh. A bare ``python -c 'import axs_lib...'`` is timed too, to show how much of either
  is the interpreter and imports.

Run ``python -m benchmarks.bench_train`` (about 3 minutes on a 2-core CPU) or ``--quick`` (about
30 s). Tiles are synthetic 120 x 120 (``axs_lib.ingest.write_synthetic_tiles``), or the six real
demo tiles with ``--demo-tiles``, written to a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
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

import torch
from torch import nn

from axs_lib import cli
from axs_lib.checkpoint import (
    CHECKSUM_KEY, FORMAT_KEY, FORMAT_VERSION, canonical, content_digest, fsync_dir, load_checkpoint, save_checkpoint,
    unsafe_leaves,
)
from axs_lib.data import TileDataset, make_loader
from axs_lib.ingest import write_demo_tiles, write_synthetic_tiles
from axs_lib.reproducibility import derive_seed, seed_globals, set_seed
from axs_lib.sampling import EpochSampler
from axs_lib.split import make_split
from axs_lib.stage1.config import TrainConfig
from axs_lib.stage1.losses import stage1_loss
from axs_lib.stage1.model import UNet
from axs_lib.stage1.train import lr_factor
from axs_lib.tiles import list_tiles

REPO = Path(__file__).resolve().parent.parent
SEED = 42
TRAINER_TARGET = 0.95  # trainer steps/s over plain-loop steps/s, at least
WRITE_TARGET = 1.2  # save_checkpoint time over bare torch.save time, at most
DEFAULT_WIDTH = TrainConfig().width  # the trainer's default model, for the checkpoint-write figure

PRESETS = {
    "default": dict(tiles=48, tile_size=120, width=4, batch_size=2, steps=100, checkpoint_every=50,
                    repeats=3, startup_repeats=3, write_repeats=15),
    "quick": dict(tiles=16, tile_size=120, width=4, batch_size=2, steps=50, checkpoint_every=25,
                  repeats=1, startup_repeats=1, write_repeats=5),
}


# --------------------------------------------------------------------------- helpers


def _median(values) -> float:
    return statistics.median(list(values))


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


def trainer_argv(s: SimpleNamespace, data_dir: Path, out_dir: Path, *, deterministic: bool = True,
                 steps: int | None = None, width: int | None = None, batch_size: int | None = None,
                 checkpoint_every: int | None = None) -> list[str]:
    """``axs train stage1`` arguments for one run of this benchmark."""
    argv = [
        "train", "stage1", "--data-dir", str(data_dir), "--output-dir", str(out_dir), "--seed", str(SEED),
        "--steps", str(steps or s.steps), "--batch-size", str(batch_size or s.batch_size), "--width", str(width or s.width),
        "--checkpoint-every", str(checkpoint_every or s.checkpoint_every), "--val-every", str(s.val_every),
        "--num-workers", str(s.num_workers), "--device", s.device, "--no-plots", "--quiet",
    ]
    if not deterministic:
        argv.append("--no-deterministic")
    return argv


# --------------------------------------------------------------------------- steps/s


def run_trainer(argv: list[str], out_dir: Path) -> dict:
    """Run the trainer in this process through its command line; return its figures from ``run.json``."""
    captured = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        code = cli.main(argv)
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"axs {' '.join(argv)} exited {code}:\n{captured.getvalue()}")
    info = json.loads((out_dir / "run.json").read_text())
    steps = info["final_step"]
    loop = steps / info["steps_per_second"]
    return {"steps_per_s": info["steps_per_second"], "steps": steps, "loop_s": loop, "outside_loop_s": wall - loop}


def plain_loop(s: SimpleNamespace, data_dir: Path, steps: int, deterministic: bool = True) -> dict:
    """The same training as the trainer with nothing else: no checkpoints, validation, logging or reseeding."""
    cfg = TrainConfig()
    device = torch.device("cuda" if s.device == "auto" and torch.cuda.is_available() else ("cpu" if s.device == "auto" else s.device))
    set_seed(SEED, deterministic=deterministic)  # the same determinism flags as the trainer run it is compared with
    paths = list_tiles(data_dir, None)
    split = make_split(paths, SEED, cfg.val_fraction, cfg.split_source)
    train_set = TileDataset(split.train, SEED, augment=cfg.augment, speckle_std=cfg.speckle_std)
    seed_globals(derive_seed(SEED, "init"))
    model = UNet(width=s.width, dropout=cfg.dropout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, cfg.warmup_steps, steps))
    pin = device.type == "cuda"
    start = time.perf_counter()  # as the trainer's figure: from the loader's creation to the last step
    batches = iter(make_loader(train_set, EpochSampler(len(train_set), SEED), s.batch_size, s.num_workers, SEED, pin))
    model.train()
    for _ in range(steps):
        batch = next(batches)
        sar, target, mask = (batch[k].to(device, non_blocking=pin) for k in ("sar", "optical", "mask"))
        optimizer.zero_grad(set_to_none=True)
        loss = stage1_loss(model(sar), target, mask, cfg.l1_weight, cfg.ssim_weight)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        loss.item()  # any real loop looks at its loss
    seconds = time.perf_counter() - start
    del batches
    return {"steps_per_s": steps / seconds, "steps": steps, "loop_s": seconds}


def measure_throughput(s: SimpleNamespace, data_dir: Path, work: Path) -> dict:
    """Trainer (deterministic), plain loop and trainer (non-deterministic), order rotated per repeat."""
    plain_loop(s, data_dir, min(3, s.steps))  # warm-up: first convolutions, allocator; not measured
    runs: dict[str, list[dict]] = {"trainer": [], "plain": [], "nondet": []}
    for r in range(s.repeats):
        for mode in _rotated(list(runs), r):
            _progress(f"repeat {r + 1}/{s.repeats}: {mode}, {s.steps} steps")
            if mode == "plain":
                runs[mode].append(plain_loop(s, data_dir, s.steps))
            else:
                out = work / f"{mode}_{r}"
                runs[mode].append(run_trainer(trainer_argv(s, data_dir, out, deterministic=mode == "trainer"), out))
    for mode, results in runs.items():
        for result in results:
            if result["steps"] != s.steps:
                raise RuntimeError(f"{mode} ran {result['steps']} steps, not {s.steps}")
    sps = {m: [r["steps_per_s"] for r in rs] for m, rs in runs.items()}
    return {
        "trainer_steps_per_s": _median(sps["trainer"]),
        "plain_steps_per_s": _median(sps["plain"]),
        "nondet_steps_per_s": _median(sps["nondet"]),
        # ratios of the runs made next to each other in the same repeat, then the median
        "trainer_vs_plain": _median(t / p for t, p in zip(sps["trainer"], sps["plain"])),
        "det_vs_nondet": _median(d / n for d, n in zip(sps["trainer"], sps["nondet"])),
        "trainer_outside_loop_s": _median(r["outside_loop_s"] for r in runs["trainer"]),
        "all_steps_per_s": sps,
        "base_run": work / "trainer_0",
    }


# --------------------------------------------------------------------------- checkpoint write


def _timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def _save_in_stages(checkpoint: dict, path: Path) -> dict[str, float]:
    """What `save_checkpoint` does, step by step, each step timed (same calls, same order)."""
    t: dict[str, float] = {}
    unsafe, t["guard (unsafe_leaves)"] = _timed(unsafe_leaves, checkpoint)
    assert not unsafe
    body = {k: v for k, v in checkpoint.items() if k not in (FORMAT_KEY, CHECKSUM_KEY)}
    body[FORMAT_KEY] = FORMAT_VERSION
    body[CHECKSUM_KEY], t["content_digest (SHA-256)"] = _timed(content_digest, body)
    body, t["canonical copy"] = _timed(canonical, body)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        start = time.perf_counter()
        torch.save(body, f)
        f.flush()
        t["torch.save to file"] = time.perf_counter() - start
        _, t["fsync file"] = _timed(os.fsync, f.fileno())
    start = time.perf_counter()
    os.replace(tmp, path)
    fsync_dir(path.parent)
    t["rename + fsync dir"] = time.perf_counter() - start
    return t


def _bare_save(state: dict, path: Path) -> None:
    torch.save(state, path)


def _bare_save_fsync(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def measure_checkpoint_write(checkpoint_file: Path, work: Path, repeats: int) -> dict:
    """``save_checkpoint`` of the trainer's checkpoint dict vs bare ``torch.save`` of model + optimizer."""
    _progress(f"checkpoint writes of {checkpoint_file.name} ({checkpoint_file.parent.parent.name}), {repeats} of each")
    checkpoint = load_checkpoint(checkpoint_file)  # the trainer's full checkpoint dict
    bare_state = {"model_state_dict": checkpoint["model_state_dict"], "optimizer_state_dict": checkpoint["optimizer_state_dict"]}
    work.mkdir(parents=True, exist_ok=True)
    methods = {
        "ours": lambda: save_checkpoint(checkpoint, work / "ours.pt"),
        "bare": lambda: _bare_save(bare_state, work / "bare.pt"),
        "bare_fsync": lambda: _bare_save_fsync(bare_state, work / "bare_fsync.pt"),
        "stages": lambda: _save_in_stages(checkpoint, work / "stages.pt"),
    }
    for fn in methods.values():  # warm-up: first write of each file, page cache, imports
        fn()
    times: dict[str, list[float]] = {m: [] for m in methods}
    stages: list[dict[str, float]] = []
    for r in range(repeats):
        for method in _rotated(list(methods), r):
            value, seconds = _timed(methods[method])
            times[method].append(seconds)
            if method == "stages":
                stages.append(value)
    median = {m: _median(v) for m, v in times.items()}
    return {
        "file_mb": (work / "ours.pt").stat().st_size / 1e6,
        "bare_file_mb": (work / "bare.pt").stat().st_size / 1e6,
        "ours_ms": 1e3 * median["ours"],
        "bare_ms": 1e3 * median["bare"],
        "bare_fsync_ms": 1e3 * median["bare_fsync"],
        "ratio": _median(o / b for o, b in zip(times["ours"], times["bare"])),
        "ratio_vs_bare_fsync": _median(o / b for o, b in zip(times["ours"], times["bare_fsync"])),
        "stages_ms": {k: 1e3 * _median(st[k] for st in stages) for k in stages[0]},
    }


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


def _seconds_to_step(cmd: list[str], metrics: Path, step: int, env: dict, log: Path) -> float:
    """Launch ``cmd``; seconds until ``metrics`` holds the train record of ``step``; then kill it."""
    with open(log, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while not _logged_step(metrics, step):
                if proc.poll() is not None:
                    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} before step {step}:\n{log.read_text()}")
                time.sleep(0.005)
            return time.perf_counter() - start
        finally:
            proc.kill()
            proc.wait()


def measure_startup(s: SimpleNamespace, data_dir: Path, base_run: Path, work: Path, env: dict) -> dict:
    """Process start to end of the first step: resumed from the base run's first checkpoint vs fresh."""
    resume_step = s.checkpoint_every
    source = base_run / "checkpoints" / f"checkpoint_step_{resume_step}.pt"
    if not source.exists() or resume_step >= s.steps:
        raise RuntimeError(f"need a checkpoint before the last step to resume from (steps {s.steps}, every {s.checkpoint_every})")
    python = [sys.executable, "-m", "axs_lib.cli"]
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {"fresh": [], "resume": []} if s.no_import_baseline else {"fresh": [], "resume": [], "imports": []}
    for r in range(s.startup_repeats):
        for mode in _rotated(list(times), r):
            _progress(f"start-up repeat {r + 1}/{s.startup_repeats}: {mode}")
            out = work / f"{mode}_{r}"
            if mode == "imports":
                cmd = [sys.executable, "-c", "import axs_lib.cli, axs_lib.stage1.train, axs_lib.commands.train"]
                start = time.perf_counter()
                subprocess.run(cmd, cwd=REPO, env=env, check=True)
                times[mode].append(time.perf_counter() - start)
                continue
            if mode == "fresh":
                cmd = python + trainer_argv(s, data_dir, out) + ["--log-every", "1"]
                target = 1
            else:
                shutil.copytree(base_run, out, ignore=shutil.ignore_patterns(".lock"))
                # what a killed run leaves: its log may run past the checkpoint; the trainer cuts it
                # back itself, but the poller must not see those lines first
                metrics = out / "metrics.jsonl"
                kept = [l for l in metrics.read_text().splitlines() if json.loads(l).get("step", 0) <= resume_step]
                metrics.write_text("".join(f"{l}\n" for l in kept))
                ckpt = out / "checkpoints" / source.name
                cmd = python + trainer_argv(s, data_dir, out) + ["--log-every", "1", "--resume", str(ckpt)]
                target = resume_step + 1
            times[mode].append(_seconds_to_step(cmd, out / "metrics.jsonl", target, env, work / f"{mode}_{r}.log"))
    return {
        "fresh_s": _median(times["fresh"]),
        "resume_s": _median(times["resume"]),
        "imports_s": _median(times["imports"]) if times.get("imports") else None,
        "ratio": _median(a / b for a, b in zip(times["resume"], times["fresh"])),
        "resume_step": resume_step,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> SimpleNamespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about 30 s: 1 repeat, 50 steps, checkpoint every 25")
    p.add_argument("--demo-tiles", action="store_true", help="the six real BigEarthNet demo tiles instead of synthetic ones")
    p.add_argument("--tiles", type=int, help="synthetic tiles (default 48; quick 16)")
    p.add_argument("--tile-size", type=int, help="synthetic tile side in pixels (default 120)")
    p.add_argument("--width", type=int, help="U-Net base width (default 4: small, so overheads show most)")
    p.add_argument("--batch-size", type=int, help="tiles per batch (default 2)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 100; quick 50)")
    p.add_argument("--checkpoint-every", type=int, help="trainer checkpoint cadence (default 50; quick 25)")
    p.add_argument("--val-every", type=int, help="trainer validation cadence (default: same as --checkpoint-every)")
    p.add_argument("--repeats", type=int, help="runs of each training mode (default 3; quick 1)")
    p.add_argument("--startup-repeats", type=int, help="launches of each start-up mode (default 3; quick 1)")
    p.add_argument("--write-repeats", type=int, help="writes of each checkpoint method (default 15; quick 5)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for both loops (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for everything measured (default 1: on a busy 2-core machine two "
                        "OpenMP threads wait on each other and the noise swamps the ratios)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda, for trainer and plain loop alike")
    p.add_argument("--no-import-baseline", action="store_true", help="do not time python + imports beside the start-ups")
    p.add_argument("--skip-default-width", action="store_true",
                   help=f"skip the checkpoint-write figure at the trainer's default width {DEFAULT_WIDTH}")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "default"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.val_every is None:
        args.val_every = args.checkpoint_every
    if args.quick:
        args.skip_default_width = True
    return SimpleNamespace(**vars(args))


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
            env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "PYTHONPATH": str(REPO)}
            torch.set_num_threads(s.threads)
            data_dir = tmp / "tiles"
            if s.demo_tiles:
                paths = write_demo_tiles(data_dir)
                tiles_desc = f"{len(paths)} real demo tiles"
            else:
                paths = write_synthetic_tiles(data_dir, count=s.tiles, size=s.tile_size, seed=0)
                tiles_desc = f"{len(paths)} synthetic {s.tile_size}x{s.tile_size} tiles"
            split = make_split(paths, SEED, TrainConfig().val_fraction, TrainConfig().split_source)

            tp = measure_throughput(s, data_dir, tmp / "runs")
            base_run = tp.pop("base_run")
            ckpt_file = base_run / "checkpoints" / f"checkpoint_step_{s.steps}.pt"
            write = measure_checkpoint_write(ckpt_file, tmp / "writes", s.write_repeats)
            write_default = None
            if not s.skip_default_width and s.width != DEFAULT_WIDTH:
                out = tmp / "runs" / "default_width"
                run_trainer(trainer_argv(s, data_dir, out, steps=1, width=DEFAULT_WIDTH, checkpoint_every=1), out)
                write_default = measure_checkpoint_write(out / "checkpoints" / "checkpoint_step_1.pt", tmp / "writes16", s.write_repeats)
            startup = measure_startup(s, data_dir, base_run, tmp / "startup", env)
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_det)
        if saved_cache is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = saved_cache
    total = time.perf_counter() - started

    results = {
        "trainer_steps_per_s": tp["trainer_steps_per_s"],
        "plain_steps_per_s": tp["plain_steps_per_s"],
        "trainer_vs_plain_ratio": tp["trainer_vs_plain"],
        "nondet_steps_per_s": tp["nondet_steps_per_s"],
        "det_vs_nondet_ratio": tp["det_vs_nondet"],
        "checkpoint_write_ms": write["ours_ms"],
        "torch_save_ms": write["bare_ms"],
        "torch_save_fsync_ms": write["bare_fsync_ms"],
        "checkpoint_write_ratio": write["ratio"],
        "checkpoint_write_vs_fsync_ratio": write["ratio_vs_bare_fsync"],
        "checkpoint_mb": write["file_mb"],
        "checkpoint_stages_ms": write["stages_ms"],
        "checkpoint_write_default_width": write_default,
        "fresh_startup_s": startup["fresh_s"],
        "resume_startup_s": startup["resume_s"],
        "imports_s": startup["imports_s"],
        "resume_vs_fresh_ratio": startup["ratio"],
        "targets": {"trainer_vs_plain_ratio": TRAINER_TARGET, "checkpoint_write_ratio": WRITE_TARGET},
        "all_steps_per_s": tp["all_steps_per_s"],
        "seconds": total,
    }

    def verdict(ok: bool) -> str:
        return "meets target" if ok else "MISSES target"

    device = "cuda" if s.device == "auto" and torch.cuda.is_available() else ("cpu" if s.device == "auto" else s.device)
    print(f"train: {tiles_desc} ({len(split.train)} train, {len(split.val)} val), UNet width {s.width}, batch {s.batch_size}, "
          f"{s.steps} steps, checkpoint every {s.checkpoint_every}, validation every {s.val_every}, {s.num_workers} workers")
    print(f"  machine: {os.cpu_count()} CPU cores ({_cpu_name()}), device {device}, torch {torch.__version__}, "
          f"{s.threads} threads; load average {load_before} before, {_load()} after; {total:.0f} s in all")
    print(f"  medians of {s.repeats} (order rotated); ratios are medians of the runs made side by side")
    print("  every run (steps/s): " + "; ".join(f"{m} " + ", ".join(f"{v:.2f}" for v in vs) for m, vs in tp["all_steps_per_s"].items()))
    print(f"  trainer vs plain loop:     {tp['trainer_vs_plain']:6.3f}x steps/s  "
          f"(trainer {tp['trainer_steps_per_s']:.2f}, plain {tp['plain_steps_per_s']:.2f} steps/s; target >= {TRAINER_TARGET}: "
          f"{verdict(tp['trainer_vs_plain'] >= TRAINER_TARGET)})")
    print(f"  deterministic vs not:      {tp['det_vs_nondet']:6.3f}x steps/s  "
          f"(deterministic {tp['trainer_steps_per_s']:.2f}, --no-deterministic {tp['nondet_steps_per_s']:.2f} steps/s; "
          f"{device.upper()}: the guide's 10-30% is a GPU figure)")
    for label, w in (("", write), (f" (width {DEFAULT_WIDTH})", write_default)):
        if w is None:
            continue
        print(f"  checkpoint write{label}:{' ' * (10 - len(label))}{w['ratio']:6.2f}x time     "
              f"(save_checkpoint {w['ours_ms']:.1f} ms, torch.save {w['bare_ms']:.1f} ms, {w['file_mb']:.2f} MB; "
              f"target <= {WRITE_TARGET}: {verdict(w['ratio'] <= WRITE_TARGET)}; "
              f"vs torch.save + fsync {w['bare_fsync_ms']:.1f} ms: {w['ratio_vs_bare_fsync']:.2f}x)")
        print("      where save_checkpoint's time goes: " + ", ".join(f"{k} {v:.1f} ms" for k, v in w["stages_ms"].items()))
    print(f"  resume vs fresh start-up:  {startup['ratio']:6.3f}x time     "
          f"(to the end of the first step: resume from step {startup['resume_step']} {startup['resume_s']:.2f} s, "
          f"fresh {startup['fresh_s']:.2f} s; " + (f"python + imports alone {startup['imports_s']:.2f} s; " if startup["imports_s"] else "")
          + f"median of {s.startup_repeats})")
    return results


if __name__ == "__main__":
    main()
