"""Portable CPU mode's cost: trainer steps/s with ``--portable`` vs without, side by side.

Each configuration trains the Stage-1 U-Net in its own process (the pinning is per process) on
the same synthetic tiles, alternately, ``rounds`` times; the figure is the trainer's own
``steps_per_second`` from ``run.json`` (the loop alone, start-up excluded):

* ``portable``: ``--portable --threads T`` (ATen, oneDNN and MKL pinned to AVX2);
* ``same threads``: ``--threads T``, the machine's own instruction set: the ratio to it is the
  cost of the instruction-set pinning alone;
* ``default``: no flag (torch's thread count, one per core): what a user runs without the mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from axs_lib.ingest import write_synthetic_tiles
from axs_lib.run_dir import RUN_JSON

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"portable": ["--portable"], "same threads": [], "default": None}


def _train(tiles: Path, out: Path, extra: list[str], args: argparse.Namespace) -> float:
    cmd = [sys.executable, str(REPO / "scripts" / "train_stage1.py"), "--data-dir", str(tiles), "--output-dir", str(out),
           "--seed", "0", "--steps", str(args.steps), "--width", str(args.width), "--batch-size", "4",
           "--checkpoint-every", str(args.steps), "--val-every", str(args.steps), "--no-plots", "--no-tensorboard", "--quiet",
           *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=1800)
    return float(json.loads((out / RUN_JSON).read_text())["steps_per_second"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_portable", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="6 steps at width 4, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.width, args.rounds = 6, 4, 1
    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        tiles = Path(tmp) / "tiles"
        write_synthetic_tiles(tiles, count=24, size=64, seed=0)
        for round_ in range(args.rounds):
            order = list(CONFIGS) if round_ % 2 == 0 else list(reversed(CONFIGS))
            for name in order:
                extra = CONFIGS[name]
                flags = [] if extra is None else [*extra, "--threads", str(args.threads)]
                rates[name].append(_train(tiles, Path(tmp) / f"{name}-{round_}".replace(" ", "_"), flags, args))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    results = {"steps_per_s": medians,
               "portable_vs_same_threads": medians["portable"] / medians["same threads"],
               "portable_vs_default": medians["portable"] / medians["default"]}
    for name, value in medians.items():
        print(f"  {name:<13} {value:8.2f} steps/s")
    print(f"  portable / same threads  {results['portable_vs_same_threads']:.3f}")
    print(f"  portable / default       {results['portable_vs_default']:.3f}")
    return results


if __name__ == "__main__":
    main()
