"""The data fingerprint: a content hash of the tiles a run uses and of its split.

What is hashed is the tiles' *content*, not their files, so a set packed with ``axs tiles pack``
has the fingerprint of the same tiles as per-tile ``.npz`` files:

* a tile's digest: SHA-256 over its six contract arrays in contract order, each as its name, its
  dtype (``<f4``, ``<u2``), its shape and its raw C-order bytes. Extra arrays (which no reader
  uses) and the zip container (member order, timestamps, compression) are not part of it;
* a sidecar's digest: SHA-256 of the checked metadata (`axs_lib.tiles.read_sidecar`, so
  ``validation`` reads as ``val``) as canonical JSON (sorted keys, no spaces, UTF-8), or ``-``
  when there is no sidecar or it holds ``{}``;
* ``tiles_sha256``: SHA-256 over, per tile in name order, ``<name>\\0<tile digest>\\0<sidecar digest>\\n``;
* ``split_sha256``: SHA-256 of the split manifest as canonical JSON;
* ``sha256``: SHA-256 of the two above, the single value to compare; ``scheme`` names this
  definition (`SCHEME`), so a fingerprint from another definition is recognised as such.

Digests are cached on disk (`axs_lib.tiles.StatCache`, under ``$XDG_CACHE_HOME/axs``), keyed by
the files' inode, size, ctime and mtime (`axs_lib.tiles.stat_key`): ``cp -p`` or ``touch -r`` can
put an mtime back but not a ctime, so a rewrite is always hashed again. Files changed in the last
few seconds are not cached. ``verify=True`` ignores the cache and hashes every tile's content
again: what a resume does before it accepts a run as exact.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from axs_lib.errors import InputError
from axs_lib.tiles import S1_KEYS, S2_KEYS, StatCache, default_cache_dir, load_arrays, read_sidecar, ref_key

SCHEME = "content-v2"
_NO_SIDECAR = "-"

__all__ = ["SCHEME", "data_fingerprint", "default_cache_dir", "file_sha256", "split_sha256", "tile_digests"]


def file_sha256(path: os.PathLike | str) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the six contract arrays: name, dtype, shape and C-order bytes of each."""
    h = hashlib.sha256()
    for key in (*S1_KEYS, *S2_KEYS):
        arr = np.ascontiguousarray(arrays[key])
        h.update(f"{key}\0{arr.dtype.str}\0{'x'.join(map(str, arr.shape))}\0".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def meta_sha256(meta: dict) -> str:
    """SHA-256 of checked sidecar metadata as canonical JSON; ``-`` for none."""
    if not meta:
        return _NO_SIDECAR
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def tile_digests(ref: os.PathLike | str) -> tuple[str, str]:
    """(tile digest, sidecar digest) of one tile, per-tile NPZ or packed, computed from content."""
    return arrays_sha256(load_arrays(ref)), meta_sha256(read_sidecar(ref))


def split_sha256(split_manifest: dict) -> str:
    """SHA-256 of a split manifest as canonical JSON."""
    return hashlib.sha256(json.dumps(split_manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def data_fingerprint(paths: list, split_manifest: dict, cache_dir: os.PathLike | str | None = None, *, verify: bool = False) -> dict:
    """``{"sha256", "tiles_sha256", "split_sha256", "num_tiles", "scheme"}`` for ``paths`` and their split.

    ``paths`` are tile refs (`axs_lib.tiles.list_tiles`). ``verify=True`` hashes every tile's
    content even when the cache has it. Raises `InputError` naming a tile that is missing or unreadable.
    """
    cache = StatCache("digests", cache_dir)
    tiles = hashlib.sha256()
    real_dirs: dict[str, str] = {}
    try:
        for ref in sorted(paths, key=lambda p: os.path.basename(os.fspath(p))):
            key = ref_key(ref, real_dirs)
            if key is None:
                raise InputError(os.fsencode(ref).decode("utf-8", "backslashreplace"), "no such file")
            directory, name, keys = key
            entry = name if name == os.path.basename(os.fspath(ref)) else f"{name}/{os.path.basename(os.fspath(ref))}"
            digests = None if verify else cache.get(directory, entry, keys)
            if not (isinstance(digests, list) and len(digests) == 2):
                digests = list(tile_digests(ref))
                cache.put(directory, entry, keys, digests)
            tiles.update(f"{os.path.basename(os.fspath(ref))}\0{digests[0]}\0{digests[1]}\n".encode("utf-8", "surrogateescape"))
    finally:
        cache.save()
    tiles_hex, split_hex = tiles.hexdigest(), split_sha256(split_manifest)
    return {
        "sha256": hashlib.sha256(f"tiles:{tiles_hex}\nsplit:{split_hex}\n".encode()).hexdigest(),
        "tiles_sha256": tiles_hex,
        "split_sha256": split_hex,
        "num_tiles": len(paths),
        "scheme": SCHEME,
    }
