"""The tile Dataset and its validation loader: normalised tensors, a valid-pixel mask, and
augmentation that depends only on (seed, epoch, sample index).

`TileDataset` takes two kinds of key:

* a plain ``int`` index: the tile as it is, never augmented (validation, evaluation);
* a `axs_lib.sampling.SampleIndex` (an int carrying its epoch and position, as
  `axs_lib.sampling.ResumableSampler` and `axs_lib.loader.ResumableLoader` hand them out):
  augmented when the dataset was built with ``augment=True``, with a ``torch.Generator`` seeded
  from ``derive_seed(seed, "augment", epoch, index)``. Nothing else is drawn from, so a sample
  comes out the same bits whichever worker, and however many workers, produced it.

Training batches come from `axs_lib.loader.ResumableLoader` (its state is what the loop consumed);
`validation_loader` walks a dataset once in index order with plain int keys.

Normalisation uses the fixed ranges in `axs_lib.tiles` (values clipped, mapped to [0, 1]). Invalid
pixels (NaN in any band) are 0 in ``sar`` and ``optical`` and 0 in ``mask``.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from axs_lib.reproducibility import create_reproducible_generator, derive_seed
from axs_lib.tiles import OPTICAL_RANGE, SAR_DB_RANGE, read_tile
from axs_lib.workers import init_worker, reap_workers_at_exit

DEFAULT_CACHE_TILES = 512  # decoded tiles kept per process (about 200 MB at 120 x 120)


def normalize(values: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Clip ``values`` to ``value_range`` and map it linearly to [0, 1] (NaN stays NaN)."""
    lo, hi = value_range
    return ((np.clip(values, lo, hi) - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)


class TileDataset(Dataset):
    """Tiles as dicts of tensors: ``sar`` (2,H,W), ``optical`` (4,H,W), ``mask`` (1,H,W), and the key.

    ``speckle_std`` > 0 multiplies SAR intensity (linear power) by ``1 + speckle_std * N(0, 1)``
    (clamped to stay positive), i.e. adds ``10 log10`` of that factor in dB, on augmented samples.
    Decoded tiles are cached per process, up to ``cache_tiles`` of them (least recently used out).
    """

    def __init__(self, paths: list[Path], seed: int, augment: bool, speckle_std: float = 0.0, cache_tiles: int = DEFAULT_CACHE_TILES):
        if speckle_std < 0:
            raise ValueError(f"speckle_std must be >= 0, got {speckle_std}")
        self.paths = [Path(p) for p in paths]
        self.seed = seed
        self.augment = augment
        self.speckle_std = float(speckle_std)
        self.cache_tiles = cache_tiles
        self._cache: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def _decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(sar dB, optical reflectance x 10000) of tile ``index``, from the per-process cache."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        tile = read_tile(self.paths[index])
        self._cache[index] = (tile.sar, tile.optical)
        if len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        return tile.sar, tile.optical

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        if isinstance(key, tuple):  # the (epoch, position, index) keys of earlier versions
            raise TypeError(f"TileDataset keys are ints or SampleIndex (which carries the epoch), got the tuple {key!r}: "
                            "use SampleIndex(index, epoch, position)")
        # a plain int, or a SampleIndex that carries its epoch and position
        epoch, position, index = int(getattr(key, "epoch", -1)), int(getattr(key, "position", -1)), int(key)
        if not 0 <= index < len(self.paths):
            raise IndexError(f"tile index {index} out of range for {len(self.paths)} tiles")
        sar, optical = self._decoded(index)
        generator = None
        if self.augment and epoch >= 0:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "augment", epoch, index))
        flips = _draw_geometry(generator, square=sar.shape[-1] == sar.shape[-2])
        if generator is not None and self.speckle_std > 0:
            sar = _add_speckle(sar, self.speckle_std, generator)
        mask = np.isfinite(sar).all(axis=0, keepdims=True) & np.isfinite(optical).all(axis=0, keepdims=True)
        sample = {
            "sar": np.nan_to_num(normalize(sar, SAR_DB_RANGE), nan=0.0),
            "optical": np.nan_to_num(normalize(optical, OPTICAL_RANGE), nan=0.0),
            "mask": mask.astype(np.float32),
        }
        out = {name: _apply_geometry(torch.from_numpy(array), flips) for name, array in sample.items()}
        out["index"] = torch.tensor(index, dtype=torch.int64)
        out["epoch"] = torch.tensor(epoch, dtype=torch.int64)
        out["position"] = torch.tensor(position, dtype=torch.int64)
        return out


def _draw_geometry(generator: torch.Generator | None, square: bool) -> tuple[bool, bool, int]:
    """(flip rows, flip columns, quarter turns). Always three draws, so later draws stay aligned;
    non-square tiles only turn by 0 or 180 degrees, so every sample keeps the tile's shape."""
    if generator is None:
        return False, False, 0
    flip_h, flip_w, turns = torch.randint(0, 4, (3,), generator=generator).tolist()
    return flip_h >= 2, flip_w >= 2, turns if square else 2 * (turns % 2)


def _apply_geometry(tensor: torch.Tensor, flips: tuple[bool, bool, int]) -> torch.Tensor:
    flip_h, flip_w, turns = flips
    dims = [d for d, on in ((-2, flip_h), (-1, flip_w)) if on]
    if dims:
        tensor = torch.flip(tensor, dims)
    if turns:
        tensor = torch.rot90(tensor, turns, dims=(-2, -1))
    return tensor.contiguous()


def _add_speckle(sar_db: np.ndarray, std: float, generator: torch.Generator) -> np.ndarray:
    """Multiplicative speckle on linear intensity, applied in dB. The factor's log is taken in
    numpy float64 (single-threaded, so its bits cannot depend on thread count)."""
    factor = 1.0 + std * torch.randn(sar_db.shape, generator=generator, dtype=torch.float64).numpy()
    return (sar_db + 10.0 * np.log10(np.maximum(factor, 1e-3))).astype(np.float32)


def validation_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader that walks ``dataset`` once in index order, with plain int keys (so no
    augmentation): the trainer's validation loader.

    Workers start as those of every loader of ours (`axs_lib.workers.init_worker`: seeded with
    `seed_worker`, the stop signals ignored; see `reap_workers_at_exit`) and are persistent
    (validation runs many times); the loader's generator is seeded from ``seed``; memory is pinned
    only when asked and CUDA is present. The workers start at the
    first ``iter(loader)``: do that under `axs_lib.workers.stop_signals_held`, as the trainer's
    `axs_lib.stage1.train.evaluate` does, so a stop signal in that moment cannot kill one.
    """
    if num_workers > 0:
        reap_workers_at_exit()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=init_worker,
        generator=create_reproducible_generator(seed),
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory and torch.cuda.is_available(),
    )
