"""The CUDA checks of the Stage-1 trainer, as one script for a machine with a GPU.

    python tools/gpu_check.py OUT_DIR [--quick]

CI has no GPU, so these are not tests of the suite; run this wherever one is available and keep
its report (``OUT_DIR/gpu_check.json``). It checks, on ``cuda``:

* no host synchronisation in the training step (``torch.cuda.set_sync_debug_mode("error")``
  around every ``Stage1Trainer.train_step``);
* rerun byte-identical; 0 vs 2 DataLoader workers byte-identical; SIGKILL with 2 workers plus
  ``--resume auto`` byte-identical to the run that never stopped; ``--precision bf16-mixed`` rerun
  byte-identical; ``--checkpoint-mode async`` byte-identical to sync;
* and measures steps/s: deterministic fp32, non-deterministic fp32, deterministic bf16-mixed.

Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"  # --smoke: "cpu" and tiny sizes, to try the script itself without a GPU
SIZE = {"width": "32", "batch": "16", "tile": 64, "count": 64}
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from axs_lib.cli import main  # noqa: E402
from axs_lib.ingest import write_synthetic_tiles  # noqa: E402
from axs_lib.run_dir import CHECKPOINTS, METRICS, RUN_JSON  # noqa: E402
from axs_lib.stage1 import train as train_module  # noqa: E402


def shas(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / CHECKPOINTS).glob("*.pt"))}


def steps_per_second(run: Path) -> float | None:
    return json.loads((run / RUN_JSON).read_text()).get("steps_per_second")


def train(tiles: Path, out: Path, steps: int, *extra: str) -> int:
    return main(["train", "stage1", "--data-dir", str(tiles), "--output-dir", str(out), "--seed", "42", "--steps", str(steps),
                 "--checkpoint-every", str(steps // 2), "--val-every", str(steps // 2), "--log-every", "5",
                 "--batch-size", SIZE["batch"], "--width", SIZE["width"], "--warmup-steps", "5", "--speckle-std", "0.1",
                 "--device", DEVICE, "--quiet", "--no-plots", "--no-tensorboard", *extra])


def strict_steps():
    """Fail on any host synchronisation inside the training step; returns the original method."""
    original = train_module.Stage1Trainer.train_step

    def step(self, n):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(self, n)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    train_module.Stage1Trainer.train_step = step
    return original


def killed_and_resumed(tiles: Path, out: Path, steps: int) -> dict:
    argv = [sys.executable, str(ROOT / "scripts" / "train_stage1.py"), "--data-dir", str(tiles), "--output-dir", str(out),
            "--seed", "42", "--steps", str(steps), "--checkpoint-every", str(steps // 2), "--val-every", str(steps // 2),
            "--log-every", "1", "--batch-size", SIZE["batch"], "--width", SIZE["width"], "--warmup-steps", "5",
            "--speckle-std", "0.1", "--device", DEVICE, "--quiet", "--no-plots", "--no-tensorboard", "--num-workers", "2"]
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = steps // 2 + 3  # past the first checkpoint, mid-epoch
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        log = out / METRICS
        if log.exists() and sum('"train"' in line for line in log.read_text().splitlines()) >= target:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    code = main(["train", "stage1", *argv[2:], "--resume", "auto"])
    return {"resume_exit": code}


def run(out: Path, quick: bool) -> dict:
    report: dict = {"torch": torch.__version__, "cuda": torch.version.cuda,
                    "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "checks": {}}
    checks = report["checks"]
    tiles = out / "tiles"
    write_synthetic_tiles(tiles, count=SIZE["count"], size=SIZE["tile"], seed=0)
    steps = 6 if DEVICE == "cpu" else 20 if quick else 60

    original = strict_steps() if DEVICE == "cuda" else None
    try:
        code = train(tiles, out / "a", steps)
        checks["no_sync_in_step"] = code == 0
    except RuntimeError as exc:
        checks["no_sync_in_step"] = False
        report["sync_error"] = str(exc).splitlines()[0]
        train_module.Stage1Trainer.train_step = original
        train(tiles, out / "a", steps, "--overwrite")
    if original is not None:
        train_module.Stage1Trainer.train_step = original
    reference = shas(out / "a")
    train(tiles, out / "b", steps)
    checks["rerun_identical"] = shas(out / "b") == reference
    train(tiles, out / "w2", steps, "--num-workers", "2")
    checks["workers_0_vs_2_identical"] = shas(out / "w2") == reference
    report["kill"] = killed_and_resumed(tiles, out / "k", steps)
    checks["sigkill_resume_identical"] = {k: v for k, v in shas(out / "k").items() if k in reference} == reference
    train(tiles, out / "async", steps, "--checkpoint-mode", "async")
    checks["async_equals_sync"] = shas(out / "async") == reference
    train(tiles, out / "bf16a", steps, "--precision", "bf16-mixed")
    train(tiles, out / "bf16b", steps, "--precision", "bf16-mixed")
    checks["bf16_rerun_identical"] = shas(out / "bf16a") == shas(out / "bf16b")
    train(tiles, out / "nondet", steps, "--no-deterministic")
    report["nondeterministic_differs_from_deterministic"] = shas(out / "nondet") != reference

    timing_steps = 4 if DEVICE == "cpu" else 40 if quick else 200
    report["steps_per_second"] = {}
    for name, extra in (("fp32_deterministic", ()), ("fp32_nondeterministic", ("--no-deterministic",)),
                        ("bf16_deterministic", ("--precision", "bf16-mixed")), ("fp32_deterministic_async", ("--checkpoint-mode", "async"))):
        run_dir = out / f"t_{name}"
        main(["train", "stage1", "--data-dir", str(tiles), "--output-dir", str(run_dir), "--seed", "1", "--steps", str(timing_steps),
              "--checkpoint-every", "50", "--val-every", "50", "--log-every", "50", "--batch-size", SIZE["batch"], "--width", SIZE["width"],
              "--num-workers", "4", "--device", DEVICE, "--quiet", "--no-plots", "--no-tensorboard", *extra])
        report["steps_per_second"][name] = steps_per_second(run_dir)
    report["passed"] = all(checks.values())
    return report


def cli() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="run the script on the CPU at tiny sizes (no GPU needed)")
    args = p.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        SIZE.update(width="4", batch="2", tile=16, count=8)
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args.out, args.quick)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(cli())
