"""``make demo``: the main job end to end on real data, in a couple of minutes on a laptop CPU.

1. Write the six real BigEarthNet S1/S2 pairs shipped in the ``bigearthnet-common`` wheel as
   tiles in ``tiles/`` (no network).
2. Train Stage 1 twice with seed 42: once with no DataLoader workers, once with two.
3. Compare the two runs checkpoint by checkpoint and say whether they match bit for bit.

Exit 0 when the runs match, 1 when they do not.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from axs_lib.cli import main as axs
from axs_lib.compare import Options, compare_paths
from axs_lib.ingest import write_demo_tiles
from axs_lib.run_dir import CHECKPOINTS, LOSS_PLOT, checkpoint_name, sample_image

TILES = Path("tiles")
RUNS = (("runs/demo_a", "0"), ("runs/demo_b", "2"))
STEPS = "100"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    print(f"== 1. real BigEarthNet demo tiles -> {TILES}/")
    write_demo_tiles(TILES)
    for i, (out, workers) in enumerate(RUNS, start=2):
        print(f"\n== {i}. train stage 1: seed 42, {STEPS} steps, {workers} DataLoader workers -> {out}/")
        code = axs(["train", "stage1", "--data-dir", str(TILES), "--output-dir", out, "--seed", "42",
                    "--steps", STEPS, "--max-tiles", "10", "--num-workers", workers, "--overwrite"])
        if code != 0:
            return code
    print("\n== 4. compare the two runs")
    result = compare_paths(RUNS[0][0], RUNS[1][0], Options())
    print(result.render_text())
    final = f"{CHECKPOINTS}/{checkpoint_name(int(STEPS))}"
    for out, _ in RUNS:
        print(f"  sha256 {_sha(Path(out) / final)}  {out}/{final}")
    if not result.match:
        print("\n✗ The two runs differ: see above for where and why.")
        return 1
    print(f"\n✓ The two runs match bit for bit (0 and 2 workers). Plots: {RUNS[0][0]}/{LOSS_PLOT}, "
          f"{RUNS[0][0]}/{sample_image(int(STEPS))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
