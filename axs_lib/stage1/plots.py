"""Pictures of a run, refreshed at each validation: the loss curves and sample predictions.

``plots/loss.png`` shows training and validation loss against the step (integer step ticks; every
logged point marked, so a run of a few steps still shows its training line). ``samples/step_<N>.png``
shows, for a few fixed validation tiles (one row each, titled with the tile id and its PSNR,
SAM and MAE, as `axs evaluate` computes them), what a remote-sensing user checks first:

    SAR VV | SAR VH | true RGB | pred. RGB, true's stretch | pred. RGB, own stretch
           | true NIR | pred. NIR, true's stretch | pred. NIR, own stretch | |error|

* Display stretch: each band is stretched between its 2nd and 98th percentile over the tile's
  valid pixels, as torchgeo's dataset ``plot`` methods do (``percentile_normalization``), so a dark
  land scene is neither black nor washed out. The prediction is shown twice: with the *true*
  image's limits (a prediction that is too bright, too dark or too flat looks so: a flat one is a
  single colour, one too bright is white) and with its own 2-98 % limits (what structure it has,
  whatever its level). Every panel's label says which stretch it has and its limits in
  reflectance x 10000. RGB is true colour (B4, B3, B2); NIR is B8; SAR bands are stretched in dB.
* ``|error|`` is the mean absolute difference over the four bands, in reflectance, on a colour
  scale shared by every row of the figure so that tiles can be compared.
* Invalid pixels (no value in some band) are shown grey and take no part in any percentile.

Figures are built as `matplotlib.figure.Figure` objects, never through ``pyplot``: no global
state, no backend chosen for the caller. Plotting draws no random numbers and runs the model in
eval mode without gradients, so it cannot change a run's bits. The rendered samples image can also
go to TensorBoard (`axs_lib.loggers`, ``add_image``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from axs_lib.run_dir import LOSS_PLOT, PLOTS, SAMPLES, sample_image
from axs_lib.stage1.metrics import QualityMetrics

RGB = (2, 1, 0)  # B4, B3, B2 in the optical tensor (B2, B3, B4, B8)
NIR = 3  # B8
STRETCH = (2.0, 98.0)  # percentiles mapped to black and white
NO_DATA = "0.75"  # grey behind invalid pixels
SAR_DB_SPAN = (-40.0, 10.0)  # the normalisation range of axs_lib.tiles.SAR_DB_RANGE, for display in dB
SAMPLE_DPI = 80
GRAY = colormaps["gray"].with_extremes(bad=NO_DATA)
ERROR_CMAP = colormaps["magma"].with_extremes(bad=NO_DATA)
COLUMNS = ("SAR VV (dB)", "SAR VH (dB)", "true RGB", "pred. RGB\ntrue's stretch", "pred. RGB\nown stretch",
           "true NIR (B8)", "pred. NIR\ntrue's stretch", "pred. NIR\nown stretch", "|error|")
REFLECTANCE = 10000.0  # normalised 1.0, for the stretch limits shown under the panels


def percentile_stretch(image: np.ndarray, valid: np.ndarray, limits: tuple[np.ndarray, np.ndarray] | None = None,
                       percentiles: tuple[float, float] = STRETCH) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Stretch each band of ``image`` (C, H, W) to [0, 1] between per-band percentiles of its valid pixels.

    ``limits`` (low, high), each of shape (C,), reuses another image's stretch (the target's for the
    prediction). Returns the stretched image (invalid pixels NaN) and the limits used. A band with
    no valid pixel, or a constant one, is all 0.
    """
    image = np.asarray(image, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    if limits is None:
        if valid.any():
            low, high = np.percentile(image[:, valid], percentiles, axis=1)
        else:
            low = high = np.zeros(image.shape[0])
        limits = (low, high)
    low, high = (np.asarray(v, dtype=np.float64)[:, None, None] for v in limits)
    stretched = np.clip((image - low) / np.maximum(high - low, 1e-6), 0.0, 1.0)
    stretched[:, ~valid] = np.nan
    return stretched, limits


def _rgba(bands: np.ndarray) -> np.ndarray:
    """(3, H, W) stretched bands with NaN for invalid pixels -> (H, W, 4), invalid transparent."""
    valid = ~np.isnan(bands).any(axis=0)
    rgb = np.nan_to_num(bands, nan=0.0).transpose(1, 2, 0)
    return np.dstack([rgb, valid.astype(np.float64)])


def tile_label(dataset, index: int) -> str:
    """The tile id shown in titles: the sidecar ``tile_id`` when there is one, else the file stem."""
    label = getattr(dataset, "tile_id", None)
    if callable(label):
        return str(label(index))
    path = Path(dataset.paths[index])
    try:
        from axs_lib.tiles import read_sidecar

        return str(read_sidecar(path).get("tile_id") or path.stem)
    except Exception:  # a display name is never worth failing a run over
        return path.stem


def _row(sample: dict, pred: torch.Tensor) -> dict:
    """Everything one row shows, as numpy arrays (invalid pixels NaN)."""
    valid = sample["mask"][0].numpy() > 0
    target = sample["optical"].numpy()
    predicted = pred.float().cpu().numpy()
    sar_db = sample["sar"].numpy() * (SAR_DB_SPAN[1] - SAR_DB_SPAN[0]) + SAR_DB_SPAN[0]
    sar, _ = percentile_stretch(sar_db, valid)
    true_rgb, rgb_limits = percentile_stretch(target[list(RGB)], valid)
    pred_rgb, _ = percentile_stretch(predicted[list(RGB)], valid, rgb_limits)
    own_rgb, own_rgb_limits = percentile_stretch(predicted[list(RGB)], valid)
    true_nir, nir_limits = percentile_stretch(target[[NIR]], valid)
    pred_nir, _ = percentile_stretch(predicted[[NIR]], valid, nir_limits)
    own_nir, own_nir_limits = percentile_stretch(predicted[[NIR]], valid)
    error = np.abs(predicted - target).mean(axis=0)
    error[~valid] = np.nan
    return {"sar": sar, "true_rgb": true_rgb, "pred_rgb": pred_rgb, "own_rgb": own_rgb, "true_nir": true_nir[0],
            "pred_nir": pred_nir[0], "own_nir": own_nir[0], "error": error,
            "limits": {"true_rgb": rgb_limits, "own_rgb": own_rgb_limits, "true_nir": nir_limits, "own_nir": own_nir_limits}}


def stretch_label(limits: tuple[np.ndarray, np.ndarray]) -> str:
    """The limits of a stretch in reflectance x 10000: ``lo-hi`` per band, ``/`` between bands."""
    low, high = (np.asarray(v, dtype=np.float64) * REFLECTANCE for v in limits)
    return "/".join(f"{lo:.0f}-{hi:.0f}" for lo, hi in zip(low, high))


def sample_figure(model: torch.nn.Module, dataset, device: torch.device, count: int, step: int | None = None) -> Figure:
    """The samples figure for the first ``count`` tiles of ``dataset`` (un-augmented ``dataset[i]``)."""
    count = min(count, len(dataset))
    rows, titles = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index in range(count):
                sample = dataset[index]
                pred = model(sample["sar"][None].to(device))[0]
                quality = QualityMetrics()  # the metrics of `axs evaluate`, for this one tile
                quality.update(pred[None].float().cpu(), sample["optical"][None], sample["mask"][None])
                overall = quality.result()["overall"]
                rows.append(_row(sample, pred))
                titles.append(f"{tile_label(dataset, index)}    PSNR {overall['psnr']:.2f} dB    "
                              f"SAM {overall['sam']:.2f}°    MAE {overall['mae']:.0f}")
    finally:
        model.train(was_training)
    errors = np.concatenate([r["error"][~np.isnan(r["error"])] for r in rows] or [np.zeros(1)])
    error_max = float(np.percentile(errors, 98)) if errors.size else 1.0
    fig = Figure(figsize=(2.3 * len(COLUMNS), 2.55 * max(count, 1) + 0.5), layout="constrained")
    fig.suptitle(f"Stage 1 samples{f' at step {step}' if step is not None else ''}: validation tiles. Each panel is a "
                 "2-98 % percentile stretch: of the true image (true's stretch) or of the prediction itself (own stretch); "
                 "limits under each panel, reflectance x 10000 (B4/B3/B2 for RGB); grey = no data", fontsize=9, wrap=True)
    subfigs = fig.subfigures(max(count, 1), 1, squeeze=False)[:, 0]
    for subfig, row, title in zip(subfigs, rows, titles):
        subfig.suptitle(title, fontsize=9, fontfamily="monospace")
        axes = subfig.subplots(1, len(COLUMNS))
        limits = row["limits"]
        images = [(row["sar"][0], GRAY, "2-98 %"), (row["sar"][1], GRAY, "2-98 %"),
                  (_rgba(row["true_rgb"]), None, stretch_label(limits["true_rgb"])),
                  (_rgba(row["pred_rgb"]), None, stretch_label(limits["true_rgb"])),
                  (_rgba(row["own_rgb"]), None, stretch_label(limits["own_rgb"])),
                  (row["true_nir"], GRAY, stretch_label(limits["true_nir"])),
                  (row["pred_nir"], GRAY, stretch_label(limits["true_nir"])),
                  (row["own_nir"], GRAY, stretch_label(limits["own_nir"]))]
        for ax, (image, cmap, label), name in zip(axes, images, COLUMNS):
            ax.imshow(image, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_facecolor(NO_DATA)
            ax.set_title(name, fontsize=8)
            ax.set_xlabel(label, fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
        ax = axes[-1]
        shown = ax.imshow(row["error"], cmap=ERROR_CMAP, vmin=0.0, vmax=max(error_max, 1e-6), interpolation="nearest")
        ax.set_facecolor(NO_DATA)
        ax.set_title(COLUMNS[-1], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        bar = subfig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label("mean |pred - true| reflectance", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    return fig


def render(fig: Figure, dpi: int = SAMPLE_DPI) -> np.ndarray:
    """Draw ``fig`` once into an (H, W, 3) uint8 array: what the PNG and TensorBoard both show."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as PNG, atomically (a reader never sees half a picture)."""
    from matplotlib.image import imsave

    from axs_lib.atomic import atomic_open  # a random, exclusive temp name: never a planted link

    with atomic_open(path) as f:
        imsave(f, image, format="png")


def loss_curves(path: Path, records: list[dict]) -> None:
    """Plot training and validation loss from ``metrics.jsonl`` records (`loss_figure`) to ``path``."""
    write_png(path, render(loss_figure(records), dpi=100))


def loss_figure(records: list[dict]) -> Figure:
    """The loss curves: train (every logged step, marked) and validation, on integer step ticks."""
    from matplotlib.ticker import MaxNLocator

    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("split") == "val"]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (masked L1; + SSIM term when weighted)")
    ax.set_title("Stage 1: SAR to optical")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    return fig


def sample_panel(path: Path, model: torch.nn.Module, dataset, device: torch.device, count: int,
                 step: int | None = None) -> np.ndarray:
    """Write the samples figure to ``path`` as PNG; return the rendered image (H, W, 3) uint8."""
    image = render(sample_figure(model, dataset, device, count, step))
    write_png(path, image)
    return image


def refresh(output_dir: Path, records: list[dict], model, dataset, device, step: int, count: int, events=None) -> None:
    """Rewrite ``plots/loss.png``, write ``samples/step_<step>.png`` and, given an
    the run's loggers (`axs_lib.loggers`), send the same samples image to TensorBoard."""
    (output_dir / PLOTS).mkdir(exist_ok=True)
    (output_dir / SAMPLES).mkdir(exist_ok=True)
    loss_curves(output_dir / LOSS_PLOT, records)
    image = sample_panel(output_dir / sample_image(step), model, dataset, device, count, step)
    if events is not None:
        events.add_image("samples", image, step)
