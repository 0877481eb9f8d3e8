"""Toolkit benchmark: what SeededDataset + ResumableLoader cost on a loader-bound workload, and
what they buy (exactness) against the plain recipes.

Speed: a user's dataset (read a tile, random crop, flips and noise from the global generators)
feeds a tiny model with 2 workers; samples/s of ``ResumableLoader(SeededDataset(dataset))``
against a plain ``DataLoader(shuffle=True, worker_init_fn=seed_worker, generator=...)`` over the
same tiles, measured side by side in alternating rounds (best of each). Target: >= 0.95x.

Exactness: one epoch of a dataset that draws only from the global generators, loaded with 0 and
with 2 workers, and resumed half-way with fresh workers (the plain recipes start their sampler
after the consumed samples, as a skipping resume does), counting the samples that are bit-identical
to the 0-worker run, and to the uninterrupted run of the same worker count. Recipes: the guide's (``set_seed`` + ``seed_worker`` + a seeded
generator), Lightning's (``seed_everything(workers=True)`` + ``pl_worker_init_function``) and ours.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from axs_lib.ingest import write_synthetic_tiles
from axs_lib.loader import ResumableLoader
from axs_lib.reproducibility import create_reproducible_generator, seed_worker, set_seed
from axs_lib.samples import SeededDataset
from axs_lib.tiles import read_tile

NUM_TILES = 256
TILE_SIZE = 120
CROP = 96
BATCH_SIZE = 16
EPOCHS = 2
ROUNDS = 3
NUM_WORKERS = 2
EXACT_SAMPLES = 64
SEED = 0


class AugmentedTiles(Dataset):
    """A user's dataset: decode the tile, then random crop, flip and noise from the global generators."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        sar = read_tile(self.paths[index]).sar
        top, left = np.random.randint(0, sar.shape[-2] - CROP + 1), np.random.randint(0, sar.shape[-1] - CROP + 1)
        crop = np.nan_to_num(sar[:, top : top + CROP, left : left + CROP])
        if np.random.rand() < 0.5:
            crop = crop[..., ::-1]
        x = torch.from_numpy(crop.copy())
        return x + 0.1 * torch.randn(x.shape)


def samples_per_second(loader_epochs, model: nn.Module) -> float:
    """Samples/s over ``EPOCHS`` epochs of a tiny forward pass (start-up batch excluded)."""
    count, start = 0, None
    for epoch in range(EPOCHS):
        for batch in loader_epochs(epoch):
            if start is None:
                start = time.perf_counter()  # workers are up: measure from here
                continue
            with torch.no_grad():
                model(batch)
            count += len(batch)
    return count / (time.perf_counter() - start)


def plain_loader(dataset: Dataset, num_workers: int) -> DataLoader:
    return DataLoader(dataset, BATCH_SIZE, shuffle=True, num_workers=num_workers, worker_init_fn=seed_worker,
                      generator=create_reproducible_generator(SEED), persistent_workers=num_workers > 0)


def speed(paths: list[Path]) -> tuple[float, float]:
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32, 1))
    dataset = AugmentedTiles(paths)
    plain, ours = [], []
    for _ in range(ROUNDS):  # alternate, so a busy moment hurts both
        loader = plain_loader(dataset, NUM_WORKERS)
        plain.append(samples_per_second(lambda epoch, loader=loader: loader, model))
        del loader
        resumable = ResumableLoader(SeededDataset(dataset, SEED), BATCH_SIZE, seed=SEED, num_workers=NUM_WORKERS)
        with resumable:
            ours.append(samples_per_second(lambda epoch, resumable=resumable: resumable, model))
    return max(plain), max(ours)


# --------------------------------------------------------------------------- exactness


class GlobalRandom(Dataset):
    def __len__(self) -> int:
        return EXACT_SAMPLES

    def __getitem__(self, index):
        return torch.rand(4) + float(np.random.normal()) + int(index)


def _guide(num_workers: int, start: int = 0) -> DataLoader:
    set_seed(SEED)
    return DataLoader(GlobalRandom(), 4, sampler=range(start, EXACT_SAMPLES), num_workers=num_workers,
                      worker_init_fn=seed_worker, generator=create_reproducible_generator(SEED))


def _lightning(num_workers: int, start: int = 0) -> DataLoader:
    from lightning.fabric.utilities.seed import pl_worker_init_function, seed_everything

    seed_everything(SEED, workers=True, verbose=False)
    return DataLoader(GlobalRandom(), 4, sampler=range(start, EXACT_SAMPLES), num_workers=num_workers,
                      worker_init_fn=pl_worker_init_function)


def _identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    return sum(int(torch.equal(x, y)) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True))


def exactness() -> dict[str, tuple[int, int, int]]:
    """{recipe: (samples, identical 0 vs 2 workers, identical after a half-way resume)}.

    The resume is compared with the uninterrupted run of the same worker count. The plain recipes
    resume as a skipping loader does (the sampler starts after the consumed samples, nothing is
    loaded twice); ours from the loader's state_dict.
    """
    half = EXACT_SAMPLES // 2
    out = {}
    for name, make in (("guide", _guide), ("lightning", _lightning)):
        reference, workers = list(make(0)), list(make(NUM_WORKERS))
        resumed = workers[: half // 4] + list(make(NUM_WORKERS, half))
        out[name] = (EXACT_SAMPLES, _identical(reference, workers), _identical(workers, resumed))

    def ours(num_workers: int) -> ResumableLoader:
        return ResumableLoader(SeededDataset(GlobalRandom(), SEED), 4, seed=SEED, shuffle=False, num_workers=num_workers)

    reference, workers = list(ours(0)), list(ours(NUM_WORKERS))
    first = ours(NUM_WORKERS)
    head = list(itertools.islice(iter(first), half // 4))
    second = ours(NUM_WORKERS)
    second.load_state_dict(first.state_dict())
    out["toolkit"] = (EXACT_SAMPLES, _identical(reference, workers), _identical(workers, head + list(second)))
    first.close(), second.close()
    return out


def main() -> dict:
    """Run the toolkit benchmark, print its lines, and return the figures."""
    with tempfile.TemporaryDirectory(prefix="axs-bench-toolkit-") as tmp:
        paths = write_synthetic_tiles(Path(tmp), count=NUM_TILES, size=TILE_SIZE, seed=0)
        plain, ours = speed(paths)
    exact = exactness()
    results = {"plain_samples_per_s": plain, "toolkit_samples_per_s": ours, "toolkit_vs_plain": ours / plain}
    print(f"toolkit: {NUM_TILES} synthetic {TILE_SIZE}x{TILE_SIZE} tiles, crop {CROP}, batch {BATCH_SIZE}, "
          f"{NUM_WORKERS} workers, {EPOCHS} epochs, best of {ROUNDS} alternating rounds")
    print(f"  plain DataLoader (guide recipe):         {plain:10.1f} samples/s")
    print(f"  SeededDataset + ResumableLoader:         {ours:10.1f} samples/s  ({ours / plain:.3f}x plain; target >= 0.95x)")
    print(f"  bit-identical samples of {EXACT_SAMPLES} (global np.random/torch.rand dataset):")
    for name, (total, workers, resumed) in exact.items():
        print(f"    {name:10s} 0 vs {NUM_WORKERS} workers: {workers:3d}/{total}   resumed half-way: {resumed:3d}/{total}")
        results[f"{name}_identical_0_vs_{NUM_WORKERS}_workers"] = workers
        results[f"{name}_identical_after_resume"] = resumed
    return results


if __name__ == "__main__":
    main()
