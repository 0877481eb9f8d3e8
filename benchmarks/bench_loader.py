"""Data loading benchmark: tiles/s delivered through `TileDataset` + `ResumableLoader` (as the
trainer draws its batches) for per-tile NPZ and packed tiles with 0, 2 and 4 workers, and start-up
(list, split, check, fingerprint, first batch) at 1k and 10k tiles, first start against second start.

Loader figures are measured with the per-process decoded-tile cache off (``cache_tiles=0``), as
at reBEN scale where 550k tiles never fit in it: every sample is read and decoded. The page cache
is warm for both formats (both are read once before timing), so the figures compare decoding, not
the disk. Start-up is what the trainer does before step 1; the first start has an empty cache
directory, the second reuses it. The target is second/first <= 0.3 at 10k tiles.

``python -m benchmarks.bench_loader`` (or ``python -m benchmarks --only bench_loader``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from axs_lib import tiles as tiles_module
from benchmarks import bench_data
from benchmarks.bench_data import BATCH_SIZE, EPOCHS
from axs_lib.data import TileDataset
from axs_lib.fingerprint.data import data_fingerprint
from axs_lib.ingest import write_synthetic_tiles
from axs_lib.loader import ResumableLoader
from axs_lib.packed import pack_tiles
from axs_lib.split import make_split
from axs_lib.tiles import check_tiles, list_tiles

LOADER_TILES = 256
TILE_SIZE = 120
WORKERS = (0, 2, 4)
STARTUP_COUNTS = (1_000, 10_000)
STARTUP_TILE_SIZE = 32
DISTINCT = 16  # start-up sets repeat this many distinct tiles under new names (fast to write)


def loader_tiles_per_second(refs: list[Path], num_workers: int) -> float:
    """Augmented samples per second over ``EPOCHS`` epochs, every sample read and decoded (cache off)."""
    return bench_data.loader_tiles_per_second(refs, num_workers, cache_tiles=0)


def startup_seconds(data_dir: Path, cache_dir: Path) -> float:
    """What the trainer does before step 1: list, split, check, fingerprint, first batch."""
    start = time.perf_counter()
    refs = list_tiles(data_dir)
    split = make_split(refs, 0, 0.1, "auto")
    check_tiles([*split.train, *split.val], cache_dir=cache_dir)
    data_fingerprint(refs, split.manifest(), cache_dir=cache_dir)
    with ResumableLoader(TileDataset(split.train, 0, augment=True), BATCH_SIZE, seed=0) as loader:
        batches = loader.endless()  # as the trainer draws its batches
        next(batches)
        batches.close()
    return time.perf_counter() - start


def _many_tiles(directory: Path, count: int, seed_dir: Path) -> None:
    """``count`` tiles named t000000.npz..., copies of `DISTINCT` synthetic tiles (plain writes)."""
    sources = list_tiles(seed_dir)
    directory.mkdir()
    for i in range(count):
        src = sources[i % len(sources)]
        shutil.copyfile(src, directory / f"t{i:06d}.npz")
        shutil.copyfile(src.with_suffix(".json"), directory / f"t{i:06d}.json")


def main(argv: list[str] | None = None) -> dict:
    """Run both parts, print a table, return the figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_loader")
    parser.add_argument("--startup", type=int, action="append", help=f"start-up tile counts (default {STARTUP_COUNTS})")
    parser.add_argument("--loader-tiles", type=int, default=LOADER_TILES)
    args = parser.parse_args(argv if argv is not None else [])
    counts = tuple(args.startup or STARTUP_COUNTS)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="axs-bench-loader-") as tmp:
        tmp = Path(tmp)
        npz = write_synthetic_tiles(tmp / "npz", count=args.loader_tiles, size=TILE_SIZE, seed=0)
        pack_tiles(tmp / "npz", tmp / "packed")
        packed = list_tiles(tmp / "packed")
        warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on a 2-core machine is the point
        for name, refs in (("npz", npz), ("packed", packed)):
            loader_tiles_per_second(refs[:BATCH_SIZE * 2], 0)  # warm the page cache
            for workers in WORKERS:
                results[f"loader_{name}_{workers}_workers_tiles_per_s"] = loader_tiles_per_second(refs, workers)
        print(f"loader: {args.loader_tiles} synthetic {TILE_SIZE}x{TILE_SIZE} tiles, batch {BATCH_SIZE}, {EPOCHS} epochs, "
              "augmentation on, decoded-tile cache off")
        for workers in WORKERS:
            a, b = results[f"loader_npz_{workers}_workers_tiles_per_s"], results[f"loader_packed_{workers}_workers_tiles_per_s"]
            print(f"  {workers} workers: npz {a:9.1f} tiles/s   packed {b:9.1f} tiles/s   ({b / a:.2f}x)")

        write_synthetic_tiles(tmp / "seed", count=DISTINCT, size=STARTUP_TILE_SIZE, seed=1)
        print(f"start-up (list, split, check, fingerprint, first batch), {STARTUP_TILE_SIZE}x{STARTUP_TILE_SIZE} tiles:")
        for count in counts:
            directory = tmp / f"start_{count}"
            _many_tiles(directory, count, tmp / "seed")
            time.sleep(tiles_module.RACY_SECONDS + 0.5)  # files written just now are not cached, by design
            first = startup_seconds(directory, tmp / f"cache_{count}")
            second = startup_seconds(directory, tmp / f"cache_{count}")
            results[f"startup_{count}_first_s"] = first
            results[f"startup_{count}_second_s"] = second
            results[f"startup_{count}_second_vs_first"] = second / first
            print(f"  {count:7d} tiles: first {first:7.2f} s   second {second:7.2f} s   second/first {second / first:.2f}")
            shutil.rmtree(directory)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
