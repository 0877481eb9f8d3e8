"""Packed tiles: many tiles in a few memory-mapped shards, each tile read with O(1) random access.

One ``.npz`` file per tile costs a file open, a zip directory parse and six small reads per
sample, and 550k files strain a filesystem. ``axs tiles pack DIR OUT`` writes the same tiles as:

* ``OUT/shard-00000.npy`` ...: a 1-D ``uint8`` ``.npy`` per `DEFAULT_SHARD_TILES` tiles, so
  ``np.load(path, mmap_mode="r")`` maps it without reading it. Each tile is its six contract
  arrays, raw C-order bytes in contract order, starting on a 64-byte boundary.
* ``OUT/shard-00000.json``: that shard's index, one entry per tile: name, byte offset, shape, the
  six dtypes, the XXH3-64 checksum of the tile's bytes (``xxh3``) and the sidecar metadata
  (``null`` when the tile had no sidecar).
* ``OUT/pack.json``: the format, and each shard's file names and tile names.

Integrity: a per-tile ``.npz`` has its zip CRC; a packed tile has its ``xxh3``, checked at every
read of the tile (XXH3 hashes at memory speed, a few tens of microseconds for a 120 x 120 tile), so
a flipped bit in a shard is one line naming the shard and the tile, never a silently wrong sample.
Format version 1 had no checksums: such a pack is refused with the command that rewrites it.

Sizes are bounded per tile, not per shard: a shard is mapped, never read whole, so a default
shard (4096 tiles, about 1.4 GB) is as cheap to open as a small one, while each tile's shape is
held to the tile limits and its bytes to the span of the file.

Names: every tile name in an index becomes part of a path (``<shard>/<name>.npz``), so each must
be a plain name (`axs_lib.tiles.name_problem`) and appear once in the pack.

A packed tile's ref is a path *inside* its shard, ``OUT/shard-00000.npy/<stem>.npz``: its ``name``
and ``stem`` are those of the unpacked tile, so split manifests, data fingerprints and logs read
the same, and `axs_lib.tiles.read_tile` stays the one way a tile is read: this module is the
`axs_lib.tile_store.TileStore` (`STORE`) that `tiles` asks for such a path, and it takes the tile
contract from `tiles`, which imports nothing from here. Reading maps the shard once per process
and slices it: no per-tile file is opened.

Packing writes into a new (or empty) directory, every file atomically, the index last, so an
interrupted pack is never mistaken for a complete one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import xxhash

from axs_lib.atomic import atomic_open, atomic_write_text
from axs_lib.errors import InputError, UsageError
from axs_lib.tiles import (S1_KEYS, S2_KEYS, check_regular_file, check_shape_limits, list_tiles, load_arrays, name_problem,
                           read_json_file, read_sidecar, sidecar_path)

PACK_INDEX = "pack.json"
PACK_FORMAT = "axs-packed-tiles"
PACK_VERSION = 2  # 1: no per-tile checksums (refused: repack)
SHARD_SUFFIX = ".npy"
DEFAULT_SHARD_TILES = 4096  # about 1.4 GB of 120 x 120 float32 tiles per shard
ALIGN = 64
_HEADER_BYTES = 128
MAX_INDEX_BYTES = 1 << 30  # pack.json of 550k names is ~40 MB; a shard index ~3 MB per 4096 tiles
# A shard is memory-mapped, never read whole: its size costs nothing, so it is not held to the
# per-tile limit (every tile in it is). This bound only keeps offsets in a sane integer range.
MAX_SHARD_BYTES = 1 << 48

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
    doc = read_json_file(path, "pack index", limit=MAX_INDEX_BYTES)
    if not isinstance(doc, dict):
        raise InputError(path, "pack index must hold a JSON object")
    return doc


def pack_index(directory: os.PathLike | str) -> dict:
    """The checked ``pack.json`` of a packed directory."""
    path = Path(directory) / PACK_INDEX
    doc = _read_json(path)
    if doc.get("format") == PACK_FORMAT and doc.get("version") == 1:
        raise InputError(path, "a version 1 pack, written before shards carried checksums; pack the tiles again "
                               "(axs tiles pack TILES_DIR NEW_DIR) to read them with integrity checks")
    if doc.get("format") != PACK_FORMAT or doc.get("version") != PACK_VERSION:
        raise InputError(path, f"not a {PACK_FORMAT} version {PACK_VERSION} index (format {_short(doc.get('format'))}, version {_short(doc.get('version'))})")
    shards = doc.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tiles"), list) for s in shards
    ):
        raise InputError(path, "malformed shard list")
    names: set[str] = set()
    for shard in shards:
        if name_problem(shard["file"]) or not shard["file"].endswith(SHARD_SUFFIX):
            raise InputError(path, f"shard file name {_short(shard['file'])} must be a plain *{SHARD_SUFFIX} name in the directory")
        for row, name in enumerate(shard["tiles"]):
            problem = name_problem(name)
            if problem:
                raise InputError(path, f"shard {shard['file']}, tile {row}: name {problem}")
            if name in names:
                raise InputError(path, f"shard {shard['file']}, tile {row}: name {name!r} appears twice in the pack")
            names.add(name)
    return doc


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def list_packed(directory: os.PathLike | str, max_tiles: int | None = None) -> list[Path]:
    """Refs of the packed tiles of ``directory``, sorted by tile name, the first ``max_tiles``."""
    directory = Path(directory)
    refs = []
    for shard in pack_index(directory)["shards"]:
        base = directory / shard["file"]
        refs.extend(base / f"{name}.npz" for name in shard["tiles"])
    refs.sort(key=lambda p: p.name)
    if not refs:
        raise InputError(directory / PACK_INDEX, "no tiles in the pack")
    return refs[:max_tiles]


class _Shard:
    """A mapped shard and its index; slices are views of the map until copied."""

    def __init__(self, path: str):
        self.path = path
        self.key: tuple | None = None
        check_regular_file(Path(path), MAX_SHARD_BYTES, "shard")
        index_path = Path(path).with_suffix(".json")
        index = _read_json(index_path)
        tiles = index.get("tiles")
        if not isinstance(tiles, list):
            raise InputError(index_path, "malformed shard index: no tile list")
        self.entries = {}
        for row, entry in enumerate(tiles):
            if not isinstance(entry, dict):
                raise InputError(index_path, f"malformed shard index entry {row}: not an object")
            problem = name_problem(entry.get("name"))
            if problem:
                raise InputError(index_path, f"shard index entry {row}: name {problem}")
            if entry["name"] in self.entries:
                raise InputError(index_path, f"shard index entry {row}: name {entry['name']!r} appears twice")
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
        entry = self.entry(ref)
        keys = (*S1_KEYS, *S2_KEYS)
        tile = os.path.basename(ref)
        try:
            offset, shape, dtypes = _int(entry["offset"]), [_int(v) for v in entry["shape"]], list(entry["dtypes"])
            checksum = entry["xxh3"]
        except (KeyError, TypeError, ValueError):
            raise InputError(self.path, f"tile {tile}: malformed shard index entry") from None
        if len(shape) != 2 or len(dtypes) != len(keys) or offset < 0 or not isinstance(checksum, str):
            raise InputError(self.path, f"tile {tile}: malformed shard index entry")
        for key, dtype in zip(keys, dtypes):
            # only the contract's little-endian dtypes: np.dtype() of an index string could name an
            # object dtype, which no buffer may be read as
            if dtype not in (_F4,) + (() if key in S1_KEYS else (_U2,)):
                raise InputError(self.path, f"tile {tile}: {key} has dtype {_short(dtype)} in the shard index, expected {_F4}" + ("" if key in S1_KEYS else f" or {_U2}"))
        h, w = shape
        check_shape_limits(ref, (h, w))
        sizes = [h * w * np.dtype(d).itemsize for d in dtypes]
        end = offset + sum(sizes)
        if end > self.data.shape[0]:
            raise InputError(self.path, f"truncated shard: tile {tile} ends past the end of the file")
        got = xxhash.xxh3_64_hexdigest(self.data[offset:end])
        if got != checksum:
            raise InputError(self.path, f"tile {tile}: checksum mismatch (index says xxh3 {_short(checksum)}, the bytes give {got}): the shard is corrupted")
        arrays = {}
        for key, dtype, size in zip(keys, dtypes, sizes):
            arrays[key] = np.frombuffer(self.data, dtype=np.dtype(dtype), count=h * w, offset=offset).reshape(h, w)
            offset += size
        return arrays


_F4, _U2 = np.dtype(np.float32).newbyteorder("<").str, np.dtype(np.uint16).newbyteorder("<").str


def _int(value) -> int:
    """An integer from an index: a JSON integer, not a bool, a float or a string that int() takes."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value


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


def ref_files(ref: str) -> tuple[str, str]:
    """(shard, shard index) of a packed tile's ref, as strings: what a stat cache keys it on."""
    shard = os.path.dirname(ref)
    return shard, shard[: -len(SHARD_SUFFIX)] + ".json"


class PackedStore:
    """Packed directories as an `axs_lib.tile_store.TileStore`: how `axs_lib.tiles` lists and reads them."""

    holds_dir = staticmethod(is_packed_dir)
    holds_ref = staticmethod(is_packed_ref)
    list_tiles = staticmethod(list_packed)
    read_arrays = staticmethod(read_packed_arrays)
    read_meta = staticmethod(read_packed_meta)
    ref_files = staticmethod(ref_files)


STORE = PackedStore()  # named in axs_lib.tile_store.KNOWN_STORES


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
                checksum = xxhash.xxh3_64()
                entry = {"name": ref.stem, "offset": offset, "shape": list(arrays[S1_KEYS[0]].shape),
                         "dtypes": [arrays[k].dtype.newbyteorder("<").str for k in (*S1_KEYS, *S2_KEYS)]}
                for key in (*S1_KEYS, *S2_KEYS):
                    data = np.ascontiguousarray(arrays[key], dtype=arrays[key].dtype.newbyteorder("<")).tobytes()
                    checksum.update(data)
                    f.write(data)
                    offset += len(data)
                entries.append({**entry, "xxh3": checksum.hexdigest(), "meta": meta})
            f.seek(0)
            f.write(_npy_header(offset))
        # entry offsets count from the start of the array data, as np.load's map sees it
        atomic_write_text(out_dir / f"shard-{number:05d}.json", json.dumps({"tiles": entries}, ensure_ascii=False, separators=(",", ":")))
        shards.append({"file": name, "tiles": [e["name"] for e in entries]})
    doc = {"format": PACK_FORMAT, "version": PACK_VERSION, "num_tiles": len(refs), "shards": shards}
    atomic_write_text(out_dir / PACK_INDEX, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    return {"tiles": len(refs), "shards": len(shards)}
