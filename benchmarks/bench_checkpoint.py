"""Checkpoint write cost, as ratios to a bare ``torch.save`` of the same state, measured side by side.

The state is what the Stage-1 trainer saves: `axs_lib.stage1.model.UNet` at width 32 plus its
AdamW state after one step (about 23 MB), on the GPU when there is one. Each repeat runs every
variant once, in turn, so drift in a shared machine's load hits all of them alike; a figure is the
median over repeats of the per-repeat ratio (and the median time in ms).

* ``bare``: ``torch.save(state, path)``, what a plain training script does (not durable).
* ``bare+fsync``: the same through a file object, then flush and fsync: the floor for any write
  that survives a power cut.
* ``sync``: `write_checkpoint_files` with one name and ``latest``: checksum, canonical copy,
  temp file, fsync, rename, directory fsync, ``latest`` the same way. Target <= 1.2x bare.
* ``async stall``: how long `AsyncCheckpointWriter.submit` blocks the caller (the host snapshot;
  the previous write has finished). Target <= 0.3x bare. ``async write`` is the background part.
* ``format 1``: the previous write (SHA-256 content checksum), for comparison.
* ``digest``: the content checksum alone, SHA-256 (format 1) vs XXH3-128 (format 2).

Every round also checks that the async file is byte-identical to the sync one (GPU state included).

``python -m benchmarks.bench_checkpoint [--repeats N] [--dir DIR] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from axs_lib.checkpoint import (
    CHECKSUM_KEY,
    CHECKSUM_KEYS,
    FORMAT_KEY,
    LEGACY_CHECKSUM_KEY,
    atomic_open,
    canonical,
    content_digest,
    write_checkpoint_files,
)
from axs_lib.checkpoint_writer import AsyncCheckpointWriter
from axs_lib.stage1.model import UNet

MIN_REPEATS = 10
TARGETS = {"sync": 1.2, "async stall": 0.3}


def trainer_state(device: torch.device, width: int = 32) -> dict:
    """UNet(width) and AdamW state after one step, as the trainer's checkpoint holds them."""
    torch.manual_seed(0)
    model = UNet(width=width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 2, 64, 64, device=device)).mean().backward()
    optimizer.step()
    return {"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "step": 1, "epoch": 0}


def format_1_save(checkpoint: dict, path: Path) -> None:
    """The write before format 2: SHA-256 over the content, otherwise the same steps."""
    body = {k: v for k, v in checkpoint.items() if k != FORMAT_KEY and k not in CHECKSUM_KEYS}
    body[FORMAT_KEY] = 1
    body[LEGACY_CHECKSUM_KEY] = content_digest(body, LEGACY_CHECKSUM_KEY)
    with atomic_open(path) as f:
        torch.save(canonical(body), f)


def _fsynced_save(checkpoint: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())


def _ms(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11, help=f"rounds (at least {MIN_REPEATS})")
    parser.add_argument("--quick", action="store_true", help=f"{MIN_REPEATS} rounds")
    parser.add_argument("--dir", help="where to write (default: a temp dir; put it on the disk you train on)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where the state lives (default: cuda if available)")
    args = parser.parse_args(argv)
    repeats = MIN_REPEATS if args.quick else max(args.repeats, MIN_REPEATS)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state = trainer_state(device)
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(state))
    work = Path(tempfile.mkdtemp(prefix="axs-bench-ckpt-", dir=args.dir))
    writer = AsyncCheckpointWriter()
    times: dict[str, list[float]] = {k: [] for k in
                                     ("bare", "bare+fsync", "sync", "async stall", "async write", "format 1", "digest sha256", "digest xxh3")}
    host_body = canonical({**state, FORMAT_KEY: 2})  # for the digest lines: tensors in host memory
    try:
        for i in range(repeats + 1):  # round 0 warms caches and allocates the writer's buffers
            row = {
                "bare": _ms(lambda: torch.save(state, work / "bare.pt")),
                "bare+fsync": _ms(lambda: _fsynced_save(state, work / "fsync.pt")),
                "sync": _ms(lambda i=i: write_checkpoint_files(work, [f"checkpoint_step_{i}.pt"], state, latest=f"checkpoint_step_{i}.pt")),
                "format 1": _ms(lambda: format_1_save(state, work / "format1.pt")),
                "digest sha256": _ms(lambda: content_digest(host_body, LEGACY_CHECKSUM_KEY)),
                "digest xxh3": _ms(lambda: content_digest(host_body, CHECKSUM_KEY)),
            }
            start = time.perf_counter()
            row["async stall"] = _ms(lambda i=i: writer.submit(work, [f"async_{i}.pt"], state, latest=f"async_{i}.pt"))
            writer.wait()
            row["async write"] = (time.perf_counter() - start) * 1e3
            same_bytes = _sha(work / f"checkpoint_step_{i}.pt") == _sha(work / f"async_{i}.pt")
            if not same_bytes:
                raise AssertionError(f"async checkpoint differs from the sync one (round {i}, {device})")
            for name in (f"checkpoint_step_{i}.pt", f"async_{i}.pt"):
                (work / name).unlink()
            if i:
                for key, value in row.items():
                    times[key].append(value)
    finally:
        writer.close()
        shutil.rmtree(work, ignore_errors=True)
    ratios = {k: statistics.median(v / b for v, b in zip(times[k], times["bare"])) for k in times}
    medians = {k: statistics.median(v) for k, v in times.items()}
    _print(device, nbytes, repeats, medians, ratios)
    return {"device": str(device), "state_mb": nbytes / 1e6, "repeats": repeats, "median_ms": medians, "ratio_to_bare": ratios}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _print(device, nbytes, repeats, medians, ratios) -> None:
    print(f"   checkpoint write, UNet(width=32) + AdamW, {nbytes / 1e6:.1f} MB on {device}, median of {repeats}")
    for key, ms in medians.items():
        target = f"   (target <= {TARGETS[key]}x)" if key in TARGETS else ""
        print(f"   {key:<14} {ms:8.1f} ms   {ratios[key]:5.2f}x bare torch.save{target}")
    print(f"   digest: XXH3-128 is {medians['digest sha256'] / medians['digest xxh3']:.1f}x faster than SHA-256")


if __name__ == "__main__":
    main()
