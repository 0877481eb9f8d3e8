"""The tile contract: what a ``<stem>.npz`` tile and its ``<stem>.json`` sidecar must hold, checked.

A tile is one ``.npz`` file of 2-D arrays of one shape:

* ``s1_vv``, ``s1_vh``: Sentinel-1 backscatter in dB, float32;
* ``s2_b2``, ``s2_b3``, ``s2_b4``, ``s2_b8``: Sentinel-2 surface reflectance x 10000, float32 or
  uint16.

NaN marks an invalid pixel. Extra arrays are allowed and ignored. An optional sidecar beside it
carries metadata (`SIDECAR_FIELDS`); every field is optional, and a tile without a sidecar is valid.

`read_tile` is strict about structure (it raises `InputError` naming the file and the problem);
`validate_tile` also checks that the values are plausible, so that a tile in linear power or in
0..1 reflectance is caught before it silently trains a bad model.

Tiles kept in another layout (the packed shards of `axs_lib.packed`) are listed and read here too:
this module asks the `axs_lib.tile_store.TileStore` that claims the directory or ref, and checks
what it returns like a ``.npz`` tile. It imports no store.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
import stat
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from axs_lib.bounded_read import NO_SUCH_FILE, display_path, kind_of, open_regular, os_problem, read_regular
from axs_lib.errors import InputError
from axs_lib.tile_store import store_for_dir, store_for_ref

S1_KEYS = ("s1_vv", "s1_vh")
S2_KEYS = ("s2_b2", "s2_b3", "s2_b4", "s2_b8")
TILE_SUFFIX = ".npz"
SIDECAR_SUFFIX = ".json"

# Fixed normalisation ranges. Values are clipped to the range and mapped linearly to [0, 1]; they
# are constants (not dataset statistics) so that a tile normalises the same way in every run and
# every subset. SAR: -40 dB (calm water, below the noise floor) to +10 dB (bright urban, corner
# reflectors) covers nearly all Sentinel-1 IW GRD backscatter (the demo tiles span -38..+9.7 dB).
# Optical: 0 to 10000 is reflectance 0..1; brighter pixels (snow, cloud) saturate at 1.
SAR_DB_RANGE = (-40.0, 10.0)
OPTICAL_RANGE = (0.0, 10000.0)

# Plausibility limits used by `validate_tile` (wider than the normalisation ranges on purpose:
# they catch wrong units, not unusual scenes).
SAR_DB_PLAUSIBLE = (-60.0, 40.0)
OPTICAL_PLAUSIBLE = (-2000.0, 30000.0)
OPTICAL_UNIT_SCALE_MAX = 2.0  # all reflectances <= 2 means 0..1 units, not x 10000
MIN_VALID_FRACTION = 0.1

# Size limits. Every file we read is a regular file of bounded size, and a tile's arrays are
# bounded before anything is inflated or allocated: a hostile or broken file gets one line, never
# a hang (a FIFO), an endless read (/dev/zero) or an allocation of gigabytes (a zip bomb, a .npy
# header that claims a huge shape).
MIN_TILE_PX = 4  # smallest side: below it there are too few pixels to judge plausibility
MAX_TILE_PX = 4096  # largest side: 34x a BigEarthNet patch; 400 MB as six float32 bands
MAX_SIDECAR_BYTES = 1 << 20
MAX_TILE_BYTES = 6 * MAX_TILE_PX * MAX_TILE_PX * 4 + (1 << 20)
_NPY_MAX_HEADER = 1 << 16

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val"}  # BigEarthNet v2 writes "validation"

# Known sidecar fields and their kind. A field that is absent is fine; one that is present must
# have its kind. Unknown fields are kept and not checked. docs/metadata_handling.md describes them.
SIDECAR_FIELDS: dict[str, str] = {
    "tile_id": "string",
    "split": "string",
    "s1_patch": "string",
    "s2_patch": "string",
    "s1_product": "string",
    "s2_product": "string",
    "s1_acquisition": "string",
    "s2_acquisition": "string",
    "crs": "string",
    "bounds": "bounds",
    "labels": "string list",
    "quality_flags": "string list",
    "country": "string",
    "season": "string",
    "source": "string",
    "synthetic": "boolean",
}
_KIND_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "string list": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "bounds": lambda v: isinstance(v, list)
    and len(v) == 4
    and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v),
}
_KIND_WORDS = {
    "string": "a string",
    "boolean": "true or false",
    "string list": "a list of strings",
    "bounds": "a list of 4 finite numbers [left, bottom, right, top]",
}

# A tile's name (its stem) becomes a file name in an output directory, so a name read from any
# input file (a metadata table, a pack index, a patch's metadata) must be a plain name: no path
# separator, not "." or "..", no control character (it would break the one-line messages), and
# short enough that "<name>.json" and its temp file ".<name>.json.XXXXXXXX.tmp" fit in 255 bytes.
MAX_NAME_BYTES = 200
_CONTROL = re.compile("[\x00-\x1f\x7f]")  # one regex search: this runs on every row of a 550k-row table


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a tile's or a patch's name (a phrase), or None when it is a plain name."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"{name!r} is not a plain name"
    if "/" in name or "\\" in name:
        return f"{name[:80]!r} holds a path separator; a plain name is required"
    if _CONTROL.search(name):
        return f"{name[:80]!r} holds a control character"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"is {len(name.encode('utf-8', 'surrogateescape'))} bytes long, more than the {MAX_NAME_BYTES} allowed"
    return None


@dataclass
class Tile:
    """A decoded tile: ``sar`` (2, H, W) dB and ``optical`` (4, H, W) reflectance x 10000, float32."""

    sar: np.ndarray
    optical: np.ndarray
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- listing


def _scan(data_dir: os.PathLike | str) -> list[os.DirEntry]:
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise InputError(data_dir, "no such directory")
    if not data_dir.is_dir():
        raise InputError(data_dir, "not a directory")
    try:
        with os.scandir(data_dir) as it:
            entries = sorted((e for e in it if e.name.endswith(TILE_SUFFIX)), key=lambda e: e.name)
    except OSError as exc:
        raise InputError(data_dir, f"cannot list: {exc.strerror}") from None
    if not entries:
        raise InputError(data_dir, f"no {TILE_SUFFIX} tiles found")
    _check_stems_unique(data_dir, [e.name for e in entries])
    return entries


def scan_tiles(data_dir: os.PathLike | str) -> list[Path]:
    """Every ``*.npz`` entry directly in ``data_dir`` (or every tile of a pack), sorted by name, readable or not.

    Not recursive, so directory symlink loops cannot trap it. Used by ``axs tiles validate``,
    which must report broken entries rather than stop at the first.
    """
    store = store_for_dir(data_dir)
    if store is not None:
        return store.list_tiles(data_dir)
    return [Path(data_dir) / e.name for e in _scan(data_dir)]


def list_tiles(data_dir: os.PathLike | str, max_tiles: int | None = None) -> list[Path]:
    """The tiles of ``data_dir`` sorted by file name; the first ``max_tiles`` of them when given.

    A directory of another tile store (`axs_lib.tile_store`; ``axs tiles pack`` writes one) gives
    that store's refs, which every reader here takes like tile paths.

    Raises `InputError` naming the directory when it is missing, not a directory, holds no tiles,
    or ``max_tiles`` < 1; and naming the entry when a selected ``.npz`` is not a readable regular
    file (a broken symlink, a symlink loop, a directory).
    """
    if max_tiles is not None and max_tiles < 1:
        raise InputError(data_dir, f"--max-tiles must be >= 1, got {max_tiles}")
    store = store_for_dir(data_dir)
    if store is not None:
        return store.list_tiles(data_dir, max_tiles)
    entries = _scan(data_dir)[:max_tiles]
    paths = [Path(data_dir) / e.name for e in entries]
    for entry, path in zip(entries, paths):
        if not _is_file(entry):  # cheap: no system call for a plain file on most filesystems
            raise InputError(path, _not_a_regular_file(path) or "not a regular file")
    return paths


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop raises instead of answering
        return False


def _not_a_regular_file(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError as exc:
        if path.is_symlink():
            return f"broken symlink or symlink loop ({exc.strerror})"
        return f"cannot read: {exc.strerror}"
    if not (st.st_mode & 0o170000 == 0o100000):
        return "not a regular file"
    return None


def _check_stems_unique(data_dir: Path, names: list[str]) -> None:
    """Refuse stems that differ only in letter case: they collide on case-insensitive filesystems
    and would make the split manifest (which records stems) ambiguous."""
    seen: dict[str, str] = {}
    for name in names:
        key = name.casefold()
        if key in seen:
            raise InputError(data_dir, f"tile names {seen[key]!r} and {name!r} differ only in letter case; rename one")
        seen[key] = name


def sidecar_path(tile_path: os.PathLike | str) -> Path:
    """``<stem>.json`` beside ``<stem>.npz``."""
    return Path(os.path.splitext(tile_path)[0] + SIDECAR_SUFFIX)


# --------------------------------------------------------------------------- reading


def _read_bounded(path: Path, limit: int, what: str) -> bytes | None:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; None if it does not exist.

    Read through `axs_lib.bounded_read` (non-blocking open, ``fstat`` on the open descriptor, at
    most ``limit + 1`` bytes), so a FIFO is refused instead of hanging and a link to a device
    instead of reading forever; ``what`` (``sidecar``, ``pack index``) opens the message.
    """
    try:
        return read_regular(path, limit, subject=what)
    except InputError as exc:
        if exc.problem == NO_SUCH_FILE:
            return None
        raise


def check_regular_file(path: Path, limit: int = MAX_TILE_BYTES, what: str = "file") -> os.stat_result:
    """``stat`` of ``path`` when it is a regular file of at most ``limit`` bytes; `InputError` otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(display_path(path), "broken symlink" if os.path.islink(path) else "no such file") from None
    except OSError as exc:
        raise InputError(display_path(path), os_problem(exc, what)) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(display_path(path), f"{what} is {kind_of(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise InputError(display_path(path), f"{what} is {st.st_size} bytes, more than the {limit} allowed")
    return st


def read_json_file(path: Path, what: str, limit: int = MAX_SIDECAR_BYTES):
    """Parse a small JSON file; `InputError` for anything but a regular file of valid JSON."""
    data = _read_bounded(path, limit, what)
    if data is None:
        raise InputError(display_path(path), f"no such {what}")
    return _parse_json(path, data, what)


class _JsonProblem(ValueError):
    """Valid to Python's lenient parser, refused by ours: a repeated key or a NaN/Infinity literal."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads keeps the last of two equal keys; a file that says "split" twice says two things
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _JsonProblem(f"key {json.dumps(key)[:80]} appears twice in one object")
        seen[key] = value
    return seen


def _no_constant(name: str):
    raise _JsonProblem(f"{name} is not a JSON number")


def parse_json_strict(text: str):
    """``json.loads`` that refuses what RFC 8259 does not allow and Python accepts: a key repeated
    in one object, and the literals NaN, Infinity and -Infinity. Raises ValueError."""
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _parse_json(path: Path, data: bytes, what: str):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(display_path(path), f"{what} is not UTF-8 text (byte {exc.start})") from None
    try:
        return parse_json_strict(text)
    except json.JSONDecodeError as exc:
        raise InputError(display_path(path), f"invalid JSON in {what}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except _JsonProblem as exc:
        raise InputError(display_path(path), f"invalid JSON in {what}: {exc}") from None
    except RecursionError:
        raise InputError(display_path(path), f"{what} nests JSON too deeply") from None


def read_sidecar(tile_path: os.PathLike | str) -> dict:
    """The tile's sidecar metadata, checked, with ``split`` normalised; ``{}`` when there is none.

    For a tile of another store (a packed tile) the metadata comes from the store (the shard's
    index) and gets the same checks.
    """
    store = store_for_ref(tile_path)
    if store is not None:
        meta = store.read_meta(tile_path)
        path = Path(tile_path)
        if meta is None:
            return {}
    else:
        path = sidecar_path(tile_path)
        data = _read_bounded(path, MAX_SIDECAR_BYTES, "sidecar")
        if data is None:
            return {}
        meta = _parse_json(path, data, "sidecar")
    if not isinstance(meta, dict):
        raise InputError(display_path(path), f"sidecar must hold a JSON object, got {type(meta).__name__}")
    for name, value in meta.items():
        problem = _field_problem(name, value)
        if problem:
            raise InputError(display_path(path), problem)
    if "split" in meta:
        meta["split"] = SPLIT_ALIASES.get(meta["split"], meta["split"])
    return meta


def _field_problem(name: str, value: Any) -> str | None:
    if name not in SIDECAR_FIELDS:
        return None  # extra fields are allowed and kept
    kind = SIDECAR_FIELDS[name]
    if not _KIND_CHECKS[kind](value):
        return f"sidecar field {name!r} must be {_KIND_WORDS[kind]}, got {json.dumps(value)[:80]}"
    if name == "split" and SPLIT_ALIASES.get(value, value) not in SPLITS:
        return f"sidecar field 'split' is {json.dumps(value)}, expected one of train, val, test (or validation)"
    return None


def load_arrays(path: os.PathLike | str) -> dict[str, np.ndarray]:
    """The six contract arrays of a tile, structurally checked; raises `InputError` on the first problem.

    Sizes are bounded before anything is inflated or allocated: the file, each zip member's
    declared size (zipfile never inflates a member past it), and each array's shape from its
    ``.npy`` header, which must fit in its member.
    """
    store = store_for_ref(path)
    if store is not None:
        arrays = store.read_arrays(path)
        check_arrays(path, arrays)
        return arrays
    path = Path(path)
    st = check_regular_file(path, MAX_TILE_BYTES, "tile")
    if st.st_size == 0:
        raise InputError(display_path(path), "empty file (0 bytes), not an .npz tile")
    try:
        with open_regular(path, subject="tile") as f:  # non-blocking, checked on the descriptor (bounded_read)
            if not zipfile.is_zipfile(f):
                raise InputError(display_path(path), "truncated or not an .npz file (no zip archive found)")
            with zipfile.ZipFile(f) as zf:
                members = {info.filename: info for info in zf.infolist()}
                missing = [k for k in (*S1_KEYS, *S2_KEYS) if f"{k}.npy" not in members]
                if missing:
                    have = ", ".join(sorted(n.removesuffix(".npy") for n in members)) or "nothing"
                    raise InputError(display_path(path), f"missing array {missing[0]!r} (has: {have[:200]})")
                arrays = {key: _read_member(path, zf, members[f"{key}.npy"], key) for key in (*S1_KEYS, *S2_KEYS)}
    except InputError:
        raise
    except PermissionError:
        raise InputError(display_path(path), "cannot read tile: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - zipfile/zlib/numpy raise many types for bad bytes
        raise InputError(display_path(path), f"truncated or corrupted .npz: {_first_line(exc)}") from None
    check_arrays(path, arrays)
    return arrays


def _read_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    """One ``.npy`` member, its header checked against the limits and its declared size first."""
    if info.file_size > MAX_TILE_BYTES:
        raise InputError(display_path(path), f"{key} declares {info.file_size} bytes, more than a {MAX_TILE_PX} px tile holds")
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise InputError(display_path(path), f"{key}: unsupported .npy version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f, max_header_size=_NPY_MAX_HEADER)
        if dtype.hasobject:
            raise InputError(display_path(path), "holds pickled object arrays; refused")
        if len(shape) != 2:
            raise InputError(display_path(path), f"{key} is {len(shape)}-D with shape {tuple(shape)}, expected 2-D")
        check_shape_limits(path, shape, key)
        nbytes = shape[0] * shape[1] * dtype.itemsize
        if nbytes > info.file_size:
            raise InputError(display_path(path), f"{key}: header says {tuple(shape)} {dtype} ({nbytes} bytes) but the member holds {info.file_size}")
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise InputError(display_path(path), f"truncated or corrupted .npz: {key} has {len(data)} of {nbytes} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def check_shape_limits(path: os.PathLike | str, shape, key: str = "tile") -> None:
    """Refuse a tile side outside `MIN_TILE_PX`..`MAX_TILE_PX` (an empty array included)."""
    if any(side == 0 for side in shape):
        raise InputError(display_path(path), f"arrays are empty (shape {tuple(shape)})")
    if min(shape) < MIN_TILE_PX or max(shape) > MAX_TILE_PX:
        raise InputError(display_path(path), f"{key} is {'x'.join(map(str, shape))} px; tile sides must be {MIN_TILE_PX} to {MAX_TILE_PX} px")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def check_arrays(path: os.PathLike | str, arrays: dict[str, np.ndarray]) -> None:
    """Raise `InputError` naming ``path`` unless the six arrays meet the contract (2-D, dtype,
    one shape, not empty, no inf, not all NaN). Shared by `load_arrays` and the converters."""
    for key, arr in arrays.items():
        if arr.ndim != 2:
            raise InputError(display_path(path), f"{key} is {arr.ndim}-D with shape {arr.shape}, expected 2-D")
        allowed = (np.float32,) if key in S1_KEYS else (np.float32, np.uint16)
        if arr.dtype not in allowed:
            expected = " or ".join(np.dtype(d).name for d in allowed)
            raise InputError(display_path(path), f"{key} has dtype {arr.dtype}, expected {expected}")
    shapes = {key: arr.shape for key, arr in arrays.items()}
    first = S1_KEYS[0]
    for key, shape in shapes.items():
        if shape != shapes[first]:
            raise InputError(display_path(path), f"arrays differ in shape: {first} {shapes[first]}, {key} {shape}")
    check_shape_limits(path, shapes[first])
    for key, arr in arrays.items():
        if arr.dtype.kind != "f":
            continue
        n_inf = int(np.isinf(arr).sum())
        if n_inf:
            raise InputError(display_path(path), f"{key} has {n_inf} infinite value(s); mark invalid pixels with NaN")
        if np.isnan(arr).all():
            raise InputError(display_path(path), f"{key} is all NaN (no valid pixel)")


def read_tile(path: os.PathLike | str) -> Tile:
    """Decode and check a tile and its sidecar; raise `InputError` naming the file and the problem."""
    arrays = load_arrays(path)
    sar = np.stack([arrays[k] for k in S1_KEYS]).astype(np.float32, copy=False)
    optical = np.stack([arrays[k] for k in S2_KEYS]).astype(np.float32, copy=False)
    return Tile(sar=sar, optical=optical, meta=read_sidecar(path))


# --------------------------------------------------------------------------- validation


def validate_tile(path: os.PathLike | str) -> list[str]:
    """Every problem with a tile and its sidecar, as short phrases; empty when the tile is good.

    Structural problems (as `read_tile` raises them) come first; when the arrays load, the values
    are checked for plausibility: SAR in dB (not linear power), optical as reflectance x 10000
    (not 0..1), and at least `MIN_VALID_FRACTION` of pixels valid in every band.
    """
    problems = []
    arrays = None
    try:
        arrays = load_arrays(path)
    except InputError as exc:
        problems.append(exc.problem)
    try:
        read_sidecar(path)
    except InputError as exc:
        problems.append(f"{Path(exc.path).name}: {exc.problem}")
    if arrays is not None:
        problems.extend(_plausibility_problems(arrays))
    return problems


def _plausibility_problems(arrays: dict[str, np.ndarray]) -> list[str]:
    problems = []
    for key in S1_KEYS:
        values = arrays[key][np.isfinite(arrays[key])]
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0:
            problems.append(f"{key} is never negative ({lo:.3g}..{hi:.3g}): looks like linear power or amplitude, expected dB")
        elif lo < SAR_DB_PLAUSIBLE[0] or hi > SAR_DB_PLAUSIBLE[1]:
            problems.append(f"{key} spans {lo:.3g}..{hi:.3g} dB, outside the plausible {SAR_DB_PLAUSIBLE[0]:g}..{SAR_DB_PLAUSIBLE[1]:g} dB")
    peaks = []
    for key in S2_KEYS:
        arr = arrays[key]
        values = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        lo, hi = float(values.min()), float(values.max())
        peaks.append(hi)
        if lo < OPTICAL_PLAUSIBLE[0] or hi > OPTICAL_PLAUSIBLE[1]:
            problems.append(f"{key} spans {lo:.6g}..{hi:.6g}, outside the plausible {OPTICAL_PLAUSIBLE[0]:g}..{OPTICAL_PLAUSIBLE[1]:g}")
    # Units are judged on the tile, not per band: one band can be legitimately tiny (NIR over
    # calm water is 0..a few counts), but four bands all peaking at <= 2 are reflectance 0..1.
    if 0.0 < max(peaks) <= OPTICAL_UNIT_SCALE_MAX:
        problems.append(f"optical bands peak at {max(peaks):.3g}: looks like reflectance 0..1, expected reflectance x 10000")
    valid = valid_mask(arrays)
    fraction = float(valid.mean())
    if fraction < MIN_VALID_FRACTION:
        problems.append(f"only {fraction:.1%} of pixels are valid in every band (minimum {MIN_VALID_FRACTION:.0%})")
    return problems


def valid_mask(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """True where every SAR and optical band is finite."""
    mask = np.ones(arrays[S1_KEYS[0]].shape, dtype=bool)
    for key in (*S1_KEYS, *S2_KEYS):
        if arrays[key].dtype.kind == "f":
            mask &= np.isfinite(arrays[key])
    return mask


# --------------------------------------------------------------------------- summary


def tile_shape(path: os.PathLike | str) -> tuple[int, ...] | None:
    """The shape of a tile's ``s1_vv`` read from its .npy header only, or None when unreadable."""
    store = store_for_ref(path)
    if store is not None:
        try:
            return tuple(store.read_arrays(path)[S1_KEYS[0]].shape)
        except InputError:
            return None
    try:
        check_regular_file(Path(path), MAX_TILE_BYTES, "tile")
        # opened non-blocking and checked on the descriptor: a FIFO swapped in after the check must not block
        with open_regular(path, subject="tile") as raw, zipfile.ZipFile(raw) as zf, zf.open(f"{S1_KEYS[0]}.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(f)
    except Exception:  # noqa: BLE001 - any unreadable tile simply has no shape
        return None
    return tuple(shape)


def summarize(data_dir: os.PathLike | str) -> dict:
    """What the tiles' metadata says: counts by split, date range, countries, products, labels, sizes.

    Reads only sidecars and array headers, so it is fast on large sets. Tiles whose sidecar or
    header cannot be read are counted under ``unreadable`` (``axs tiles validate`` says why).
    """
    paths = scan_tiles(data_dir)
    splits: collections.Counter = collections.Counter()
    countries: collections.Counter = collections.Counter()
    labels: collections.Counter = collections.Counter()
    sizes: collections.Counter = collections.Counter()
    products: collections.Counter = collections.Counter()
    dates: list[str] = []
    synthetic = unreadable = 0
    for path in paths:
        shape = tile_shape(path)
        try:
            meta = read_sidecar(path)
        except InputError:
            meta = None
        if shape is None or meta is None:
            unreadable += 1
            continue
        sizes["x".join(map(str, shape))] += 1
        splits[meta.get("split", "none")] += 1
        if "country" in meta:
            countries[meta["country"]] += 1
        labels.update(meta.get("labels", []))
        for key in ("s1_product", "s2_product"):
            if key in meta:
                products[meta[key].split("_")[0]] += 1  # mission and product level, e.g. S2A
        dates.extend(meta[k][:10] for k in ("s1_acquisition", "s2_acquisition") if k in meta)
        synthetic += bool(meta.get("synthetic", False))
    return {
        "directory": str(data_dir),
        "num_tiles": len(paths),
        "unreadable": unreadable,
        "synthetic": synthetic,
        "by_split": dict(sorted(splits.items())),
        "date_range": [min(dates), max(dates)] if dates else None,
        "countries": dict(sorted(countries.items())),
        "platforms": dict(sorted(products.items())),
        "labels": dict(sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))),
        "tile_sizes": dict(sorted(sizes.items())),
    }


# --------------------------------------------------------------------------- checks and their cache


RACY_SECONDS = 3.0  # files changed more recently than this are checked/hashed but not cached
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/axs``, or ``~/.cache/axs``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "axs"


def stat_key(st: os.stat_result) -> list[int]:
    """What a cache entry is keyed on: inode, size, ctime and mtime (ns).

    ``ctime`` is the reason: a program can set mtime back (``cp -p``, ``touch -r``, ``rsync -t``)
    but not ctime, which the kernel sets on every write, rename or chmod; the inode catches a file
    replaced by another. A rewrite that keeps all four is not possible through the filesystem API.
    """
    return [st.st_ino, st.st_size, st.st_ctime_ns, st.st_mtime_ns]


def ref_key(ref: os.PathLike | str, real_dirs: dict[str, str] | None = None) -> tuple[str, str, list] | None:
    """(directory, entry name, stat keys) of a tile ref, covering tile and sidecar (a store's
    `TileStore.ref_files`: shard and index for a packed tile); None when the tile does not exist. Raises `InputError` if it is not a file.

    Works on strings, not `Path`, and resolves each directory once (``real_dirs`` memoises it
    across calls): this is the whole per-tile cost of a cached start.
    """
    ref = os.fspath(ref)
    store = store_for_ref(ref)
    if store is not None:
        files = store.ref_files(ref)
    else:
        files = (ref, os.path.splitext(ref)[0] + SIDECAR_SUFFIX)
    directory, name = os.path.split(files[0])
    keys = []
    for i, file in enumerate(files):
        try:
            st = os.stat(file)
        except FileNotFoundError:
            if i == 0:
                return None
            keys.append(None)
            continue
        except OSError as exc:
            raise InputError(display_path(file), os_problem(exc, "file")) from None
        if not stat.S_ISREG(st.st_mode):
            raise InputError(display_path(file), f"{'tile' if i == 0 else 'sidecar'} is {kind_of(st.st_mode)}, not a regular file")
        keys.append(stat_key(st))
    real_dirs = {} if real_dirs is None else real_dirs
    if directory not in real_dirs:
        real_dirs[directory] = os.path.realpath(directory or ".")
    return real_dirs[directory], name, keys


class StatCache:
    """Per-directory JSON tables ``{entry name: [stat keys, value]}`` under ``cache_dir``, one file per
    (kind, directory). A value is reused only while the stat keys match; a corrupt or unwritable
    cache costs time, never an error."""

    def __init__(self, kind: str, cache_dir: os.PathLike | str | None = None):
        self.kind = kind
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.tables: dict[str, dict] = {}
        self.dirty: set[str] = set()
        self.now_ns = time.time_ns()

    def _file(self, directory: str) -> Path:
        return self.cache_dir / f"{self.kind}-{hashlib.sha256(os.fsencode(directory)).hexdigest()[:24]}.json"

    def _table(self, directory: str) -> dict:
        if directory not in self.tables:
            try:
                doc = json.loads(self._file(directory).read_text(encoding="utf-8"))
                ok = doc.get("version") == CACHE_VERSION and doc.get("directory") == display_path(directory) and isinstance(doc.get("files"), dict)
                self.tables[directory] = doc["files"] if ok else {}
            except (OSError, ValueError, AttributeError, RecursionError):
                self.tables[directory] = {}
        return self.tables[directory]

    def get(self, directory: str, name: str, keys: list):
        entry = self._table(directory).get(display_path(name))
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == keys:
            return entry[1]
        return None

    def put(self, directory: str, name: str, keys: list, value) -> None:
        newest = max(k[2] for k in keys if k is not None)
        if self.now_ns - newest > RACY_SECONDS * 1e9:
            self._table(directory)[display_path(name)] = [keys, value]
            self.dirty.add(directory)

    def save(self) -> None:
        for directory in sorted(self.dirty):
            doc = {"version": CACHE_VERSION, "directory": display_path(directory), "files": self.tables[directory]}
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                _atomic_write(self._file(directory), json.dumps(doc, separators=(",", ":")))
            except OSError:
                pass
        self.dirty.clear()


def _atomic_write(path: Path, text: str) -> None:
    from axs_lib.checkpoint import atomic_write_text  # checkpoint imports torch: only when writing

    atomic_write_text(path, text)


def tile_problems(ref: os.PathLike | str) -> tuple[list[str], tuple[int, ...] | None]:
    """(problems, shape) of one tile: structure, sidecar and plausibility, the one rule that
    ``axs tiles validate`` and training both apply."""
    return validate_tile(ref), tile_shape(ref)


def check_tiles(refs: list, cache_dir: os.PathLike | str | None = None) -> dict:
    """Check every tile before a run starts; raise `InputError` for the first bad one.

    Each tile gets `validate_tile` (arrays, sidecar, plausibility), and the set must share one
    tile size. A tile that passed before and whose tile and sidecar files keep their `stat_key`
    is not read again, so a second start costs one ``stat`` per file. Returns ``{"checked",
    "cached", "shape"}``.
    """
    cache = StatCache("checked", cache_dir)
    shapes: dict[tuple, Path] = {}
    real_dirs: dict[str, str] = {}
    checked = cached = 0
    for ref in refs:
        key = ref_key(ref, real_dirs)
        if key is None:
            raise InputError(display_path(ref), "no such file")
        directory, name, keys = key
        base = os.path.basename(os.fspath(ref))
        entry_name = name if name == base else f"{name}/{base}"
        shape = cache.get(directory, entry_name, keys)
        if shape is None:
            problems, shape = tile_problems(ref)
            if problems:
                cache.save()
                raise InputError(display_path(ref), "; ".join(problems))
            shape = list(shape)
            cache.put(directory, entry_name, keys, shape)
            checked += 1
        else:
            cached += 1
        shapes.setdefault(tuple(shape), ref)
        if len(shapes) > 1:
            cache.save()
            (a, pa), (b, pb) = list(shapes.items())[:2]
            raise InputError(display_path(ref), f"tiles differ in size: {display_path(os.path.basename(pa))} is {'x'.join(map(str, a))}, "
                             f"{display_path(os.path.basename(pb))} is {'x'.join(map(str, b))}; one run needs one tile size")
    cache.save()
    return {"checked": checked, "cached": cached, "shape": next(iter(shapes), None)}
