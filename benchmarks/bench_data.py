"""Data pipeline benchmark: loader tiles/s with 0 and 2 workers, and the data fingerprint against
plain ``hashlib`` over the same bytes (the fingerprint hashes decoded array content, so uncached it
parses each tile as well as hashing it). Figures are ratios measured side by side in one run, on
synthetic 120 x 120 tiles written to a temporary directory, so they compare across machines.
"""

from __future__ import annotations

import hashlib
import itertools
import tempfile
import time
from pathlib import Path

from axs_lib.data import DEFAULT_CACHE_TILES, TileDataset
from axs_lib.fingerprint.data import data_fingerprint
from axs_lib.ingest import write_synthetic_tiles
from axs_lib.loader import ResumableLoader
from axs_lib.tiles import RACY_SECONDS

NUM_TILES = 256
TILE_SIZE = 120
BATCH_SIZE = 16
EPOCHS = 2


def loader_tiles_per_second(paths: list[Path], num_workers: int, cache_tiles: int = DEFAULT_CACHE_TILES) -> float:
    """Augmented samples per second over ``EPOCHS`` epochs, every sample decoded (through the
    per-process tile cache unless ``cache_tiles=0``); the first batch (worker start-up) not timed.

    Batches come as the trainer draws them: `ResumableLoader.endless` over a `TileDataset`."""
    dataset = TileDataset(paths, seed=0, augment=True, speckle_std=0.1, cache_tiles=cache_tiles)
    num_batches = EPOCHS * len(paths) // BATCH_SIZE - 1
    with ResumableLoader(dataset, BATCH_SIZE, seed=0, num_workers=num_workers) as loader:
        iterator = loader.endless()
        next(iterator)  # start-up (worker processes) is not throughput
        start = time.perf_counter()
        for _ in itertools.islice(iterator, num_batches):
            pass
        seconds = time.perf_counter() - start
        iterator.close()
    return num_batches * BATCH_SIZE / seconds


def plain_hashlib_seconds(paths: list[Path]) -> float:
    """SHA-256 of every tile and sidecar with nothing else: the floor for an uncached fingerprint."""
    start = time.perf_counter()
    for path in paths:
        for file in (path, path.with_suffix(".json")):
            hashlib.sha256(file.read_bytes()).hexdigest()
    return time.perf_counter() - start


def fingerprint_seconds(paths: list[Path], cache_dir: Path) -> float:
    start = time.perf_counter()
    data_fingerprint(paths, {"train": [p.stem for p in paths]}, cache_dir=cache_dir)
    return time.perf_counter() - start


def main() -> dict:
    """Run the data benchmarks, print one line each, and return the figures."""
    with tempfile.TemporaryDirectory(prefix="axs-bench-data-") as tmp:
        tiles_dir, cache_dir = Path(tmp) / "tiles", Path(tmp) / "cache"
        paths = write_synthetic_tiles(tiles_dir, count=NUM_TILES, size=TILE_SIZE, seed=0)
        megabytes = sum(p.stat().st_size + p.with_suffix(".json").stat().st_size for p in paths) / 1e6
        plain_hashlib_seconds(paths)  # warm the page cache so both hashers read from memory
        w0 = loader_tiles_per_second(paths, 0)
        w2 = loader_tiles_per_second(paths, 2)
        plain = plain_hashlib_seconds(paths)
        # Files changed in the last RACY_SECONDS are not cached by design (the cache key includes
        # ctime, which cannot be set back), so wait until the newest is older than that.
        time.sleep(max(0.0, RACY_SECONDS + 0.5 - (time.time() - max(p.stat().st_ctime for p in paths))))
        uncached = fingerprint_seconds(paths, cache_dir)
        cached = fingerprint_seconds(paths, cache_dir)
    results = {
        "loader_tiles_per_s_0_workers": w0,
        "loader_tiles_per_s_2_workers": w2,
        "loader_speedup_2_vs_0_workers": w2 / w0,
        "fingerprint_uncached_vs_hashlib": uncached / plain,
        "fingerprint_cached_vs_hashlib": cached / plain,
        "hashlib_mb_per_s": megabytes / plain,
    }
    print(f"data: {NUM_TILES} synthetic {TILE_SIZE}x{TILE_SIZE} tiles, batch {BATCH_SIZE}, {EPOCHS} epochs, augmentation on")
    print(f"  loader, 0 workers:        {w0:10.1f} tiles/s")
    print(f"  loader, 2 workers:        {w2:10.1f} tiles/s  ({w2 / w0:.2f}x 0 workers)")
    print(f"  fingerprint, uncached:    {uncached / plain:10.2f}x plain hashlib time ({megabytes / plain:.0f} MB/s hashlib)")
    print(f"  fingerprint, cached:      {cached / plain:10.3f}x plain hashlib time")
    return results


if __name__ == "__main__":
    main()
