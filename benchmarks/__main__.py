"""``python -m benchmarks`` (``make bench``): run every benchmark and print its table.

* ``bench_data``: loader tiles/s with 0 and 2 workers; data fingerprint vs plain hashlib.
* ``bench_loader``: NPZ vs packed tiles/s at 0, 2 and 4 workers; trainer start-up (list, split,
  check, fingerprint, first batch), first start vs second, at 1k tiles (and 10k with ``--full``).
* ``bench_compare``: ``axs compare`` vs ``torch.load`` + ``torch.equal`` on two synthetic
  checkpoints of ``--size-mb`` MiB (256 by default here; 1024, its own default, with ``--full``).
* ``bench_checkpoint``: checkpoint write (sync, async stall, format 1) vs a bare ``torch.save``.
* ``bench_train``: the trainer (sync and async checkpoints) vs a plain loop doing the same work
  and vs a bare loop, loop stall per checkpoint, deterministic vs not, start to first step.
* ``bench_toolkit``: SeededDataset + ResumableLoader vs a plain DataLoader (samples/s, 2 workers),
  and bit-identical samples across worker counts and resumes for the guide's, Lightning's and our recipe.
* ``bench_startup``: ``axs`` command start-up against ``python -c pass`` and ``import torch``.
* ``bench_ddp``: the world-size-invariant gradient tree vs a flat all-reduce, steps/s and bytes per
  step, at 2 and 4 CPU ranks (gloo).
* ``bench_portable``: trainer steps/s with ``--portable`` vs the same thread count unpinned and vs
  torch's defaults.
* ``bench_quality``: the Stage-1 U-Net against per-pixel baselines (per-band median, ridge, a
  per-pixel network) on held-out scenes of real tiles, per band (``--quick``: a smoke run).

Every figure is a ratio of two things measured side by side in the same run; see
``benchmarks/README.md``. ``--device cuda`` runs bench_train and bench_checkpoint on the GPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from typing import Callable

BENCHMARKS = ("bench_data", "bench_loader", "bench_compare", "bench_checkpoint", "bench_train", "bench_toolkit",
              "bench_startup", "bench_ddp", "bench_portable", "bench_quality")
# bench_loader's start-up figure: 1k tiles by default, 10k too with --full (its own default; writing
# and fingerprinting 10k files first takes minutes on a 2-core machine)
LOADER_STARTUP = 1_000
LOADER_FULL_STARTUP = 10_000
LOADER_QUICK_TILES = 128  # loader tiles/s over half its default tile count
COMPARE_SIZE_MB = 256
COMPARE_FULL_SIZE_MB = 1024
COMPARE_QUICK_SIZE_MB = 64


def _calls(args: argparse.Namespace) -> dict[str, Callable[[object], dict]]:
    """How to call each module's ``main`` for these options."""
    device = ["--device", args.device] if args.device else []
    loader = ["--startup", str(LOADER_STARTUP)] + (["--startup", str(LOADER_FULL_STARTUP)] if args.full else [])
    loader += ["--loader-tiles", str(LOADER_QUICK_TILES)] if args.quick else []
    size = args.size_mb or (COMPARE_FULL_SIZE_MB if args.full else COMPARE_QUICK_SIZE_MB if args.quick else COMPARE_SIZE_MB)
    return {
        "bench_data": lambda main: main(),
        "bench_compare": lambda main: main(size_mb=size, repeats=1 if args.quick else 3),
        "bench_loader": lambda main: main(loader),
        "bench_train": lambda main: main((["--quick"] if args.quick else []) + device),
        "bench_startup": lambda main: main(repeats=3 if args.quick else 7),
        "bench_checkpoint": lambda main: main((["--quick"] if args.quick else []) + device),
        "bench_toolkit": lambda main: main(),
        "bench_ddp": lambda main: main(["--quick"] if args.quick else []),
        "bench_portable": lambda main: main(["--quick"] if args.quick else []),
        "bench_quality": lambda main: main(["--quick"] if args.quick else []),
    }


def main(argv=None) -> dict[str, dict]:
    """Run the selected benchmarks in order; return ``{name: figures}``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run the ratio benchmarks.")
    parser.add_argument("--full", action="store_true", help=f"bench_compare at {COMPARE_FULL_SIZE_MB} MiB (default {COMPARE_SIZE_MB}), "
                                                            f"bench_loader start-up at {LOADER_FULL_STARTUP} tiles too")
    parser.add_argument("--quick", action="store_true",
                        help=f"short versions: bench_compare at {COMPARE_QUICK_SIZE_MB} MiB once, bench_loader over "
                             f"{LOADER_QUICK_TILES} tiles, --quick of bench_train, bench_checkpoint and bench_quality")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="for bench_train and bench_checkpoint (default: theirs, cuda when available)")
    parser.add_argument("--size-mb", type=int, help="bench_compare checkpoint size in MiB (overrides --full/--quick)")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    calls = _calls(args)
    results: dict[str, dict] = {}
    for name in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            results[name] = calls[name](module.main)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"   FAILED: {results[name]['error'].splitlines()[0]}", flush=True)
        print(f"   ({time.perf_counter() - start:.0f} s)\n", flush=True)
    if failed(results):
        print(f"failed: {', '.join(failed(results))}", flush=True)
    return results


def failed(results: dict[str, dict]) -> list[str]:
    """The benchmarks of a `main` result that raised instead of returning figures."""
    return [name for name, figures in results.items() if isinstance(figures, dict) and "error" in figures]


if __name__ == "__main__":
    sys.exit(1 if failed(main()) else 0)
