"""Start-up benchmark: how long ``axs`` takes before it does anything, against its floors.

Each command runs as a fresh subprocess (``python -m axs_lib.cli ...``), alternating with the
others, ``repeats`` times; the median wall time is reported. Two floors are measured the same way
in the same run: ``python -c pass`` (the interpreter) and ``python -c "import torch"`` (what any
command that touches tensors must pay). A command that does not need torch should sit near the
first; ``axs env`` needs torch (the fingerprint reads its CUDA, cuDNN and determinism state) and
should sit near the second, not above it. Which heavy modules each command imported is read from
one extra ``-X importtime`` run per command, so the table says why a figure is what it is.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numpy", "matplotlib", "torch._inductor", "rasterio", "pyarrow")

COMMANDS: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "python -c 'import torch'": ["-c", "import torch"],
    "axs --version": ["-m", "axs_lib.cli", "--version"],
    "axs --help": ["-m", "axs_lib.cli", "--help"],
    "axs env": ["-m", "axs_lib.cli", "env"],
    "axs compare --help": ["-m", "axs_lib.cli", "compare", "--help"],
    "axs runs --help": ["-m", "axs_lib.cli", "runs", "--help"],
}


def _time_once(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return elapsed


def heavy_imports(args: list[str]) -> list[str]:
    """The modules of `HEAVY` that a command imports (from ``python -X importtime``)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in names]


def main(repeats: int = 7) -> dict:
    """Run the start-up benchmark, print its table, and return its figures."""
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for args in COMMANDS.values():  # one untimed run each: the page cache warm for all alike
        _time_once(args)
    for _ in range(repeats):
        for name, args in COMMANDS.items():
            times[name].append(_time_once(args))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    python, torch = median["python -c pass"], median["python -c 'import torch'"]
    print(f"start-up: median of {repeats} fresh processes each, run alternately")
    print(f"  {'command':<26} {'seconds':>8} {'vs python':>10} {'vs import torch':>16}  imports")
    results: dict[str, float] = {}
    for name, args in COMMANDS.items():
        heavy = heavy_imports(args)
        print(f"  {name:<26} {median[name]:8.3f} {median[name] / python:9.1f}x {median[name] / torch:15.2f}x  "
              f"{', '.join(heavy) or '-'}")
        key = name.replace("python -c 'import torch'", "import_torch").replace("python -c pass", "python")
        key = key.replace("axs ", "axs_").replace(" --", "_").replace("--", "").replace(" ", "_")
        results[f"{key}_seconds"] = median[name]
        results[f"{key}_vs_import_torch"] = median[name] / torch
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per command (default 7)")
    main(parser.parse_args().repeats)
