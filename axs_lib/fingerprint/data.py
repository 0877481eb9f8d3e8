"""The data fingerprint: a content hash of the tiles a run uses and of its split.

* ``tiles_sha256``: SHA-256 over, for each tile in name order, its file name, the SHA-256 of its
  bytes and the SHA-256 of its sidecar's bytes (or a marker for "no sidecar"). Renaming, editing
  or re-splitting a tile changes it; moving the directory does not.
* ``split_sha256``: SHA-256 of the split manifest as canonical JSON (sorted keys, no spaces).
* ``sha256``: SHA-256 of the two above, the single value to compare.

Hashing 100k tiles takes a while, so per-file digests are cached on disk, one JSON file per data
directory under ``cache_dir`` (default ``$XDG_CACHE_HOME/axs`` or ``~/.cache/axs``), keyed by
file name, size and ``mtime_ns`` of the resolved file. A changed file has a new size or mtime and
is hashed again. Files modified within the last few seconds are not cached (their mtime could
still be shared with a later same-size edit). The cache is written atomically; a corrupt or
unwritable cache is ignored, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

from axs_lib.checkpoint import atomic_write_text
from axs_lib.errors import InputError
from axs_lib.tiles import SIDECAR_SUFFIX

CACHE_VERSION = 1
RACY_SECONDS = 3.0  # files newer than this are hashed but not cached
_CHUNK = 1 << 20
_NO_SIDECAR = "-"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/axs``, or ``~/.cache/axs``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "axs"


def file_sha256(path: os.PathLike | str) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _DigestCache:
    """Per-directory on-disk cache of file digests, keyed by (resolved path, size, mtime_ns)."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self.tables: dict[str, dict] = {}  # resolved directory -> {name: [size, mtime_ns, sha]}
        self.dirty: set[str] = set()
        self.now = time.time()

    def _file(self, directory: str) -> Path:
        return self.cache_dir / f"data-{hashlib.sha256(directory.encode()).hexdigest()[:24]}.json"

    def _table(self, directory: str) -> dict:
        if directory not in self.tables:
            try:
                doc = json.loads(self._file(directory).read_text(encoding="utf-8"))
                ok = doc.get("version") == CACHE_VERSION and doc.get("directory") == directory and isinstance(doc.get("files"), dict)
                self.tables[directory] = doc["files"] if ok else {}
            except (OSError, ValueError, AttributeError):
                self.tables[directory] = {}
        return self.tables[directory]

    def digest(self, path: str, real_dirs: dict[str, str]) -> str | None:
        """The file's SHA-256, from the cache when size and mtime match; None if it does not exist.

        Works on strings, not `Path`, and stats a regular file once: this loop is the whole cost
        of a cached fingerprint over 100k tiles.
        """
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                directory, name = os.path.split(os.path.realpath(path))
                st = os.stat(path)
            else:
                parent, name = os.path.split(path)
                if parent not in real_dirs:
                    real_dirs[parent] = os.path.realpath(parent or ".")
                directory = real_dirs[parent]
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InputError(path, f"cannot read: {exc.strerror}") from None
        table = self._table(directory)
        entry = table.get(name)
        if isinstance(entry, list) and len(entry) == 3 and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        try:
            sha = file_sha256(path)
        except OSError as exc:
            raise InputError(path, f"cannot read: {exc.strerror}") from None
        if self.now - st.st_mtime_ns / 1e9 > RACY_SECONDS:
            table[name] = [st.st_size, st.st_mtime_ns, sha]
            self.dirty.add(directory)
        return sha

    def save(self) -> None:
        for directory in sorted(self.dirty):
            doc = {"version": CACHE_VERSION, "directory": directory, "files": self.tables[directory]}
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self._file(directory), json.dumps(doc, separators=(",", ":")))
            except OSError:
                pass  # a cache we cannot write only costs time


def split_sha256(split_manifest: dict) -> str:
    """SHA-256 of a split manifest as canonical JSON."""
    return hashlib.sha256(json.dumps(split_manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def data_fingerprint(paths: list[Path], split_manifest: dict, cache_dir: os.PathLike | str | None = None) -> dict:
    """``{"sha256", "tiles_sha256", "split_sha256", "num_tiles"}`` for the tiles in ``paths`` and their split.

    Raises `InputError` naming a tile that is missing or unreadable.
    """
    cache = _DigestCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    real_dirs: dict[str, str] = {}
    tiles = hashlib.sha256()
    for path in sorted(map(os.fspath, paths), key=os.path.basename):
        tile_sha = cache.digest(path, real_dirs)
        if tile_sha is None:
            raise InputError(path, "no such file")
        side_sha = cache.digest(os.path.splitext(path)[0] + SIDECAR_SUFFIX, real_dirs) or _NO_SIDECAR
        tiles.update(f"{os.path.basename(path)}\0{tile_sha}\0{side_sha}\n".encode())
    cache.save()
    tiles_hex, split_hex = tiles.hexdigest(), split_sha256(split_manifest)
    return {
        "sha256": hashlib.sha256(f"tiles:{tiles_hex}\nsplit:{split_hex}\n".encode()).hexdigest(),
        "tiles_sha256": tiles_hex,
        "split_sha256": split_hex,
        "num_tiles": len(paths),
    }
