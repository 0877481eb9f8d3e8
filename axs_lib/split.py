"""The train/validation split, reproducible and recorded in a manifest (``split.json``).

Sources:

* ``random``: the reproducibility guide's split, ``random_split(tiles, [1 - f, f],
  generator=create_reproducible_generator(seed))`` over the tiles sorted by name, with one change:
  when there are at least two tiles, validation gets at least one (torch's fractional lengths give
  0 validation tiles for n < 10 at f = 0.1). Whenever torch's lengths already give validation a
  tile, the split is exactly the guide's. With a single tile, validation is empty.
* ``sidecar``: each tile's sidecar ``split`` field decides (``train`` or ``val``; ``test`` tiles
  are left out of both). Every tile must have the field.
* ``auto``: ``sidecar`` when every tile has a ``split`` field and both train and val are
  non-empty, otherwise ``random`` over the tiles whose sidecar does not say ``test``: a tile held
  out for testing never trains, even when the other sidecars are incomplete. When every tile says
  ``test`` there is nothing to train on, and that is an error, not a silent fallback.

The manifest holds tile stems only (never absolute paths: two runs from different directories
must agree), the seed, the fraction and the source actually used.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import random_split

from axs_lib.atomic import atomic_write_text
from axs_lib.errors import InputError, UsageError
from axs_lib.reproducibility import create_reproducible_generator
from axs_lib.tiles import StatCache, read_sidecar, ref_key, sidecar_path

SOURCES = ("auto", "sidecar", "random")


@dataclass
class Split:
    """Train and validation tiles, the tiles left out (sidecar ``test``), and how they were chosen."""

    train: list[Path]
    val: list[Path]
    source: str
    seed: int
    val_fraction: float
    excluded: list[Path] = field(default_factory=list)
    flagged: list[Path] = field(default_factory=list)  # left out by `leave_out_flagged` (cloud, snow)

    def manifest(self) -> dict:
        """The split as ``split.json`` stores it: stems, seed, fraction, source (and flagged tiles, when any)."""
        manifest = {
            "source": self.source,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "train": [p.stem for p in self.train],
            "val": [p.stem for p in self.val],
            "excluded": [p.stem for p in self.excluded],
        }
        if self.flagged:  # only then: a split without flagged tiles keeps the manifest (and fingerprint) it had
            manifest["flagged"] = [p.stem for p in self.flagged]
        return manifest

    def write(self, path: os.PathLike | str) -> None:
        """Write the manifest atomically as canonical JSON."""
        atomic_write_text(path, json.dumps(self.manifest(), indent=2, sort_keys=True) + "\n")


def split_lengths(n: int, val_fraction: float) -> tuple[int, int]:
    """``(train, val)`` sizes: torch's ``random_split`` lengths for ``[1 - f, f]``, val at least 1 when n >= 2.

    torch floors each fraction and hands the remainder out round-robin from the first subset, so
    with two subsets validation gets ``floor(n * f)`` tiles.
    """
    val = math.floor(n * val_fraction)
    if n >= 2:
        val = max(1, val)
    return n - val, val


def sidecar_splits(paths: list[Path], cache_dir: os.PathLike | str | None = None) -> dict[Path, str | None]:
    """Each tile's sidecar ``split`` (None when absent), read once and then cached.

    The cache is keyed like the tile checks (`axs_lib.tiles.stat_key` of tile and sidecar), so a
    start over 100k tiles costs two ``stat`` calls per tile instead of opening every sidecar.
    """
    return _cached_sidecar_field(paths, "split", "splits", cache_dir)


# Sidecar quality flags that make a tile's optical target other than clear sky (BigEarthNet's lists).
CLOUD_SNOW_FLAGS = ("cloud_or_shadow", "seasonal_snow")


def sidecar_quality_flags(paths: list[Path], cache_dir: os.PathLike | str | None = None) -> dict[Path, list | None]:
    """Each tile's sidecar ``quality_flags`` (None when absent), cached like `sidecar_splits`."""
    return _cached_sidecar_field(paths, "quality_flags", "quality_flags", cache_dir)


def _cached_sidecar_field(paths: list[Path], name: str, cache_name: str, cache_dir) -> dict[Path, object]:
    cache = StatCache(cache_name, cache_dir)
    real_dirs: dict[str, str] = {}
    values: dict[Path, object] = {}
    for path in paths:
        key = ref_key(path, real_dirs)
        if key is None:
            values[path] = read_sidecar(path).get(name)
            continue
        directory, entry_name, keys = key
        entry = entry_name if entry_name == path.name else f"{entry_name}/{path.name}"
        cached = cache.get(directory, entry, keys)
        if isinstance(cached, list) and len(cached) == 1:
            values[path] = cached[0]
        else:
            values[path] = read_sidecar(path).get(name)
            cache.put(directory, entry, keys, [values[path]])
    cache.save()
    return values


def leave_out_flagged(split: Split, cache_dir: os.PathLike | str | None = None) -> Split:
    """Move the train and validation tiles whose sidecar flags cloud/shadow or seasonal snow
    (`CLOUD_SNOW_FLAGS`) to ``split.flagged``: the model learns, and is validated on, clear-sky
    targets only. A tile without a sidecar or flags counts as clear. Order is kept."""
    flags = sidecar_quality_flags([*split.train, *split.val], cache_dir)
    flagged = {p for p, f in flags.items() if isinstance(f, list) and set(f) & set(CLOUD_SNOW_FLAGS)}
    if flagged:
        split.flagged = [p for p in [*split.train, *split.val] if p in flagged]
        split.train = [p for p in split.train if p not in flagged]
        split.val = [p for p in split.val if p not in flagged]
    return split


def make_split(paths: list[Path], seed: int, val_fraction: float = 0.1, source: str = "auto",
               cache_dir: os.PathLike | str | None = None) -> Split:
    """Split ``paths`` into train and validation tiles; see the module docstring for the sources.

    Sidecar splits are cached under ``cache_dir`` (default: the data cache, `sidecar_splits`)."""
    if source not in SOURCES:
        raise UsageError(f"--split-source must be one of {', '.join(SOURCES)}, got {source!r}")
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if not paths:
        raise UsageError("no tiles to split")
    paths = sorted((p if isinstance(p, Path) else Path(p) for p in paths), key=lambda p: p.name)
    if source == "random":
        return _random_split(paths, seed, val_fraction)
    labelled = sidecar_splits(paths, cache_dir)
    if source == "sidecar" or (None not in labelled.values() and {"train", "val"} <= set(labelled.values())):
        return _sidecar_split(labelled, seed, val_fraction)
    held_out = [p for p, split in labelled.items() if split == "test"]
    usable = [p for p in paths if labelled[p] != "test"]
    if not usable:
        raise UsageError(f"every one of the {len(paths)} tiles has split 'test' in its sidecar: no tile to train on "
                         "(test tiles never train; use --split-source random to split them anyway)")
    split = _random_split(usable, seed, val_fraction)
    split.excluded = held_out
    return split


def _sidecar_split(labelled: dict[Path, str | None], seed: int, val_fraction: float) -> Split:
    for path, split in labelled.items():
        if split is None:
            raise InputError(sidecar_path(path), "no 'split' field, needed by --split-source sidecar (use --split-source random)")
    groups: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    for path, split in labelled.items():
        groups[split].append(path)
    if not groups["train"]:
        raise UsageError("no tile has split 'train' in its sidecar; nothing to train on")
    return Split(groups["train"], groups["val"], "sidecar", seed, val_fraction, excluded=groups["test"])


def _random_split(paths: list[Path], seed: int, val_fraction: float) -> Split:
    if len(paths) == 1:  # nothing to draw (and random_split warns about the empty subset)
        return Split(list(paths), [], "random", seed, val_fraction)
    train, val = random_split(paths, list(split_lengths(len(paths), val_fraction)), generator=create_reproducible_generator(seed))
    return Split([paths[i] for i in train.indices], [paths[i] for i in val.indices], "random", seed, val_fraction)
