"""Tile stores: what a tile format other than one ``.npz`` per tile provides, and how one is found.

`axs_lib.tiles` is the one way a tile is listed and read: ``list_tiles(DIR)``, ``read_tile(ref)``,
``read_sidecar(ref)``, the data fingerprint's stat keys. For a directory of ``.npz`` files it does
the work itself; for any other layout it asks the `TileStore` that recognises the directory (or
the ref), and applies the same checks to what the store returns (the tile contract, the sidecar
fields). A store provides:

* ``holds_dir(directory)`` / ``holds_ref(ref)``: whether a directory, or a tile ref, is its own
  (cheap: called for every read);
* ``list_tiles(directory, max_tiles)``: its refs, sorted by tile name; a ref is a path whose
  ``name`` and ``stem`` are those of the tile, so split manifests and fingerprints read the same;
* ``read_arrays(ref)``: the six contract arrays, after the store's own integrity check (a
  checksum), so a damaged file is one `axs_lib.errors.InputError` naming it;
* ``read_meta(ref)``: the tile's sidecar metadata, or None;
* ``ref_files(ref)``: the files (data, index) whose stat keys change when the tile may have.

Stores are found through `KNOWN_STORES` (module and attribute, imported on first use, the way
fsspec finds its filesystems) and `register` (a store of the caller's own). So `tiles` imports no
store, a store imports `tiles` for the contract, and the import graph has no cycle: a new format
is a module that implements the protocol, named here or registered. `axs_lib.packed` (memory-
mapped shards) is the one this version ships. Imports no numpy and no torch.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# The stores this version knows, as "module:attribute", imported when a lookup first needs them.
KNOWN_STORES = ("axs_lib.packed:STORE",)


@runtime_checkable
class TileStore(Protocol):
    """A tile format: see the module notes for what each method promises."""

    def holds_dir(self, directory: os.PathLike | str) -> bool: ...

    def holds_ref(self, ref: os.PathLike | str) -> bool: ...

    def list_tiles(self, directory: os.PathLike | str, max_tiles: int | None = None) -> list[Path]: ...

    def read_arrays(self, ref: os.PathLike | str) -> dict[str, Any]: ...

    def read_meta(self, ref: os.PathLike | str) -> dict | None: ...

    def ref_files(self, ref: str) -> tuple[str, str]: ...


_stores: list[TileStore] = []
_loaded = False


def register(store: TileStore) -> None:
    """Add ``store`` to the stores `tiles` asks (once; the first that claims a directory or ref reads it)."""
    if not isinstance(store, TileStore):
        raise TypeError(f"{type(store).__name__} does not provide the TileStore methods")
    if store not in _stores:
        _stores.append(store)


def stores() -> list[TileStore]:
    """Every store: the known ones (imported now if not yet) and the registered ones."""
    global _loaded
    if not _loaded:
        for spec in KNOWN_STORES:
            module, _, attribute = spec.partition(":")
            register(getattr(importlib.import_module(module), attribute))
        _loaded = True
    return _stores


def store_for_dir(directory: os.PathLike | str) -> TileStore | None:
    """The store whose directory ``directory`` is, or None for a directory of ``.npz`` tiles."""
    return next((s for s in stores() if s.holds_dir(directory)), None)


def store_for_ref(ref: os.PathLike | str) -> TileStore | None:
    """The store whose tile ``ref`` is, or None for a ``.npz`` tile."""
    return next((s for s in stores() if s.holds_ref(ref)), None)
