"""Making tiles: BigEarthNet patch folders to tiles, the embedded demo, and synthetic tiles.

Two BigEarthNet layouts are read: v1.0 (flat patch folders, each with a ``*_labels_metadata.json``
naming its partner; `convert_bigearthnet`) and v2.0, reBEN (patch folders nested under their
product, pairs and labels in ``metadata.parquet``; `convert_reben`). rasterio and pyarrow are
imported only by the functions that need them (`require` names the extra to install).

Every writer goes through `write_tile`, which encodes the tile to bytes first (``np.savez`` with
keys in contract order; numpy stamps zip members with a fixed 1980 date, so identical content gives
identical bytes), then writes sidecar and tile atomically. A file already in the output directory
is never overwritten: identical bytes are left alone ("unchanged"), different bytes are refused.
The sidecar is written before the tile, so a crash between the two leaves at most a sidecar with
no tile, which no reader picks up.
"""

from __future__ import annotations

import bz2
import concurrent.futures
import functools
import importlib.resources
import io
import itertools
import multiprocessing
import json
import os
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from axs_lib.atomic import atomic_open
from axs_lib.errors import EXIT_FAILURE, AxsError, InputError, UsageError
from axs_lib.tiles import (MAX_TILE_PX, MIN_TILE_PX, S1_KEYS, S2_KEYS, SIDECAR_SUFFIX, SPLIT_ALIASES, TILE_SUFFIX, check_arrays,
                           name_problem, read_json_file)

S1_BANDS = {"s1_vv": "VV", "s1_vh": "VH"}
S2_BANDS = {"s2_b2": "B02", "s2_b3": "B03", "s2_b4": "B04", "s2_b8": "B08"}
METADATA_SUFFIX = "_labels_metadata.json"
BIGEARTHNET_SOURCE = "BigEarthNet v1.0 (Sentinel-1 + Sentinel-2 patches)"
_PACKAGE = "bigearthnet_common"
_EXAMPLE_ARCHIVES = ("BigEarthNet-S1-Example.tar.bz2", "BigEarthNet-S2-Example.tar.bz2")
# Official lists shipped in the bigearthnet-common wheel, keyed by Sentinel-2 patch name.
_SPLIT_LISTS = {"train": "train.csv.bz2", "val": "val.csv.bz2", "test": "test.csv.bz2"}
_FLAG_LISTS = {
    "seasonal_snow": "patches_with_seasonal_snow.csv.bz2",
    "cloud_or_shadow": "patches_with_cloud_and_shadow.csv.bz2",
    "no_19_class_target": "patches_with_no_19_class_targets.csv.bz2",
}
_COUNTRY_LIST = "s1_s2_name_country_season.csv.bz2"


@dataclass
class IngestReport:
    """What a conversion did: tiles written, tiles already present and identical, patches skipped."""

    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (patch, reason)

    @property
    def tiles(self) -> list[Path]:
        """Every tile the conversion produced or found identical, sorted by name."""
        return sorted(self.written + self.unchanged, key=lambda p: p.name)


# --------------------------------------------------------------------------- writing


def encode_tile(arrays: dict[str, np.ndarray]) -> bytes:
    """The ``.npz`` bytes of a tile: contract arrays in contract order, then any extras by name."""
    ordered = {k: arrays[k] for k in (*S1_KEYS, *S2_KEYS) if k in arrays}
    ordered.update({k: arrays[k] for k in sorted(arrays) if k not in ordered})
    buf = io.BytesIO()
    np.savez(buf, **ordered)
    return buf.getvalue()


def encode_sidecar(meta: dict) -> bytes:
    """Canonical sidecar bytes: sorted keys, two-space indent, trailing newline."""
    return (json.dumps(meta, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_tile(out_dir: Path, stem: str, arrays: dict[str, np.ndarray], meta: dict, report: IngestReport) -> None:
    """Write ``<stem>.npz`` and ``<stem>.json`` atomically, or record them as unchanged.

    Raises `InputError` (and writes nothing for this tile) when either file exists with other bytes.
    """
    tile = out_dir / f"{stem}{TILE_SUFFIX}"
    outputs = [(out_dir / f"{stem}{SIDECAR_SUFFIX}", encode_sidecar(meta)), (tile, encode_tile(arrays))]
    existing = [path.read_bytes() if path.exists() else None for path, _ in outputs]
    for (path, data), old in zip(outputs, existing):
        if old is not None and old != data:
            raise InputError(path, "already exists with different content; refusing to overwrite (use an empty output directory)")
    if all(old is not None for old in existing):
        report.unchanged.append(tile)
        return
    mode = 0o666 & ~_umask()
    for (path, data), old in zip(outputs, existing):
        if old is None:
            with atomic_open(path) as f:
                os.fchmod(f.fileno(), mode)  # the temp file is 0600; tiles are ordinary data files
                f.write(data)
    report.written.append(tile)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prepare_out_dir(out_dir: os.PathLike | str) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


# --------------------------------------------------------------------------- BigEarthNet


def _read_list(name: str) -> list[str]:
    data = importlib.resources.files(_PACKAGE).joinpath(name).read_bytes()
    return bz2.decompress(data).decode("utf-8").split()


# split by patch, (country, season) by patch, quality flags by patch
OfficialLists = tuple[dict[str, str], dict[str, tuple[str, str]], dict[str, list[str]]]


@functools.lru_cache(maxsize=1)
def official_metadata() -> OfficialLists:
    """BigEarthNet's official lists, keyed by Sentinel-2 patch name: split, (country, season), flags."""
    splits = {name: split for split, file in _SPLIT_LISTS.items() for name in _read_list(file)}
    places = {}
    for row in _read_list(_COUNTRY_LIST)[1:]:  # s1_name,s2_name,country,season
        _, s2_name, country, season = row.split(",")
        places[s2_name] = (country, season)
    flags: dict[str, list[str]] = {}
    for flag, file in _FLAG_LISTS.items():
        for name in _read_list(file):
            flags.setdefault(name, []).append(flag)
    return splits, places, flags


# Band types a GeoTIFF may hold: what Sentinel-1/2 products use, and nothing wider than 8 bytes.
_BAND_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


def _read_band(path: Path) -> np.ndarray:
    """One single-band GeoTIFF as a 2-D array; its nodata value, if any, becomes NaN.

    The declared size and type are checked before any pixel is read: a compressed or sparse
    file of a few KB can declare 30000 x 30000 pixels, and reading it would allocate gigabytes
    before the tile limits saw the array.
    """
    import rasterio  # heavy (GDAL): only the converters need it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            _check_declared(path, ds.count, ds.height, ds.width, ds.dtypes[0] if ds.count else None,
                            ds.block_shapes[0] if ds.count else (0, 0))
            band = ds.read(1)
            nodata = ds.nodata
    if nodata is not None:
        band = band.astype(np.float32)
        band[band == nodata] = np.nan
    return band


def _check_declared(path: Path, count: int, height: int, width: int, dtype: str | None, block: tuple[int, int]) -> None:
    if count < 1:
        raise InputError(path, "GeoTIFF holds no band")
    if min(height, width) < MIN_TILE_PX or max(height, width) > MAX_TILE_PX:
        raise InputError(path, f"GeoTIFF declares {width}x{height} px; tile sides must be {MIN_TILE_PX} to {MAX_TILE_PX} px")
    # GDAL decodes whole blocks: a 120 x 120 image stored as one 16384 x 16384 block costs 0.5 GB
    if block[0] * block[1] > MAX_TILE_PX * MAX_TILE_PX:
        raise InputError(path, f"GeoTIFF stores its pixels in {block[1]}x{block[0]} px blocks, more than a "
                               f"{MAX_TILE_PX} x {MAX_TILE_PX} px tile holds")
    if dtype not in _BAND_DTYPES:
        raise InputError(path, f"GeoTIFF band type {dtype} is not a number type a tile can hold")


def _grid(path: Path) -> tuple[str, list[float], tuple[int, int]]:
    import rasterio

    with rasterio.open(path) as ds:
        crs = ds.crs.to_string() if ds.crs else ""
        return crs, [float(v) for v in ds.bounds], ds.shape


def _patch_metadata(folder: Path) -> dict:
    """A v1 patch's metadata JSON, read as sidecars are (a regular file of bounded size, strict JSON)."""
    path = folder / f"{folder.name}{METADATA_SUFFIX}"
    if not os.path.lexists(path):
        raise InputError(path, "missing patch metadata file")
    meta = read_json_file(path, "patch metadata")
    if not isinstance(meta, dict):
        raise InputError(path, "patch metadata is not a JSON object")
    return meta


def _iso(stamp: str) -> str:
    """BigEarthNet writes ``2017-06-13 10:10:31`` for S2 and ``2017-06-13T16:50:43`` for S1."""
    return stamp.replace(" ", "T")


def _convert_pair(s1_dir: Path, s2_dir: Path, lists: OfficialLists | None) -> tuple[dict[str, np.ndarray], dict]:
    """Read one S1/S2 pair; raise `InputError` naming the offending file when it cannot be used."""
    s1_meta, s2_meta = _patch_metadata(s1_dir), _patch_metadata(s2_dir)
    arrays, crs, bounds = _read_pair(s1_dir, s2_dir)
    splits, places, flags = lists if lists is not None else official_metadata()
    s2_name = s2_dir.name
    meta = {
        "tile_id": s2_name,
        "s1_patch": s1_dir.name,
        "s2_patch": s2_name,
        "crs": crs,
        "bounds": bounds,
        "labels": list(s2_meta.get("labels", s1_meta.get("labels", []))),
        "source": BIGEARTHNET_SOURCE,
    }
    optional = {
        "s1_product": s1_meta.get("scene_source"),
        "s2_product": s2_meta.get("tile_source"),
        "s1_acquisition": _iso(s1_meta["acquisition_time"]) if "acquisition_time" in s1_meta else None,
        "s2_acquisition": _iso(s2_meta["acquisition_date"]) if "acquisition_date" in s2_meta else None,
        "split": splits.get(s2_name),
        "country": places.get(s2_name, (None, None))[0],
        "season": places.get(s2_name, (None, None))[1],
        "quality_flags": flags.get(s2_name),
    }
    meta.update({k: v for k, v in optional.items() if v is not None})
    return arrays, meta


def _patch_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise InputError(root, "no such directory" if not root.exists() else "not a directory")
    return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)


def convert_bigearthnet(s1_root: os.PathLike | str, s2_root: os.PathLike | str, out_dir: os.PathLike | str, *,
                        lists: OfficialLists | None = None) -> IngestReport:
    """Convert BigEarthNet(-MM) v1.0 S1 and S2 patch folders into tiles named after the S2 patch.

    Each S1 folder's ``*_labels_metadata.json`` names its S2 partner (``corresponding_s2_patch``).
    The sidecar keeps both patch names, product names, acquisition times, CRS, bounds, labels, and
    from the official lists bundled with ``bigearthnet-common``: split, country, season and quality
    flags, when the patch is listed (``lists`` replaces those lists: `DEMO_LISTS` for the demo).
    Unpaired or unreadable patches are reported in ``report.skipped`` and not written. Raises
    `InputError` for a missing root or a conflicting existing file in ``out_dir``.
    """
    s1_root, s2_root = Path(s1_root), Path(s2_root)
    s1_dirs, s2_dirs = _patch_folders(s1_root), _patch_folders(s2_root)
    require("rasterio")
    out_dir = _prepare_out_dir(out_dir)
    report = IngestReport()
    paired = set()
    for s1_dir in s1_dirs:
        try:
            s2_name = _patch_metadata(s1_dir).get("corresponding_s2_patch")
            problem = name_problem(s2_name)
            if problem:  # it names the tile and a folder: "../x" or "/x" would reach outside both roots
                raise InputError(s1_dir / f"{s1_dir.name}{METADATA_SUFFIX}", f"corresponding_s2_patch {problem}")
            if not (s2_root / s2_name).is_dir():
                report.skipped.append((s1_dir.name, f"unpaired: its S2 partner {s2_name!r} is not in {s2_root}"))
                continue
            paired.add(s2_name)
            arrays, meta = _convert_pair(s1_dir, s2_root / s2_name, lists)
        except InputError as exc:
            report.skipped.append((s1_dir.name, str(exc)))
            continue
        write_tile(out_dir, s2_name, arrays, meta, report)
    report.skipped.extend((d.name, "unpaired: no S1 patch names this S2 patch") for d in s2_dirs if d.name not in paired)
    return report


def extract_examples(dest: os.PathLike | str) -> tuple[Path, Path]:
    """Unpack the example archives of the ``bigearthnet-common`` wheel into ``dest``; return (S1 root, S2 root).

    Read straight from the installed package: ``bigearthnet_common.example_data`` would write
    into the user's home directory when imported.
    """
    package = importlib.resources.files(_PACKAGE)
    roots = []
    for archive in _EXAMPLE_ARCHIVES:
        with importlib.resources.as_file(package.joinpath(archive)) as path, tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")
        roots.append(Path(dest) / archive.removesuffix(".tar.bz2"))
    return roots[0], roots[1]


# The six example patches' entries in the official lists, as `official_metadata` reads them (a test
# checks that they still agree): the demo needs six rows, and decompressing the lists of all 590,326
# patches takes longer (5-9 s) than the rest of the conversion.
DEMO_LISTS: OfficialLists = (
    {"S2A_MSIL2A_20170613T101031_87_48": "test", "S2A_MSIL2A_20170617T113321_36_85": "train",
     "S2A_MSIL2A_20170617T113321_4_55": "train", "S2A_MSIL2A_20171221T112501_56_35": "train",
     "S2B_MSIL2A_20170924T93020_69_24": "train"},
    {"S2A_MSIL2A_20170613T101031_87_48": ("Austria", "Summer"), "S2A_MSIL2A_20170617T113321_36_85": ("Ireland", "Summer"),
     "S2A_MSIL2A_20170617T113321_4_55": ("Ireland", "Summer"), "S2A_MSIL2A_20171221T112501_56_35": ("Portugal", "Winter"),
     "S2B_MSIL2A_20170924T93020_69_24": ("Finland", "Fall"), "S2B_MSIL2A_20180204T94161_57_38": ("Finland", "Winter")},
    {"S2B_MSIL2A_20180204T94161_57_38": ["seasonal_snow"]},
)


def write_demo_tiles(out_dir: os.PathLike | str) -> list[Path]:
    """Write the six real S1/S2 pairs shipped inside the ``bigearthnet-common`` wheel as tiles.

    The archives are unpacked into a temporary directory (never the user's home) and go through
    `convert_bigearthnet`. Safe to repeat into the same directory: identical tiles are left alone.
    """
    with tempfile.TemporaryDirectory(prefix="axs-bigearthnet-") as tmp:
        report = convert_bigearthnet(*extract_examples(tmp), out_dir, lists=DEMO_LISTS)
    if report.skipped:
        raise RuntimeError(f"demo conversion skipped patches: {report.skipped}")
    return report.tiles


# --------------------------------------------------------------------------- synthetic


def synthetic_tile(size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A plausible tile: blocky fields of vegetation and water, optical and SAR consistent with them.

    Vegetation raises NIR (B8) and cross-pol backscatter (VH) and lowers red (B4); water is dark in
    every band. Backscatter carries gamma speckle (4 looks). Good for scale tests and benchmarks,
    not for science.
    """
    block = max(1, size // 6)
    coarse = rng.random((size // block + 1, size // block + 1))
    veg = np.kron(coarse, np.ones((block, block)))[:size, :size]
    water = veg < 0.12

    def noise(scale: float) -> np.ndarray:
        return 1.0 + scale * rng.standard_normal((size, size))

    b2 = (350 + 300 * (1 - veg)) * noise(0.05)
    b3 = (550 + 350 * (1 - veg)) * noise(0.05)
    b4 = (300 + 1400 * (1 - veg)) * noise(0.05)
    b8 = (1200 + 3000 * veg) * noise(0.05)
    optical = [np.where(water, 0.25 * band, band) for band in (b2, b3, b4, b8)]
    looks = 4.0
    speckle = rng.gamma(looks, 1.0 / looks, (2, size, size))
    vv = np.where(water, -22.0, -13.0 + 5.0 * veg) + 10 * np.log10(speckle[0])
    vh = np.where(water, -29.0, -21.0 + 7.0 * veg) + 10 * np.log10(speckle[1])
    arrays = {"s1_vv": vv.astype(np.float32), "s1_vh": vh.astype(np.float32)}
    for key, band in zip(S2_KEYS, optical):
        arrays[key] = np.clip(np.rint(band), 1, 10000).astype(np.uint16)
    return arrays


def write_synthetic_tiles(out_dir: os.PathLike | str, count: int, size: int, seed: int) -> list[Path]:
    """Write ``count`` synthetic ``size`` x ``size`` tiles ``synth_00000.npz``...; sidecars say ``"synthetic": true``.

    Tile ``i`` draws from ``derive_seed(seed, "synthetic", i)``, so the bytes depend only on
    (seed, i, size) and a larger set extends a smaller one.
    """
    from axs_lib.reproducibility import derive_seed  # torch: only when synthetic tiles are made

    if count < 1:
        raise UsageError(f"--count must be >= 1, got {count}")
    if size < 2:
        raise UsageError(f"--size must be >= 2, got {size}")
    out_dir = _prepare_out_dir(out_dir)
    report = IngestReport()
    for i in range(count):
        stem = f"synth_{i:05d}"
        rng = np.random.default_rng(derive_seed(seed, "synthetic", i))
        meta = {"tile_id": stem, "synthetic": True, "source": f"axs synthetic tiles (seed {seed})"}
        write_tile(out_dir, stem, synthetic_tile(size, rng), meta, report)
    return report.tiles


# --------------------------------------------------------------------------- BigEarthNet v2 (reBEN)

REBEN_SOURCE = "BigEarthNet v2.0 (reBEN, Sentinel-1 + Sentinel-2 patches)"
REBEN_COLUMNS = ("patch_id", "s1_name", "labels", "split", "country", "contains_seasonal_snow", "contains_cloud_or_shadow")
REBEN_BATCH_ROWS = 2048  # metadata rows decoded to Python at once
# Bounds on metadata.parquet, checked from its footer before any data page is read, and on its
# values before they are decoded. A parquet file says little about what it decodes to: a 3 KB
# file can hold one 10 MB string in its dictionary page and a run-length-encoded index that
# repeats it two million times. So the text columns are read as dictionaries (indices plus each
# distinct value once: memory follows the file's declared uncompressed size, which is bounded
# here) and every distinct value is held to a length before a batch becomes Python objects.
REBEN_MAX_ROWS = 10_000_000  # reBEN has 549,488 patches
# Uncompressed bytes of the columns read, per row group: reading a group peaks near 4x this
# (a synthetic table of reBEN's 549,488 rows in one group, ~60 MB: 250 MB RSS in all).
REBEN_MAX_GROUP_BYTES = 256 << 20
REBEN_MAX_LABELS = 64  # labels of one patch (BigEarthNet has 19 classes, 43 in v1)
REBEN_MAX_LABEL_VALUES = 32_000_000  # labels in one row group (reBEN: ~1.6 million)
REBEN_MAX_TEXT_BYTES = 256  # any string value: a patch name is ~60 bytes, the longest label 87
_REBEN_TEXT = ("patch_id", "s1_name", "split", "country")
_REBEN_NAMES = ("patch_id", "s1_name")
_REBEN_FLAGS = {"contains_seasonal_snow": "seasonal_snow", "contains_cloud_or_shadow": "cloud_or_shadow"}


def require(module: str, extra: str = "data"):
    """Import an optional dependency, or raise `UsageError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise UsageError(f"{top} is not installed; it is needed here: pip install 'axs-lib[{extra}]'") from None


@dataclass
class RebenReport:
    """What a reBEN conversion did, as counts (a list of 550k paths would not keep memory flat)."""

    written: int = 0
    present: int = 0  # complete outputs of an earlier (possibly killed) conversion, left alone
    snow_cloud: int = 0  # left out because the metadata flags seasonal snow or cloud/shadow
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (patch, reason): unreadable or missing
    seconds: float = 0.0


def reben_folders(s1_root: Path, s2_root: Path, patch_id: str, s1_name: str) -> tuple[Path, Path]:
    """(S1 folder, S2 folder) of a reBEN pair, from the names alone.

    reBEN nests each patch under its product: ``BigEarthNet-S1/<S1 product>/<s1_name>/`` where the
    product is ``s1_name`` without its last three parts (tile, row, column), and
    ``BigEarthNet-S2/<S2 product>/<patch_id>/`` where it is ``patch_id`` without the last two (row,
    column). torchgeo's ``BigEarthNetV2`` finds the folders the same way.
    """
    s1_product = "_".join(s1_name.split("_")[:-3])
    s2_product = "_".join(patch_id.split("_")[:-2])
    return s1_root / s1_product / s1_name, s2_root / s2_product / patch_id


def _name_time(name: str) -> str | None:
    """The ``YYYYMMDDTHHMMSS`` part of a Sentinel product or patch name, as ISO 8601."""
    for part in name.split("_"):
        if len(part) == 15 and part[8] == "T" and (part[:8] + part[9:]).isdigit():
            return f"{part[:4]}-{part[4:6]}-{part[6:8]}T{part[9:11]}:{part[11:13]}:{part[13:15]}"
    return None


def _reben_meta(row: dict, s1_dir: Path, s2_dir: Path) -> dict:
    """The sidecar fields that come from the metadata table and the names (grid added later)."""
    split = row.get("split")
    meta = {
        "tile_id": row["patch_id"],
        "s1_patch": row["s1_name"],
        "s2_patch": row["patch_id"],
        "s1_product": s1_dir.parent.name,
        "s2_product": s2_dir.parent.name,
        "s1_acquisition": _name_time(row["s1_name"]),
        "s2_acquisition": _name_time(row["patch_id"]),
        "labels": [str(x) for x in row.get("labels") or []],
        "split": SPLIT_ALIASES.get(split, split) if isinstance(split, str) else None,
        "country": row.get("country") if isinstance(row.get("country"), str) else None,
        "quality_flags": [flag for column, flag in _REBEN_FLAGS.items() if row.get(column)] or None,
        "source": REBEN_SOURCE,
    }
    return {k: v for k, v in meta.items() if v is not None}


def _read_pair(s1_dir: Path, s2_dir: Path) -> tuple[dict[str, np.ndarray], str, list[float]]:
    """The six bands of an S1/S2 pair (v1 or v2 folders) and its grid; raises `InputError` naming
    the offending file."""
    files = {key: s1_dir / f"{s1_dir.name}_{band}.tif" for key, band in S1_BANDS.items()}
    files |= {key: s2_dir / f"{s2_dir.name}_{band}.tif" for key, band in S2_BANDS.items()}
    arrays = {}
    for key, path in files.items():
        if not path.is_file():
            raise InputError(path, "missing band file")
        try:
            arrays[key] = _read_band(path)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - rasterio raises RasterioIOError and friends
            raise InputError(path, f"unreadable band: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if key in S1_BANDS:
            arrays[key] = arrays[key].astype(np.float32, copy=False)
    s1_grid, s2_grid = _grid(files["s1_vv"]), _grid(files["s2_b2"])
    if s1_grid != s2_grid:
        raise InputError(s1_dir, f"S1 and S2 grids differ (S1 {s1_grid}, S2 {s2_grid})")
    check_arrays(s1_dir, arrays)
    return arrays, s2_grid[0], s2_grid[1]


def _reben_task(task: tuple[str, str, str, dict]) -> tuple[str, str, str]:
    """Convert one pair in a worker process: ("written" | "present" | "skipped" | "conflict", patch, reason).

    A tile already in the output directory is complete (every output is written atomically,
    sidecar first), so a rerun after a kill skips it without reading its GeoTIFFs.
    """
    s1_dir, s2_dir, out_dir, meta = Path(task[0]), Path(task[1]), Path(task[2]), task[3]
    stem = meta["tile_id"]
    if (out_dir / f"{stem}{TILE_SUFFIX}").is_file() and (out_dir / f"{stem}{SIDECAR_SUFFIX}").is_file():
        return "present", stem, ""
    try:
        arrays, crs, bounds = _read_pair(s1_dir, s2_dir)
    except InputError as exc:
        return "skipped", stem, str(exc)
    report = IngestReport()
    try:
        write_tile(out_dir, stem, arrays, {**meta, "crs": crs, "bounds": bounds}, report)
    except InputError as exc:
        return "conflict", stem, str(exc)
    return ("written" if report.written else "present"), stem, ""


def _open_reben_metadata(path: Path):
    """The metadata table as a `pyarrow.parquet.ParquetFile`, its columns, types and declared sizes
    checked; text columns are read as dictionaries (see `REBEN_MAX_GROUP_BYTES`)."""
    pq = require("pyarrow.parquet")
    if not path.is_file():
        raise InputError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise InputError(path, f"not a readable parquet file: {_first_line(exc)}") from None
    names = set(table.schema_arrow.names)
    missing = [c for c in REBEN_COLUMNS if c not in names]
    if missing:
        raise InputError(path, f"missing column {missing[0]!r} (has: {', '.join(sorted(names)) or 'nothing'}); expected reBEN's metadata.parquet")
    _check_reben_types(path, table.schema_arrow)
    leaves = _check_reben_sizes(path, table.metadata)
    try:
        return pq.ParquetFile(path, read_dictionary=[leaf for leaf in leaves if leaf.split(".")[0] in (*_REBEN_TEXT, "labels")])
    except Exception as exc:  # noqa: BLE001
        raise InputError(path, f"not a readable parquet file: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _check_reben_types(path: Path, schema) -> None:
    import pyarrow as pa

    def text(t) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or (pa.types.is_dictionary(t) and text(t.value_type))

    for column in REBEN_COLUMNS:
        t = schema.field(column).type
        if column in _REBEN_NAMES:
            ok = text(t)
        elif column in _REBEN_TEXT:
            ok = text(t) or pa.types.is_null(t)
        elif column == "labels":
            ok = pa.types.is_null(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t)) and (text(t.value_type) or pa.types.is_null(t.value_type)))
        else:
            ok = pa.types.is_boolean(t) or pa.types.is_null(t)
        if not ok:
            raise InputError(path, f"column {column!r} has type {t}; reBEN's metadata.parquet has "
                                   + ("strings" if column in _REBEN_TEXT else "lists of strings" if column == "labels" else "booleans"))


def _check_reben_sizes(path: Path, metadata) -> list[str]:
    """Hold the footer's declared row counts and sizes to the bounds; return the leaf column paths read."""
    if metadata.num_rows > REBEN_MAX_ROWS:
        raise InputError(path, f"declares {metadata.num_rows} rows, more than the {REBEN_MAX_ROWS} allowed")
    leaves = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    wanted = [i for i, leaf in enumerate(leaves) if leaf.split(".")[0] in REBEN_COLUMNS]
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        rows, total = group.num_rows, 0
        for i in wanted:
            chunk = group.column(i)
            total += chunk.total_uncompressed_size
            limit = min(rows * REBEN_MAX_LABELS, REBEN_MAX_LABEL_VALUES) if leaves[i].startswith("labels") else rows
            if chunk.num_values > max(limit, rows):
                raise InputError(path, f"row group {g}: column {leaves[i]!r} declares {chunk.num_values} values for {rows} rows, "
                                       f"more than the {max(limit, rows)} allowed")
        if total > REBEN_MAX_GROUP_BYTES:
            raise InputError(path, f"row group {g}: the reBEN columns declare {total} uncompressed bytes, more than the "
                                   f"{REBEN_MAX_GROUP_BYTES} allowed")
    return [leaves[i] for i in wanted]


def _reben_rows(table, path: Path, columns: list[str]):
    """(row number, row dict) of every row, a row group at a time, each value bounded before it is
    decoded to Python objects."""
    row = 0
    for g in range(table.metadata.num_row_groups):
        try:
            group = table.read_row_group(g, columns=columns)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
            raise InputError(path, f"row group {g}: unreadable: {_first_line(exc)}") from None
        for column in columns:
            _check_text_lengths(path, group.column(column), column, row)
        for batch in group.to_batches(max_chunksize=REBEN_BATCH_ROWS):
            decoded = batch.cast(_decoded_schema(batch.schema)) if any(_is_dict(f.type) for f in batch.schema) else batch
            for values in decoded.to_pylist():
                yield row, values
                row += 1


def _is_dict(t) -> bool:
    import pyarrow as pa

    return pa.types.is_dictionary(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_dictionary(t.value_type))


def _decoded_schema(schema):
    import pyarrow as pa

    def plain(t):
        if pa.types.is_dictionary(t):
            return t.value_type
        if pa.types.is_list(t) and pa.types.is_dictionary(t.value_type):
            return pa.list_(t.value_type.value_type)
        if pa.types.is_large_list(t) and pa.types.is_dictionary(t.value_type):
            return pa.large_list(t.value_type.value_type)
        return t

    return pa.schema([pa.field(f.name, plain(f.type)) for f in schema])


def _check_text_lengths(path: Path, column, name: str, first_row: int) -> None:
    """Refuse a string longer than `REBEN_MAX_TEXT_BYTES` or a row with more than `REBEN_MAX_LABELS`
    labels, naming the first row that holds one, without decoding the column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    row = first_row
    for chunk in column.chunks:
        rows_of = None
        if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
            counts = pc.list_value_length(chunk).fill_null(0).to_numpy(zero_copy_only=False)
            over = np.flatnonzero(counts > REBEN_MAX_LABELS)
            if over.size:
                raise InputError(path, f"row {row + int(over[0])}: {name} holds {int(counts[over[0]])} values, more than the {REBEN_MAX_LABELS} allowed")
            rows_of = np.repeat(np.arange(len(chunk)), counts)
            values = chunk.flatten()
        else:
            values = chunk
        if pa.types.is_dictionary(values.type):
            lengths = pc.binary_length(values.dictionary).fill_null(0).to_numpy(zero_copy_only=False)
            codes = values.indices.fill_null(0).to_numpy(zero_copy_only=False)
            lengths = lengths[codes] if lengths.size else np.zeros(len(codes), dtype=np.int64)
        elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            lengths = pc.binary_length(values).fill_null(0).to_numpy(zero_copy_only=False)
        else:  # booleans and nulls: nothing to expand
            lengths = np.zeros(len(values), dtype=np.int64)
        over = np.flatnonzero(lengths > REBEN_MAX_TEXT_BYTES)
        if over.size:
            at = int(over[0]) if rows_of is None else int(rows_of[over[0]])
            raise InputError(path, f"row {row + at}: {name} holds a string of {int(lengths[over[0]])} bytes, more than the {REBEN_MAX_TEXT_BYTES} allowed")
        row += len(chunk)


def _check_reben_names(table, path: Path) -> int:
    """Refuse the table unless every value is within bounds and every ``patch_id`` and ``s1_name``
    is a plain name: each names a folder to read and ``patch_id`` the tile to write, so ``../x``
    or ``/x`` would reach outside the roots. Run over the whole table before anything is written
    (about 2 s for reBEN's 549,488 rows); returns the row count."""
    rows = 0
    for row, values in _reben_rows(table, path, list(REBEN_COLUMNS)):
        for column in _REBEN_NAMES:
            problem = name_problem(values[column])
            if problem:
                raise InputError(path, f"row {row}: {column} {problem}")
        rows += 1
    return rows


def _reben_tasks(table, path: Path, s1_root: Path, s2_root: Path, out_dir: Path, keep_snow_cloud: bool, report: RebenReport):
    """Conversion tasks, one metadata batch at a time; flagged patches are counted, not yielded."""
    for row, values in _reben_rows(table, path, list(REBEN_COLUMNS)):
        if not keep_snow_cloud and any(values.get(column) for column in _REBEN_FLAGS):
            report.snow_cloud += 1
            yield None
            continue
        for column in _REBEN_NAMES:  # checked before anything was written; the file may have changed since
            problem = name_problem(values[column])
            if problem:
                raise InputError(path, f"row {row}: {column} {problem}")
        s1_dir, s2_dir = reben_folders(s1_root, s2_root, values["patch_id"], values["s1_name"])
        yield (str(s1_dir), str(s2_dir), str(out_dir), _reben_meta(values, s1_dir, s2_dir))


def convert_reben(
    s1_root: os.PathLike | str,
    s2_root: os.PathLike | str,
    out_dir: os.PathLike | str,
    metadata: os.PathLike | str,
    *,
    keep_snow_cloud: bool = False,
    jobs: int = 1,
    progress: bool = False,
) -> RebenReport:
    """Convert BigEarthNet v2 (reBEN) into tiles named after the S2 ``patch_id``.

    ``metadata`` is reBEN's ``metadata.parquet``; each row pairs ``patch_id`` (S2) with ``s1_name``
    (S1) and gives labels, split (``validation`` is written as ``val``), country and the snow and
    cloud flags. Flagged patches are left out unless ``keep_snow_cloud`` (and then carry
    ``quality_flags``). ``jobs`` worker processes read the GeoTIFFs; a worker that dies ends the
    conversion with `AxsError` (exit 1). The table is read a row group at a time with its text as
    dictionaries, held to the ``REBEN_MAX_*`` bounds, and decoded `REBEN_BATCH_ROWS` rows at a
    time. Resumable: a tile already in ``out_dir`` is left alone. Every input, each row of the
    table included (plain names, bounded values), is checked before ``out_dir`` is created.
    """
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    s1_root, s2_root, metadata = Path(s1_root), Path(s2_root), Path(metadata)
    for root in (s1_root, s2_root):
        if not root.is_dir():
            raise InputError(root, "no such directory" if not root.exists() else "not a directory")
    table = _open_reben_metadata(metadata)
    _check_reben_names(table, metadata)
    require("rasterio")
    out_dir = _prepare_out_dir(out_dir)
    tqdm = require("tqdm").tqdm
    report = RebenReport()
    start = time.perf_counter()
    tasks = _reben_tasks(table, metadata, s1_root, s2_root, out_dir, keep_snow_cloud, report)
    bar = tqdm(total=table.metadata.num_rows, unit="patch", disable=None if progress else True, smoothing=0.05)
    # concurrent.futures, not multiprocessing.Pool: a Pool whose worker is killed (the OOM killer)
    # replaces the worker and waits forever for the lost task; the executor notices the death
    # and fails every pending result with BrokenProcessPool. Workers come from a fork server, not a
    # fork of this process: pyarrow and GDAL run threads here, and forking a threaded process can
    # deadlock the child (Python 3.12+ warns of it at every fork).
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("forkserver")) if jobs > 1 else None
    try:
        for status, stem, reason in _run_tasks(tasks, pool, out_dir):
            bar.update(1)
            if status == "conflict":
                raise InputError(out_dir, f"tile {stem}: {reason}")
            if status == "written":
                report.written += 1
            elif status == "present":
                report.present += 1
            elif status == "skipped":
                report.skipped.append((stem, reason))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    report.seconds = time.perf_counter() - start
    return report


def _run_tasks(tasks, pool, out_dir: Path):
    """Results of ``tasks`` (``None`` tasks give ("filtered", ...)): in order without a pool, in
    windows of `REBEN_BATCH_ROWS` through the pool so that queued work stays bounded. A worker
    that dies is one line (`AxsError`, exit 1); every tile written before is complete and a rerun
    continues from there."""
    if pool is None:
        for task in tasks:
            yield ("filtered", "", "") if task is None else _reben_task(task)
        return
    window: list = []
    for task in itertools.chain(tasks, [StopIteration]):
        if task is not StopIteration:
            if task is None:
                yield "filtered", "", ""
            else:
                window.append(task)
        if window and (len(window) >= REBEN_BATCH_ROWS or task is StopIteration):
            try:
                yield from pool.map(_reben_task, window, chunksize=16)
            except concurrent.futures.process.BrokenProcessPool:
                raise AxsError(f"{out_dir}: a worker process converting tiles died (killed by a signal, e.g. the "
                               "out-of-memory killer); the tiles written are complete: rerun to continue, "
                               "with fewer --jobs if memory ran out", exit_code=EXIT_FAILURE) from None
            window = []
