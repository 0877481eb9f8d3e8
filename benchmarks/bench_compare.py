"""Checkpoint comparison benchmark: `axs_lib.compare` against the naive way, side by side.

Two synthetic checkpoints of ``size_mb`` (1 GiB by default: many float32 tensors, the second with
one element one ULP away) are written to a temporary directory. Each method then runs in a fresh
subprocess, alternately, ``repeats`` times, with the files in the page cache:

* ours: ``compare_paths(a, b)``: memory-mapped, chunked, pages handed back once compared;
* naive: ``torch.load`` both files, then ``torch.equal`` (or ``==``) over every leaf.

Reported: median wall time of the comparison itself (imports excluded) and peak resident memory
(``VmHWM``) of the process, as ratios ours / naive, plus the peak above the process's resident
size after its imports, which is what the comparison itself added.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from axs_lib.checkpoint import iter_leaves, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
TENSOR_MB = 4  # most tensors are this big; one small bias beside each


def make_pair(directory: Path, size_mb: int) -> tuple[Path, Path]:
    """Write ``a.pt`` and ``b.pt`` of about ``size_mb`` MiB that differ by one ULP in one element."""
    gen = torch.Generator().manual_seed(0)
    n = max(2, size_mb // TENSOR_MB)
    model = {}
    for i in range(n):
        model[f"layers.{i}.weight"] = torch.randn(TENSOR_MB << 18, generator=gen).reshape(-1, 256)
        model[f"layers.{i}.bias"] = torch.randn(256, generator=gen)
    ckpt = {"step": 1000, "epoch": 3, "model_state_dict": model, "config": {"lr": 1e-3}}
    a, b = directory / "a.pt", directory / "b.pt"
    save_checkpoint(ckpt, a)
    model[f"layers.{n // 2}.weight"].view(torch.int32)[7, 42] += 1
    save_checkpoint(ckpt, b)
    return a, b


def naive_compare(a: Path, b: Path) -> bool:
    """What people write: load both whole, then ``torch.equal`` every tensor."""
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    la, lb = dict(iter_leaves(ca)), dict(iter_leaves(cb))
    same = la.keys() == lb.keys()
    for path, x in la.items():
        y = lb.get(path)
        same &= torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
    return same


def ours_compare(a: Path, b: Path) -> bool:
    from axs_lib.compare import compare_paths

    return compare_paths(a, b).match


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _child(method: str, a: str, b: str) -> None:
    """Run one method in this (fresh) process and print its figures as JSON."""
    compare = {"ours": ours_compare, "naive": naive_compare}[method]
    import axs_lib.compare  # noqa: F401 - imports are not part of the measurement

    baseline = _status_kb("VmRSS")
    start = time.perf_counter()
    match = compare(Path(a), Path(b))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_kb": _status_kb("VmHWM"), "baseline_kb": baseline, "match": bool(match)}))


def _run(method: str, a: Path, b: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_compare", "--child", method, str(a), str(b)],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.splitlines()[-1])


def main(size_mb: int = 1024, repeats: int = 3) -> dict:
    """Run the comparison benchmark, print its figures, and return them."""
    with tempfile.TemporaryDirectory(prefix="axs-bench-compare-") as tmp:
        a, b = make_pair(Path(tmp), size_mb)
        file_mb = a.stat().st_size / 2**20
        runs: dict[str, list[dict]] = {"ours": [], "naive": []}
        for _ in range(repeats):
            for method in runs:
                runs[method].append(_run(method, a, b))
    for method, results in runs.items():
        assert not any(r["match"] for r in results), f"{method} missed the one-ULP difference"
    seconds = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    peak = {m: max(r["peak_kb"] for r in rs) / 1024 for m, rs in runs.items()}
    added = {m: max(r["peak_kb"] - r["baseline_kb"] for r in rs) / 1024 for m, rs in runs.items()}
    results = {
        "checkpoint_mib": file_mb,
        "ours_seconds": seconds["ours"],
        "naive_seconds": seconds["naive"],
        "time_ratio_ours_vs_naive": seconds["ours"] / seconds["naive"],
        "ours_peak_rss_mib": peak["ours"],
        "naive_peak_rss_mib": peak["naive"],
        "peak_rss_ratio_ours_vs_naive": peak["ours"] / peak["naive"],
        "ours_added_mib": added["ours"],
        "naive_added_mib": added["naive"],
    }
    print(f"compare: two {file_mb:,.0f} MiB checkpoints, {size_mb // TENSOR_MB * 2} tensors, one element one ULP apart; "
          f"median of {repeats}, page cache warm")
    print(f"  time:     ours {seconds['ours']:7.2f} s   naive {seconds['naive']:7.2f} s   ratio {results['time_ratio_ours_vs_naive']:.2f}x")
    print(f"  peak RSS: ours {peak['ours']:7.0f} MiB naive {peak['naive']:7.0f} MiB ratio {results['peak_rss_ratio_ours_vs_naive']:.2f}x "
          f"(added by the comparison: ours {added['ours']:.0f} MiB, naive {added['naive']:.0f} MiB)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Benchmark axs compare against torch.load + torch.equal.")
    parser.add_argument("--size-mb", type=int, default=1024, help="size of each checkpoint in MiB (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (default 3)")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "A", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
    else:
        main(args.size_mb, args.repeats)
