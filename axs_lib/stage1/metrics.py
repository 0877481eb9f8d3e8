"""Image-quality metrics of Stage-1 predictions: one definition for training, validation, the
benchmark and ``axs evaluate``.

Everything is measured in the data's own unit, surface reflectance x 10000 (the tile contract),
per band (B2, B3, B4, B8) and over all bands, on valid pixels only (the mask: every input and
target band finite). Predictions and targets come in as the trainer's normalised tensors (reflectance
x 10000 mapped to [0, 1] by `axs_lib.tiles.OPTICAL_RANGE`) and are scaled back in float64.

Definitions (each chosen so that a constant image cannot look good):

* **MAE, RMSE**: pooled over every valid pixel of every tile (one sum of |e| and e^2 per band, one
  count), not a mean of per-tile values.
* **PSNR**: *pooled*: ``10 log10(R^2 / MSE)`` with the MSE pooled over every valid pixel of every
  tile and ``R = 10000`` (reflectance 1.0). A mean of per-tile PSNRs lets the easy, dark tiles
  dominate (a tile of calm water scores 40 dB); the pooled figure is the PSNR of the whole set.
* **SSIM**: per tile and band with the data range set to that band's robust range in the *true*
  tile: its 2nd to 98th percentile over the valid pixels (`SSIM_RANGE_PERCENTILES`, at least
  `SSIM_MIN_RANGE`), then averaged over tiles. SSIM's stabilising constant is ``(0.03 R)^2``, and
  a constant image scores ``C / (var + C)`` in every window, so the larger R, the better a constant
  looks: at the fixed range 10000 it scores about 0.6, at the tile's max - min (which one bright
  roof or cloud edge sets) still about 0.4, at the robust range about 0.15, below a model that
  predicts structure. The window is Gaussian, 7 px, sigma 1.5 (`SSIM_WIN`), by ``pytorch_msssim``;
  invalid pixels are 0 in both images.
* **SAM** (spectral angle, degrees): over the valid pixels whose true brightness (mean of the four
  bands) is at least `SAM_MIN_BRIGHTNESS` = 300 (reflectance 0.03); pooled over those pixels.
  Below that (water, deep shadow) the band vector is a few hundred counts of noise and its angle is
  noise too (20 to 78 degrees on dark water).

A tile without any valid pixel adds nothing (and a warning says how many there were); a result
over zero pixels is NaN, never a perfect score.

`QualityMetrics` accumulates batch by batch in float64 sums, so the result does not depend on the
batch size, and it draws no random numbers. `flat` turns a result into the trainer's flat
``{"psnr": .., "ssim": .., "sam": .., "mae": .., "rmse": ..}`` (the overall figures).
"""

from __future__ import annotations

import logging
import math

import torch

from axs_lib.report import json_safe
from axs_lib.tiles import OPTICAL_RANGE, S2_KEYS

log = logging.getLogger(__name__)

BANDS = tuple(k.split("_")[1].upper() for k in S2_KEYS)  # ("B2", "B3", "B4", "B8")
SCALE = float(OPTICAL_RANGE[1] - OPTICAL_RANGE[0])  # normalised 1.0 = reflectance x 10000 of 10000
PSNR_DATA_RANGE = 10000.0  # reflectance 1.0
SSIM_WIN = 7
SSIM_SIGMA = 1.5
SSIM_MIN_RANGE = 100.0  # reflectance 0.01: a flatter band would make SSIM of noise
SSIM_RANGE_PERCENTILES = (0.02, 0.98)
SAM_MIN_BRIGHTNESS = 300.0  # reflectance 0.03, mean of the four true bands
METRIC_NAMES = ("mae", "rmse", "psnr", "ssim", "sam")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "sam": False, "mae": False, "rmse": False, "val_loss": False}


def psnr_db(mse: float, data_range: float = PSNR_DATA_RANGE) -> float:
    """``10 log10(R^2 / mse)``; inf for mse 0, NaN for NaN."""
    if math.isnan(mse):
        return math.nan
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _window(device: torch.device) -> torch.Tensor:
    coords = torch.arange(SSIM_WIN, dtype=torch.float64) - SSIM_WIN // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    return (g / g.sum()).reshape(1, 1, 1, -1).to(device)


def ssim_per_band(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, C) SSIM of each tile and band at the true band's robust range, in float64; NaN without valid pixels.

    ``pred``, ``target`` (N, C, H, W) in any unit, ``mask`` (N, 1, H, W). Scaling both images by
    1 / range and using data range 1 is the same SSIM as data range ``range``.
    """
    from pytorch_msssim import ssim

    pred, target, mask = pred.double(), target.double(), mask.double()
    valid = (mask > 0).expand_as(target)
    values = torch.where(valid, target, torch.full_like(target, math.nan)).flatten(2)  # (N, C, H*W), NaN = invalid
    has_valid = valid.flatten(1).any(1)
    q = torch.tensor(SSIM_RANGE_PERCENTILES, dtype=torch.float64, device=target.device)
    low, high = torch.nanquantile(values, q, dim=-1)  # (N, C) each; NaN for a tile without valid pixels
    span = torch.nan_to_num(high - low, nan=1.0).clamp_min(SSIM_MIN_RANGE / SCALE)
    scale = span[:, :, None, None]
    window = _window(pred.device)
    values = torch.stack([
        ssim((pred[:, c:c + 1] * mask / scale[:, c:c + 1]), (target[:, c:c + 1] * mask / scale[:, c:c + 1]),
             data_range=1.0, size_average=False, win=window)
        for c in range(pred.shape[1])
    ], dim=1)
    return torch.where(has_valid[:, None], values, torch.full_like(values, math.nan))


def spectral_angles(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N, H, W) angle in degrees between predicted and true band vectors (float64)."""
    pred, target = pred.double(), target.double()
    cos = (pred * target).sum(1) / (pred.norm(dim=1) * target.norm(dim=1) + eps)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def sam_mask(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: valid pixels bright enough for a spectral angle (`SAM_MIN_BRIGHTNESS`)."""
    return (mask[:, 0] > 0) & (target.double().mean(1) * SCALE >= SAM_MIN_BRIGHTNESS)


class QualityMetrics:
    """Pooled MAE, RMSE, PSNR and SAM, tile-averaged SSIM, per band and overall; see the module docstring."""

    def __init__(self, bands: tuple[str, ...] = BANDS):
        self.bands = bands
        self.sums: dict[str, torch.Tensor] | None = None  # float64, on the device of the first batch

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch: ``pred``, ``target`` (N, C, H, W) normalised to [0, 1], ``mask`` (N, 1, H, W).

        Sums stay on the batch's device (no host synchronisation per batch) until `result`."""
        pred, target, mask = pred.detach().double(), target.detach().double(), mask.detach().double()
        error = (pred - target) * SCALE * mask
        ssim = ssim_per_band(pred, target, mask)
        has_valid = ~torch.isnan(ssim[:, 0])
        bright = sam_mask(target, mask)
        batch = {
            "abs": error.abs().sum(dim=(0, 2, 3)),
            "sq": (error**2).sum(dim=(0, 2, 3)),
            "pixels": mask.sum(),
            "ssim": torch.where(has_valid[:, None], ssim, torch.zeros_like(ssim)).sum(0),
            "tiles": has_valid.sum().double(),
            "empty": (~has_valid).sum().double(),
            "sam": torch.where(bright, spectral_angles(pred, target), torch.zeros_like(bright, dtype=torch.float64)).sum(),
            "sam_pixels": bright.sum().double(),
        }
        if self.sums is None:
            self.sums = batch
        else:
            for key, value in batch.items():
                self.sums[key] = self.sums[key] + value

    def result(self) -> dict:
        """``{"bands": {band: {mae, rmse, psnr, ssim}}, "overall": {mae, rmse, psnr, ssim, sam}, counts}``."""
        c = len(self.bands)
        sums = {k: v.cpu() for k, v in self.sums.items()} if self.sums is not None else {
            "abs": torch.zeros(c, dtype=torch.float64), "sq": torch.zeros(c, dtype=torch.float64),
            "ssim": torch.zeros(c, dtype=torch.float64), **dict.fromkeys(("pixels", "tiles", "empty", "sam", "sam_pixels"),
                                                                          torch.zeros((), dtype=torch.float64))}
        if int(sums["empty"]):
            log.warning("%d tile(s) without a single valid pixel: left out of every metric", int(sums["empty"]))
        n, tiles, sam_pixels = int(sums["pixels"]), int(sums["tiles"]), int(sums["sam_pixels"])
        nan = math.nan
        mse = (sums["sq"] / n).tolist() if n else [nan] * c
        mae = (sums["abs"] / n).tolist() if n else [nan] * c
        ssim = (sums["ssim"] / tiles).tolist() if tiles else [nan] * c
        bands = {band: {"mae": mae[i], "rmse": math.sqrt(mse[i]), "psnr": psnr_db(mse[i]), "ssim": ssim[i]}
                 for i, band in enumerate(self.bands)}
        overall_mse = float(sums["sq"].sum() / (n * c)) if n else nan
        overall = {
            "mae": float(sums["abs"].sum() / (n * c)) if n else nan,
            "rmse": math.sqrt(overall_mse),
            "psnr": psnr_db(overall_mse),
            "ssim": sum(ssim) / c,
            "sam": float(sums["sam"]) / sam_pixels if sam_pixels else nan,
        }
        return {"bands": bands, "overall": overall, "tiles": tiles, "pixels": n, "sam_pixels": sam_pixels}


def flat(result: dict) -> dict[str, float]:
    """The overall figures of a `QualityMetrics.result` as one flat dict (the trainer's validation metrics)."""
    return {name: float(result["overall"][name]) for name in METRIC_NAMES}


def jsonable(value):
    """A result with every non-finite number (NaN: nothing to measure; inf: a perfect PSNR) as None,
    so that it is valid JSON (which has neither)."""
    return json_safe(value, nonfinite=lambda _: None)


def table(result: dict, title: str | None = None) -> str:
    """A `QualityMetrics.result` as a Markdown table: one row per band and one for all bands."""
    lines = [f"{title}" if title else None, "| band | MAE | RMSE | PSNR (dB, pooled) | SSIM (tile 2-98 % range) | SAM (deg) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for band, m in result["bands"].items():
        lines.append(f"| {band} | {m['mae']:.0f} | {m['rmse']:.0f} | {m['psnr']:.2f} | {m['ssim']:.3f} | - |")
    o = result["overall"]
    lines.append(f"| all | {o['mae']:.0f} | {o['rmse']:.0f} | {o['psnr']:.2f} | {o['ssim']:.3f} | {o['sam']:.2f} |")
    return "\n".join(line for line in lines if line is not None)
