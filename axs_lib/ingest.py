"""Making tiles: BigEarthNet patch folders to tiles, the embedded demo, and synthetic tiles.

Every writer goes through `write_tile`, which encodes the tile to bytes first (``np.savez`` with
keys in contract order; numpy stamps zip members with a fixed 1980 date, so identical content gives
identical bytes), then writes sidecar and tile atomically. A file already in the output directory
is never overwritten: identical bytes are left alone ("unchanged"), different bytes are refused.
The sidecar is written before the tile, so a crash between the two leaves at most a sidecar with
no tile, which no reader picks up.
"""

from __future__ import annotations

import bz2
import functools
import importlib.resources
import io
import json
import os
import tarfile
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from axs_lib.checkpoint import atomic_open
from axs_lib.errors import InputError, UsageError
from axs_lib.reproducibility import derive_seed
from axs_lib.tiles import S1_KEYS, S2_KEYS, SIDECAR_SUFFIX, TILE_SUFFIX, check_arrays

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


@functools.lru_cache(maxsize=1)
def official_metadata() -> tuple[dict[str, str], dict[str, tuple[str, str]], dict[str, list[str]]]:
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


def _read_band(path: Path) -> np.ndarray:
    """One single-band GeoTIFF as a 2-D array; its nodata value, if any, becomes NaN."""
    import rasterio  # heavy (GDAL): only the converters need it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            band = ds.read(1)
            nodata = ds.nodata
    if nodata is not None:
        band = band.astype(np.float32)
        band[band == nodata] = np.nan
    return band


def _grid(path: Path) -> tuple[str, list[float], tuple[int, int]]:
    import rasterio

    with rasterio.open(path) as ds:
        crs = ds.crs.to_string() if ds.crs else ""
        return crs, [float(v) for v in ds.bounds], ds.shape


def _patch_metadata(folder: Path) -> dict:
    path = folder / f"{folder.name}{METADATA_SUFFIX}"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "missing patch metadata file") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable patch metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise InputError(path, "patch metadata is not a JSON object")
    return meta


def _iso(stamp: str) -> str:
    """BigEarthNet writes ``2017-06-13 10:10:31`` for S2 and ``2017-06-13T16:50:43`` for S1."""
    return stamp.replace(" ", "T")


def _convert_pair(s1_dir: Path, s2_dir: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read one S1/S2 pair; raise `InputError` naming the offending file when it cannot be used."""
    s1_meta, s2_meta = _patch_metadata(s1_dir), _patch_metadata(s2_dir)
    files = {key: s1_dir / f"{s1_dir.name}_{band}.tif" for key, band in S1_BANDS.items()}
    files |= {key: s2_dir / f"{s2_dir.name}_{band}.tif" for key, band in S2_BANDS.items()}
    arrays = {}
    for key, path in files.items():
        try:
            arrays[key] = _read_band(path)
        except Exception as exc:  # noqa: BLE001 - rasterio raises RasterioIOError and friends
            raise InputError(path, f"unreadable band: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if key in S1_BANDS:
            arrays[key] = arrays[key].astype(np.float32, copy=False)
    s1_grid, s2_grid = _grid(files["s1_vv"]), _grid(files["s2_b2"])
    if s1_grid != s2_grid:
        raise InputError(s1_dir, f"S1 and S2 grids differ (S1 {s1_grid}, S2 {s2_grid})")
    check_arrays(s1_dir, arrays)
    splits, places, flags = official_metadata()
    s2_name = s2_dir.name
    meta = {
        "tile_id": s2_name,
        "s1_patch": s1_dir.name,
        "s2_patch": s2_name,
        "crs": s2_grid[0],
        "bounds": s2_grid[1],
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


def convert_bigearthnet(s1_root: os.PathLike | str, s2_root: os.PathLike | str, out_dir: os.PathLike | str) -> IngestReport:
    """Convert BigEarthNet(-MM) v1.0 S1 and S2 patch folders into tiles named after the S2 patch.

    Each S1 folder's ``*_labels_metadata.json`` names its S2 partner (``corresponding_s2_patch``).
    The sidecar keeps both patch names, product names, acquisition times, CRS, bounds, labels, and
    from the official lists bundled with ``bigearthnet-common``: split, country, season and quality
    flags, when the patch is listed. Unpaired or unreadable patches are reported in
    ``report.skipped`` and not written. Raises `InputError` for a missing root or a conflicting
    existing file in ``out_dir``.
    """
    s1_root, s2_root = Path(s1_root), Path(s2_root)
    s1_dirs, s2_dirs = _patch_folders(s1_root), _patch_folders(s2_root)
    out_dir = _prepare_out_dir(out_dir)
    report = IngestReport()
    paired = set()
    for s1_dir in s1_dirs:
        try:
            s2_name = _patch_metadata(s1_dir).get("corresponding_s2_patch")
            if not isinstance(s2_name, str) or not (s2_root / s2_name).is_dir():
                report.skipped.append((s1_dir.name, f"unpaired: its S2 partner {s2_name!r} is not in {s2_root}"))
                continue
            paired.add(s2_name)
            arrays, meta = _convert_pair(s1_dir, s2_root / s2_name)
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


def write_demo_tiles(out_dir: os.PathLike | str) -> list[Path]:
    """Write the six real S1/S2 pairs shipped inside the ``bigearthnet-common`` wheel as tiles.

    The archives are unpacked into a temporary directory (never the user's home) and go through
    `convert_bigearthnet`. Safe to repeat into the same directory: identical tiles are left alone.
    """
    with tempfile.TemporaryDirectory(prefix="axs-bigearthnet-") as tmp:
        report = convert_bigearthnet(*extract_examples(tmp), out_dir)
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
