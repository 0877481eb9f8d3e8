"""``python -m benchmarks`` (``make bench``): run every benchmark and print its table.

* ``bench_data``: loader tiles/s with 0 and 2 workers; data fingerprint vs plain hashlib.
* ``bench_compare``: ``axs compare`` vs ``torch.load`` + ``torch.equal`` on two synthetic
  checkpoints of ``--size-mb`` MiB (256 by default here; 1024, its own default, with ``--full``).
* ``bench_train``: trainer vs plain PyTorch loop, deterministic vs not, checkpoint write vs
  ``torch.save``, resume vs fresh start-up (``--quick`` for its 30-second version).
* ``bench_toolkit``: SeededDataset + ResumableLoader vs a plain DataLoader (samples/s, 2 workers),
  and bit-identical samples across worker counts and resumes for the guide's, Lightning's and our recipe.

Every figure is a ratio of two things measured side by side in the same run; see
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import importlib
import time
from typing import Callable

BENCHMARKS = ("bench_data", "bench_compare", "bench_train", "bench_toolkit", "bench_checkpoint")
COMPARE_SIZE_MB = 256
COMPARE_FULL_SIZE_MB = 1024
COMPARE_QUICK_SIZE_MB = 64


def _calls(args: argparse.Namespace) -> dict[str, Callable[[object], dict]]:
    """How to call each module's ``main`` for these options."""
    size = args.size_mb or (COMPARE_FULL_SIZE_MB if args.full else COMPARE_QUICK_SIZE_MB if args.quick else COMPARE_SIZE_MB)
    return {
        "bench_data": lambda main: main(),
        "bench_compare": lambda main: main(size_mb=size, repeats=1 if args.quick else 3),
        "bench_train": lambda main: main(["--quick"] if args.quick else []),
        "bench_startup": lambda main: main(repeats=3 if args.quick else 7),
        "bench_checkpoint": lambda main: main(["--quick"] if args.quick else []),
        "bench_toolkit": lambda main: main(),
    }


def main(argv=None) -> dict[str, dict]:
    """Run the selected benchmarks in order; return ``{name: figures}``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run the ratio benchmarks.")
    parser.add_argument("--full", action="store_true", help=f"bench_compare at {COMPARE_FULL_SIZE_MB} MiB (default {COMPARE_SIZE_MB})")
    parser.add_argument("--quick", action="store_true",
                        help=f"short versions: bench_compare at {COMPARE_QUICK_SIZE_MB} MiB once, bench_train --quick")
    parser.add_argument("--size-mb", type=int, help="bench_compare checkpoint size in MiB (overrides --full/--quick)")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    calls = _calls(args)
    results: dict[str, dict] = {}
    for name in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        results[name] = calls[name](module.main)
        print(f"   ({time.perf_counter() - start:.0f} s)\n", flush=True)
    return results


if __name__ == "__main__":
    main()
