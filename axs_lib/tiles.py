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
"""

from __future__ import annotations

import collections
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from axs_lib.errors import InputError

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
    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
}
_KIND_WORDS = {
    "string": "a string",
    "boolean": "true or false",
    "string list": "a list of strings",
    "bounds": "a list of 4 numbers [left, bottom, right, top]",
}


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
    """Every ``*.npz`` entry directly in ``data_dir``, sorted by name, readable or not.

    Not recursive, so directory symlink loops cannot trap it. Used by ``axs tiles validate``,
    which must report broken entries rather than stop at the first.
    """
    return [Path(data_dir) / e.name for e in _scan(data_dir)]


def list_tiles(data_dir: os.PathLike | str, max_tiles: int | None = None) -> list[Path]:
    """The tiles of ``data_dir`` sorted by file name; the first ``max_tiles`` of them when given.

    Raises `InputError` naming the directory when it is missing, not a directory, holds no tiles,
    or ``max_tiles`` < 1; and naming the entry when a selected ``.npz`` is not a readable regular
    file (a broken symlink, a symlink loop, a directory).
    """
    if max_tiles is not None and max_tiles < 1:
        raise InputError(data_dir, f"--max-tiles must be >= 1, got {max_tiles}")
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
    return Path(tile_path).with_suffix(SIDECAR_SUFFIX)


# --------------------------------------------------------------------------- reading


def read_sidecar(tile_path: os.PathLike | str) -> dict:
    """The tile's sidecar metadata, checked, with ``split`` normalised; ``{}`` when there is none."""
    path = sidecar_path(tile_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read sidecar: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON in sidecar: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(meta, dict):
        raise InputError(path, f"sidecar must hold a JSON object, got {type(meta).__name__}")
    for name, value in meta.items():
        problem = _field_problem(name, value)
        if problem:
            raise InputError(path, problem)
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
    """The six contract arrays of a tile, structurally checked; raises `InputError` on the first problem."""
    path = Path(path)
    problem = _not_a_regular_file(path)
    if problem:
        raise InputError(path, problem)
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes), not an .npz tile")
    if not zipfile.is_zipfile(path):
        raise InputError(path, "truncated or not an .npz file (no zip archive found)")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in (*S1_KEYS, *S2_KEYS) if k not in npz.files]
            if missing:
                have = ", ".join(sorted(npz.files)) or "nothing"
                raise InputError(path, f"missing array {missing[0]!r} (has: {have})")
            for key in (*S1_KEYS, *S2_KEYS):
                arrays[key] = npz[key]
    except InputError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise InputError(path, "holds pickled object arrays; refused") from None
        raise InputError(path, f"corrupted .npz: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - zipfile/zlib/numpy raise many types for bad bytes
        raise InputError(path, f"truncated or corrupted .npz: {_first_line(exc)}") from None
    check_arrays(path, arrays)
    return arrays


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def check_arrays(path: os.PathLike | str, arrays: dict[str, np.ndarray]) -> None:
    """Raise `InputError` naming ``path`` unless the six arrays meet the contract (2-D, dtype,
    one shape, not empty, no inf, not all NaN). Shared by `load_arrays` and the converters."""
    for key, arr in arrays.items():
        if arr.ndim != 2:
            raise InputError(path, f"{key} is {arr.ndim}-D with shape {arr.shape}, expected 2-D")
        allowed = (np.float32,) if key in S1_KEYS else (np.float32, np.uint16)
        if arr.dtype not in allowed:
            expected = " or ".join(np.dtype(d).name for d in allowed)
            raise InputError(path, f"{key} has dtype {arr.dtype}, expected {expected}")
    shapes = {key: arr.shape for key, arr in arrays.items()}
    first = S1_KEYS[0]
    for key, shape in shapes.items():
        if shape != shapes[first]:
            raise InputError(path, f"arrays differ in shape: {first} {shapes[first]}, {key} {shape}")
    if 0 in shapes[first]:
        raise InputError(path, f"arrays are empty (shape {shapes[first]})")
    for key, arr in arrays.items():
        if arr.dtype.kind != "f":
            continue
        n_inf = int(np.isinf(arr).sum())
        if n_inf:
            raise InputError(path, f"{key} has {n_inf} infinite value(s); mark invalid pixels with NaN")
        if np.isnan(arr).all():
            raise InputError(path, f"{key} is all NaN (no valid pixel)")


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
    for key in S2_KEYS:
        arr = arrays[key]
        values = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        lo, hi = float(values.min()), float(values.max())
        if 0.0 < hi <= OPTICAL_UNIT_SCALE_MAX:
            problems.append(f"{key} peaks at {hi:.3g}: looks like reflectance 0..1, expected reflectance x 10000")
        elif lo < OPTICAL_PLAUSIBLE[0] or hi > OPTICAL_PLAUSIBLE[1]:
            problems.append(f"{key} spans {lo:.6g}..{hi:.6g}, outside the plausible {OPTICAL_PLAUSIBLE[0]:g}..{OPTICAL_PLAUSIBLE[1]:g}")
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
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{S1_KEYS[0]}.npy") as f:
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
