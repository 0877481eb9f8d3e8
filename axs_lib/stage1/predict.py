"""Use a trained Stage-1 model: predict optical bands for tiles, and measure it on tiles.

`load_model` opens a trainer checkpoint (weights only, checksum verified) and rebuilds the U-Net
its config describes: the ``linear`` head with its target statistics, or the ``sigmoid`` head of
checkpoints written before it (their config has no ``head``). `evaluate_checkpoint` runs it over
tiles and returns `axs_lib.stage1.metrics.QualityMetrics` (what ``axs evaluate`` prints);
`predict_tiles` writes one file per tile (what ``axs predict`` does). Both take one checkpoint or
several, whose predictions are averaged (`MeanOfModels`: runs of other seeds, for example).

Outputs of `predict_tiles`, per input tile ``<stem>``:

* ``<stem>.tif``: a GeoTIFF of four float32 bands (B2, B3, B4, B8, surface reflectance x 10000,
  band descriptions set), when the sidecar gives ``crs`` and ``bounds``: georeferenced with that
  CRS and the transform of those bounds over the tile's pixels; deflate-compressed, no timestamp;
* ``<stem>.npz`` otherwise: arrays ``s2_b2``, ``s2_b3``, ``s2_b4``, ``s2_b8`` (float32), written
  as a zip with fixed member dates, so its bytes too depend on the content alone.

Both are deterministic: the model runs in eval mode on the CPU (or the given device) with the
deterministic settings, one tile at a time, and nothing draws random numbers, so two predictions
from one checkpoint are byte-identical files. Each file is written to a temporary name beside it
and renamed. Invalid input pixels (NaN in a SAR band) are NaN in the output.

Checks before anything is written: the checkpoint loads and is a Stage-1 checkpoint, every tile
reads (`axs_lib.tiles.check_tiles`), and no output file exists unless ``overwrite`` (which
replaces only the files this prediction writes; nothing else in the folder is touched). Only then
is the output folder created.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from axs_lib.errors import EXIT_FAILURE, AxsError, CheckpointError, InputError, UsageError
from axs_lib.stage1.metrics import BANDS, QualityMetrics
from axs_lib.tiles import OPTICAL_RANGE, S2_KEYS, SAR_DB_RANGE, list_tiles, read_sidecar, read_tile, sidecar_path

log = logging.getLogger(__name__)

SPLIT_CHOICES = ("train", "val", "test")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: fixed, so the bytes do not depend on the clock


def load_model(checkpoint: os.PathLike | str, device: str | torch.device = "cpu"):
    """(model in eval mode, checkpoint config) from a Stage-1 trainer checkpoint (or the ``latest``
    pointer of a checkpoint folder, followed to the checkpoint it names).

    Raises `CheckpointError` naming the file when it does not load safely, fails its checksum, or
    holds no Stage-1 model that fits its config.
    """
    from axs_lib.checkpoint import follow_latest, load_checkpoint
    from axs_lib.stage1.config import IMPLICIT_IN_OLDER_CHECKPOINTS, MAXIMA
    from axs_lib.stage1.model import BLOCKS, HEADS, build_unet, state_difference

    path = follow_latest(checkpoint)  # ``checkpoints/latest``: the checkpoint a resume would start from
    device = _device(device)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_state_dict"), dict):
        raise CheckpointError(path, "has no model_state_dict: not a Stage-1 checkpoint")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    head = config.get("head", IMPLICIT_IN_OLDER_CHECKPOINTS["head"])
    block = config.get("block", IMPLICIT_IN_OLDER_CHECKPOINTS["block"])
    members = config.get("members", IMPLICIT_IN_OLDER_CHECKPOINTS["members"])
    width, dropout = config.get("width", 16), config.get("dropout", 0.1)
    if head not in HEADS or block not in BLOCKS or not _size(width, MAXIMA["width"]) or not _size(members, MAXIMA["members"]):
        raise CheckpointError(path, f"its config (head {head!r}, block {block!r}, width {width!r}, members {members!r}) is not "
                                    "a Stage-1 U-Net this version builds")
    shape = f"{members} U-Nets" if members > 1 else "a Stage-1 U-Net"
    stored = ckpt["model_state_dict"]
    with torch.device("meta"):  # shapes only: a config edited to ask for 16 x width 256 allocates nothing
        difference = state_difference(build_unet(members, width=width, head=head, block=block), stored)
    if difference is not None:
        raise CheckpointError(path, f"its weights do not fit {shape} of width {width} with a {head} head and {block} "
                                    f"blocks (first difference: {difference})")
    model = build_unet(members, width=width, dropout=float(dropout), head=head, block=block)
    try:
        model.load_state_dict(stored)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(path, f"its weights do not fit {shape} of width {width} with a {head} head and {block} "
                                    f"blocks ({first})") from None
    return model.to(device).eval(), config


def _size(value, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most


class MeanOfModels(torch.nn.Module):
    """The mean of several models' predictions (each in eval mode), summed in the order given.

    Runs of one configuration under other seeds each land in their own minimum; on places none
    of them saw, a single run can take a whole tile for water or for land by chance, where their
    mean hedges (benchmarks/README.md). The sum is float32 in a fixed order, so the result is
    as deterministic as each model's.
    """

    def __init__(self, models: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(models)

    def forward(self, sar: torch.Tensor) -> torch.Tensor:
        from axs_lib.stage1.model import mean_prediction

        return mean_prediction(self.members, sar)


Checkpoints = os.PathLike | str | list[os.PathLike | str] | tuple[os.PathLike | str, ...]


def load_predictor(checkpoints: Checkpoints, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of one checkpoint, or `MeanOfModels` of several (each loaded and checked as by
    `load_model`; the same file twice, under any name, is refused: ``best.pt`` is a hard link to a
    step checkpoint)."""
    from axs_lib.checkpoint import follow_latest

    given = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    if not given:
        raise UsageError("no checkpoint given")
    paths = [follow_latest(path) for path in given]  # a ``latest`` pointer counts as the checkpoint it names
    seen: dict[tuple[int, int], str] = {}
    for name, path in zip(given, paths):
        try:
            info = os.stat(path)
        except OSError:
            continue  # missing or unreadable: load_model names it below
        key = (info.st_dev, info.st_ino)  # one file by any name: a link, or best.pt beside the step it links to
        if key in seen:
            raise UsageError(f"{name}: the same file as {seen[key]}: each checkpoint counts once in the mean")
        seen[key] = str(name)
    models = [load_model(path, device)[0] for path in paths]
    return models[0] if len(models) == 1 else MeanOfModels(models).eval()


def _device(name: str | torch.device) -> torch.device:
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None


def select_tiles(data_dir: os.PathLike | str, split: str | None = None) -> list[Path]:
    """The tiles of ``data_dir``, or those whose sidecar says ``split`` (``validation`` counts as ``val``)."""
    from axs_lib.split import sidecar_splits
    from axs_lib.tiles import SPLIT_ALIASES

    paths = list_tiles(data_dir)
    if split is None:
        return paths
    if split not in SPLIT_CHOICES:
        raise UsageError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    labels = sidecar_splits(paths)
    chosen = [p for p in paths if SPLIT_ALIASES.get(labels[p], labels[p]) == split]
    if not chosen:
        raise InputError(data_dir, f"no tile has split {split!r} in its sidecar ({len(paths)} tiles)")
    return chosen


def _sample(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sar (1, 2, H, W), optical (1, 4, H, W), mask (1, 1, H, W)): the trainer's un-augmented sample."""
    from axs_lib.data import TileDataset

    sample = TileDataset([path], seed=0, augment=False)[0]
    return sample["sar"][None], sample["optical"][None], sample["mask"][None]


def evaluate_checkpoint(checkpoint: Checkpoints, tiles: Iterable[os.PathLike | str], device: str = "cpu",
                        progress: bool = False) -> dict:
    """`QualityMetrics` of the checkpoint's model (or the mean of several, `load_predictor`) over
    ``tiles`` (per band and overall)."""
    model = load_predictor(checkpoint, device)
    return evaluate_model(model, tiles, device, progress)


def evaluate_model(model, tiles: Iterable[os.PathLike | str], device: str = "cpu", progress: bool = False) -> dict:
    """`QualityMetrics` of ``model`` (eval mode) over ``tiles``, each tile read as the trainer reads it."""
    from tqdm import tqdm

    tiles = [Path(p) for p in tiles]
    _check(tiles)
    metrics = QualityMetrics()
    with torch.no_grad():
        for path in tqdm(tiles, desc="evaluate", unit="tile", disable=not progress):
            sar, target, mask = _sample(path)
            metrics.update(model(sar.to(device)).float().cpu(), target, mask)
    return metrics.result()


def _check(tiles: list[Path]) -> None:
    from axs_lib.tiles import check_tiles

    if not tiles:
        raise UsageError("no tiles to use")
    check_tiles(tiles)


def predict_array(model, path: Path, device: str | torch.device = "cpu") -> np.ndarray:
    """(4, H, W) float32 predicted reflectance x 10000 for one tile; NaN where its SAR is invalid."""
    tile = read_tile(path)
    sar = torch.from_numpy(np.nan_to_num(_normalise(tile.sar, SAR_DB_RANGE), nan=0.0))[None]
    with torch.no_grad():
        pred = model(sar.to(device)).double().cpu().numpy()[0]
    out = (pred * (OPTICAL_RANGE[1] - OPTICAL_RANGE[0]) + OPTICAL_RANGE[0]).astype(np.float32)
    out[:, ~np.isfinite(tile.sar).all(0)] = np.nan
    return out


def _normalise(values: np.ndarray, value_range) -> np.ndarray:
    from axs_lib.data import normalize

    return normalize(values, value_range)


def georeference(path: Path) -> tuple[str, tuple] | None:
    """(crs, bounds) from the tile's sidecar when it has both, else None; a crs that is no CRS is an
    `InputError` naming the sidecar."""
    if not sidecar_path(path).exists():
        return None
    meta = read_sidecar(path)
    crs, bounds = meta.get("crs"), meta.get("bounds")
    if not (isinstance(crs, str) and isinstance(bounds, list) and len(bounds) == 4):
        return None
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        CRS.from_user_input(crs)
    except CRSError:
        raise InputError(sidecar_path(path), f"crs {crs!r} is not a coordinate reference system rasterio knows") from None
    left, bottom, right, top = (float(b) for b in bounds)
    if not (left < right and bottom < top):
        raise InputError(sidecar_path(path), f"bounds {bounds!r} are not [left, bottom, right, top] with left < right, bottom < top")
    return crs, (left, bottom, right, top)


def output_name(path: Path, geo) -> str:
    return f"{path.stem}.tif" if geo is not None else f"{path.stem}.npz"


def plan_outputs(tiles: list[Path], output_dir: Path) -> list[tuple[Path, Path, tuple | None]]:
    """(tile, output file, georeference) for each tile; sidecars read, nothing written."""
    plan = []
    for path in tiles:
        geo = georeference(path)
        plan.append((path, output_dir / output_name(path, geo), geo))
    return plan


def predict_tiles(checkpoint: Checkpoints, data_dir: os.PathLike | str, output_dir: os.PathLike | str, *,
                  overwrite: bool = False, split: str | None = None, device: str = "cpu", progress: bool = False) -> list[Path]:
    """Write one prediction file per tile of ``data_dir`` into ``output_dir``; return the files written.

    ``checkpoint`` is one checkpoint, or several whose predictions are averaged (`load_predictor`).
    Every input is checked first (see the module docstring); then the folder is created and each
    file written atomically. With ``overwrite`` only the files of this prediction are replaced.
    """
    from tqdm import tqdm

    from axs_lib.reproducibility import set_seed

    output_dir = Path(output_dir)
    model = load_predictor(checkpoint, device)
    tiles = select_tiles(data_dir, split)
    _check(tiles)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(output_dir, "exists and is not a directory")
    plan = plan_outputs(tiles, output_dir)
    inputs = {p.resolve() for p, _, _ in plan}
    clash = next((out for _, out, _ in plan if out.resolve() in inputs), None)
    if clash is not None:  # an NPZ prediction named as its own input tile: --overwrite would destroy the tiles
        raise InputError(clash, "is an input tile: predictions would replace the tiles they are made from; choose an "
                                "--output-dir that is not the --data-dir")
    existing = [out for _, out, _ in plan if out.exists() or out.is_symlink()]
    if existing and not overwrite:
        raise InputError(existing[0], f"already exists ({len(existing)} of the {len(plan)} outputs do); "
                                      "pass --overwrite to replace them")
    set_seed(0, deterministic=True)  # deterministic kernels; no random draw is made
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(output_dir, f"cannot create the output folder: {exc.strerror}") from None
    written = []
    for path, out, geo in tqdm(plan, desc="predict", unit="tile", disable=not progress):
        bands = predict_array(model, path, device)
        try:
            if geo is not None:
                write_geotiff(out, bands, *geo)
            else:
                write_npz(out, bands)
        except OSError as exc:
            raise AxsError(f"{out}: cannot write the prediction: {exc.strerror or exc}", exit_code=EXIT_FAILURE) from None
        written.append(out)
    return written


def _atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (random temp name, never through a link, fsynced)."""
    from axs_lib.atomic import atomic_open

    with atomic_open(path) as f:
        f.write(data)


def write_npz(path: Path, bands: np.ndarray) -> None:
    """``s2_b2`` .. ``s2_b8`` float32 arrays in a zip whose member dates are fixed (`ZIP_DATE`)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, band in zip(S2_KEYS, bands):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(band, dtype=np.float32), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    _atomic(path, buffer.getvalue())


def _transform(bounds: tuple, width: int, height: int, affine):
    """North-up pixel grid of ``bounds`` (rasterio's ``from_bounds``, without its deprecated operator)."""
    left, bottom, right, top = bounds
    return affine((right - left) / width, 0.0, left, 0.0, -(top - bottom) / height, top)


def write_geotiff(path: Path, bands: np.ndarray, crs: str, bounds: tuple) -> None:
    """A four-band float32 GeoTIFF with ``crs`` and the transform of ``bounds`` over the pixels."""
    import rasterio
    from rasterio.io import MemoryFile
    from rasterio.transform import Affine

    height, width = bands.shape[1:]
    crs_obj = rasterio.crs.CRS.from_user_input(crs)  # checked by `georeference`
    profile = {"driver": "GTiff", "height": height, "width": width, "count": len(bands), "dtype": "float32",
               "crs": crs_obj, "transform": _transform(bounds, width, height, Affine), "nodata": float("nan"),
               "compress": "deflate", "tiled": False}
    with MemoryFile() as memfile:
        with memfile.open(**profile) as dst:
            dst.write(bands.astype(np.float32))
            for i, band in enumerate(BANDS, start=1):
                dst.set_band_description(i, band)
            dst.update_tags(units="surface reflectance x 10000")
        data = memfile.read()
    _atomic(path, data)
