"""Packed tiles: many tiles in a few memory-mapped shards, each tile read with O(1) random access.

One ``.npz`` file per tile costs a file open, a zip directory parse and six small reads per
sample, and 550k files strain a filesystem. ``axs tiles pack DIR OUT`` writes the same tiles as:

* ``OUT/shard-00000.npy`` ...: a 1-D ``uint8`` ``.npy`` per `DEFAULT_SHARD_TILES` tiles, so
  ``np.load(path, mmap_mode="r")`` maps it without reading it. Each tile is its six contract
  arrays, raw C-order bytes in contract order, starting on a 64-byte boundary.
* ``OUT/shard-00000.json``: that shard's index, one entry per tile: name, byte offset, shape, the
  six dtypes, and the sidecar metadata (``null`` when the tile had no sidecar).
* ``OUT/pack.json``: the format, and each shard's file names and tile names.

A packed tile's ref is a path *inside* its shard, ``OUT/shard-00000.npy/<stem>.npz``: its ``name``
and ``stem`` are those of the unpacked tile, so split manifests, data fingerprints and logs read
the same, and `axs_lib.tiles.read_tile` (which recognises such a path) stays the one way a tile is
read. Reading maps the shard once per process and slices it: no per-tile file is opened.

Packing writes into a new (or empty) directory, every file atomically, the index last, so an
interrupted pack is never mistaken for a complete one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from axs_lib.atomic import atomic_open, atomic_write_text
from axs_lib.errors import InputError, UsageError

PACK_INDEX = "pack.json"
PACK_FORMAT = "axs-packed-tiles"
PACK_VERSION = 1
SHARD_SUFFIX = ".npy"
DEFAULT_SHARD_TILES = 4096  # about 1.4 GB of 120 x 120 float32 tiles per shard
ALIGN = 64
_HEADER_BYTES = 128
MAX_INDEX_BYTES = 1 << 30  # pack.json of 550k names is ~40 MB; a shard index ~3 MB per 4096 tiles  # a fixed .npy header, rewritten once the shard's length is known

_shards: dict[str, "_Shard"] = {}  # per process: mapped shards by path
_packed_parents: dict[str, bool] = {}


def is_packed_dir(directory: os.PathLike | str) -> bool:
    """True when ``directory`` holds a `PACK_INDEX`."""
    return os.path.isfile(os.path.join(directory, PACK_INDEX))


def is_packed_ref(ref: os.PathLike | str) -> bool:
    """True when ``ref`` names a tile inside a shard (``.../shard-00000.npy/<stem>.npz``)."""
    parent = os.path.dirname(os.fspath(ref))
    if not parent.endswith(SHARD_SUFFIX):
        return False
    if parent not in _packed_parents:
        _packed_parents[parent] = os.path.isfile(parent) and is_packed_dir(os.path.dirname(parent) or ".")
    return _packed_parents[parent]


def _read_json(path: Path) -> dict:
    from axs_lib.tiles import read_json_file

    doc = read_json_file(path, "pack index", limit=MAX_INDEX_BYTES)
    if not isinstance(doc, dict):
        raise InputError(path, "pack index must hold a JSON object")
    return doc


def pack_index(directory: os.PathLike | str) -> dict:
    """The checked ``pack.json`` of a packed directory."""
    path = Path(directory) / PACK_INDEX
    doc = _read_json(path)
    if doc.get("format") != PACK_FORMAT or doc.get("version") != PACK_VERSION:
        raise InputError(path, f"not a {PACK_FORMAT} version {PACK_VERSION} index (format {doc.get('format')!r}, version {doc.get('version')!r})")
    shards = doc.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tiles"), list) for s in shards
    ):
        raise InputError(path, "malformed shard list")
    for shard in shards:
        if os.path.basename(shard["file"]) != shard["file"] or not shard["file"].endswith(SHARD_SUFFIX):
            raise InputError(path, f"shard file name {shard['file']!r} must be a plain *{SHARD_SUFFIX} name in the directory")
    return doc


def list_packed(directory: os.PathLike | str, max_tiles: int | None = None) -> list[Path]:
    """Refs of the packed tiles of ``directory``, sorted by tile name, the first ``max_tiles``."""
    directory = Path(directory)
    refs = []
    for shard in pack_index(directory)["shards"]:
        base = directory / shard["file"]
        refs.extend(base / f"{name}.npz" for name in shard["tiles"] if isinstance(name, str))
    refs.sort(key=lambda p: p.name)
    if not refs:
        raise InputError(directory / PACK_INDEX, "no tiles in the pack")
    return refs[:max_tiles]


class _Shard:
    """A mapped shard and its index; slices are views of the map until copied."""

    def __init__(self, path: str):
        from axs_lib.tiles import check_regular_file

        self.path = path
        self.key: tuple | None = None
        check_regular_file(Path(path))
        index_path = Path(path).with_suffix(".json")
        index = _read_json(index_path)
        tiles = index.get("tiles")
        if not isinstance(tiles, list):
            raise InputError(index_path, "malformed shard index: no tile list")
        self.entries = {}
        for entry in tiles:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)):
                raise InputError(index_path, "malformed shard index entry")
            self.entries[entry["name"]] = entry
        try:
            self.data = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - numpy raises ValueError/OSError for bad headers
            raise InputError(path, f"not a readable shard: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if self.data.dtype != np.uint8 or self.data.ndim != 1:
            raise InputError(path, f"shard must be a 1-D uint8 array, got {self.data.dtype} {self.data.shape}")

    def entry(self, ref: str) -> dict:
        name = os.path.basename(ref)
        stem = name[: -len(".npz")] if name.endswith(".npz") else name
        entry = self.entries.get(stem)
        if entry is None:
            raise InputError(ref, "no such tile in the shard index")
        return entry

    def arrays(self, ref: str) -> dict[str, np.ndarray]:
        from axs_lib.tiles import S1_KEYS, S2_KEYS, check_shape_limits

        entry = self.entry(ref)
        keys = (*S1_KEYS, *S2_KEYS)
        try:
            offset, (h, w), dtypes = int(entry["offset"]), [int(v) for v in entry["shape"]], [np.dtype(d) for d in entry["dtypes"]]
        except (KeyError, TypeError, ValueError):
            raise InputError(ref, "malformed shard index entry") from None
        if len(dtypes) != len(keys) or offset < 0:
            raise InputError(ref, "malformed shard index entry")
        check_shape_limits(ref, (h, w))
        arrays = {}
        for key, dtype in zip(keys, dtypes):
            size = h * w * dtype.itemsize
            if offset + size > self.data.shape[0]:
                raise InputError(self.path, f"truncated shard: tile {os.path.basename(ref)} ends past the end of the file")
            arrays[key] = np.frombuffer(self.data, dtype=dtype, count=h * w, offset=offset).reshape(h, w)
            offset += size
        return arrays


def _shard(ref: str) -> _Shard:
    """The mapped shard of ``ref``, mapped again when the shard or its index was replaced or
    rewritten (one ``stat`` of each per read: a stale map must never serve old bytes)."""
    path = os.path.dirname(ref)
    try:
        key = tuple(_stat_key(os.stat(f)) for f in shard_files(path))
    except OSError:
        key = None  # _Shard names the problem
    shard = _shards.get(path)
    if shard is None or shard.key != key:
        shard = _shards[path] = _Shard(path)
        shard.key = key
    return shard


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return st.st_ino, st.st_size, st.st_ctime_ns, st.st_mtime_ns


def read_packed_arrays(ref: os.PathLike | str) -> dict[str, np.ndarray]:
    """The six contract arrays of a packed tile (read-only views of the mapped shard)."""
    return _shard(os.fspath(ref)).arrays(os.fspath(ref))


def read_packed_meta(ref: os.PathLike | str) -> dict | None:
    """The sidecar metadata stored with a packed tile, unchecked; None when it had no sidecar."""
    meta = _shard(os.fspath(ref)).entry(os.fspath(ref)).get("meta")
    return json.loads(json.dumps(meta)) if meta is not None else None  # a private copy


def shard_files(shard: os.PathLike | str) -> tuple[Path, Path]:
    """(data file, index file) of a shard."""
    shard = Path(shard)
    return shard, shard.with_suffix(".json")


# --------------------------------------------------------------------------- writing


def _npy_header(length: int) -> bytes:
    text = "{'descr': '|u1', 'fortran_order': False, 'shape': (%d,), }" % length
    body_len = _HEADER_BYTES - 10
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + (text.ljust(body_len - 1) + "\n").encode("latin1")


def pack_tiles(src_dir: os.PathLike | str, out_dir: os.PathLike | str, shard_tiles: int = DEFAULT_SHARD_TILES) -> dict:
    """Pack the tiles of ``src_dir`` into ``out_dir`` (new or empty); return ``{"tiles", "shards"}``.

    Every tile and sidecar is read and checked as `read_tile` does before it is packed; the first
    bad one stops the pack with its error. ``out_dir`` gets ``pack.json`` last.
    """
    from axs_lib.tiles import S1_KEYS, S2_KEYS, list_tiles, load_arrays, read_sidecar, sidecar_path

    if shard_tiles < 1:
        raise UsageError(f"--shard-tiles must be >= 1, got {shard_tiles}")
    refs = list_tiles(src_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(out_dir, "exists and is not an empty directory; packing writes a new one")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(refs), shard_tiles)):
        name = f"shard-{number:05d}{SHARD_SUFFIX}"
        entries, offset = [], 0
        with atomic_open(out_dir / name) as f:
            f.write(b"\0" * _HEADER_BYTES)
            for ref in refs[start:start + shard_tiles]:
                arrays = load_arrays(ref)
                meta = read_sidecar(ref) if sidecar_path(ref).exists() or is_packed_ref(ref) else None
                pad = -offset % ALIGN
                f.write(b"\0" * pad)
                offset += pad
                entries.append({"name": ref.stem, "offset": offset, "shape": list(arrays[S1_KEYS[0]].shape),
                                "dtypes": [arrays[k].dtype.str for k in (*S1_KEYS, *S2_KEYS)], "meta": meta})
                for key in (*S1_KEYS, *S2_KEYS):
                    data = np.ascontiguousarray(arrays[key]).tobytes()
                    f.write(data)
                    offset += len(data)
            f.seek(0)
            f.write(_npy_header(offset))
        # entry offsets count from the start of the array data, as np.load's map sees it
        atomic_write_text(out_dir / f"shard-{number:05d}.json", json.dumps({"tiles": entries}, ensure_ascii=False, separators=(",", ":")))
        shards.append({"file": name, "tiles": [e["name"] for e in entries]})
    doc = {"format": PACK_FORMAT, "version": PACK_VERSION, "num_tiles": len(refs), "shards": shards}
    atomic_write_text(out_dir / PACK_INDEX, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    return {"tiles": len(refs), "shards": len(shards)}
