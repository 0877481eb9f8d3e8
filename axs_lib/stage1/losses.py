"""Training loss, and the per-tile metrics the trainer reported before `axs_lib.stage1.metrics`,
all restricted to valid pixels.

The trainer's validation, ``axs evaluate``, the sample figures and the quality benchmark measure
with `axs_lib.stage1.metrics` (pooled PSNR, SSIM at the tile's 2-98 % range, SAM masked below a
brightness); `psnr`, `masked_ssim`, `spectral_angle`, `tile_metrics` and `mean_over_tiles` below
are the earlier per-tile definitions, kept for code that calls them.

Inputs are normalised optical images in [0, 1] of shape (N, 4, H, W) and a mask of shape
(N, 1, H, W) that is 1 where every input and target band is finite. Invalid pixels never enter:
the L1 term and PSNR average over valid pixels only, and SSIM (from ``pytorch_msssim``, a
maintained implementation) sees prediction and target with invalid pixels set to 0 in both.

A metric over zero valid pixels has no value: PSNR, SSIM and SAM of such a tile are NaN, and a
warning (``logging``) says how many tiles had none, never a perfect score. (Computed naively, an
empty tile has MSE 0, so PSNR inf, and two all-zero images, so SSIM 1.0.) Aggregates skip NaN
tiles (`mean_over_tiles`). The *loss* treats a tile without valid pixels as contributing nothing:
a batch of only such tiles has loss 0 and no gradient, so training neither stops nor learns from it.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from pytorch_msssim import ssim as _msssim

log = logging.getLogger(__name__)

SSIM_WIN = 7  # fits tiles of 7 px and up; BigEarthNet patches are 120 px
SSIM_SIGMA = 1.5  # pytorch_msssim's default


@functools.lru_cache(maxsize=16)
def _window(channels: int, ndim: int, device: torch.device) -> torch.Tensor:
    """pytorch_msssim's Gaussian window, made once per device. Left to itself the library builds it on
    the CPU and copies it to the GPU at every call: a host synchronisation in every training step."""
    coords = torch.arange(SSIM_WIN, dtype=torch.float) - SSIM_WIN // 2  # as pytorch_msssim's _fspecial_gauss_1d
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = (g / g.sum()).unsqueeze(0).unsqueeze(0)
    return g.repeat([channels] + [1] * (ndim - 1)).to(device)


def ssim(x: torch.Tensor, y: torch.Tensor, *, size_average: bool) -> torch.Tensor:
    """SSIM (data range 1) by pytorch_msssim, with its window cached on ``x``'s device."""
    window = _window(x.shape[1], x.dim(), x.device).to(dtype=x.dtype)
    return _msssim(x, y, data_range=1.0, size_average=size_average, win=window)
METRICS = ("psnr", "ssim", "sam")


def _valid_count(mask: torch.Tensor, channels: int) -> torch.Tensor:
    return (mask.sum() * channels).clamp_min(1.0)


def _has_valid(mask: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which images have at least one valid pixel."""
    return mask.flatten(1).sum(1) > 0


def _warn_empty(count: int, what: str) -> None:
    if count:
        log.warning("%d tile(s) without a single valid pixel: %s set to NaN (not counted as a perfect score)", count, what)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over valid pixels and all bands (0 when there are none)."""
    return ((pred - target).abs() * mask).sum() / _valid_count(mask, pred.shape[1])


def ssim_per_tile(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM of each tile with invalid pixels zeroed in both images; NaN for a tile with none valid."""
    values = ssim(pred * mask, target * mask, size_average=False)
    return torch.where(_has_valid(mask), values, torch.full_like(values, math.nan))


def masked_ssim(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean SSIM over the tiles that have valid pixels (data range 1); NaN, with a warning, when none has."""
    valid = _has_valid(mask)
    _warn_empty(int((~valid).sum()), "SSIM")
    if bool(valid.all()):
        return ssim(pred * mask, target * mask, size_average=True)
    return ssim_per_tile(pred, target, mask)[valid].mean()  # mean of nothing is NaN


def _ssim_term(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - SSIM`` for the loss: the mean over tiles that have valid pixels; 0 (no gradient) when none has.

    Written with a weight per tile instead of a branch on which tiles are valid, so that the
    training step never reads a value back from the GPU (a branch on a device tensor is a host sync).
    """
    valid = _has_valid(mask).to(pred.dtype)
    per_tile = ssim(pred * mask, target * mask, size_average=False)
    return ((1.0 - per_tile) * valid).sum() / valid.sum().clamp_min(1.0)


def stage1_loss(pred, target, mask, l1_weight: float = 1.0, ssim_weight: float = 0.5,
                band_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``l1_weight * L1 + ssim_weight * (1 - SSIM)``, both masked.

    ``band_scale`` (C,), when given, divides each band's error in the L1 term: with the training
    targets' per-band standard deviation (`axs_lib.stage1.model.UNet.band_scale`) the L1 is taken
    on standardised bands, so a dark, flat band (B2) counts as much as a bright, varied one (B8).
    The SSIM term stays on the [0, 1] images.
    """
    if band_scale is not None:
        scale = band_scale.to(pred.dtype).reshape(1, -1, 1, 1)
        loss = l1_weight * masked_l1(pred / scale, target / scale, mask)
    else:
        loss = l1_weight * masked_l1(pred, target, mask)
    if ssim_weight:
        loss = loss + ssim_weight * _ssim_term(pred, target, mask)
    return loss


def _psnr_db(squared_error_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """PSNR in dB (data range 1) from sums, float64: inf for a perfect match, NaN where ``count`` is 0."""
    mse = squared_error_sum.double() / count.double()  # 0/0 = NaN: no valid pixel
    return 10.0 * torch.log10(1.0 / mse)  # 1/0 = inf: perfect match


def _angles(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(N, H, W) spectral angle in degrees between predicted and true band vectors."""
    dot = (pred * target).sum(1)
    norms = pred.norm(dim=1) * target.norm(dim=1)
    return torch.rad2deg(torch.acos((dot / (norms + eps)).clamp(-1.0, 1.0)))


def psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB over the valid pixels of the batch (data range 1); inf for a
    perfect match, NaN (with a warning) when no pixel is valid."""
    if mask.sum().item() == 0:
        _warn_empty(pred.shape[0], "PSNR")
    return float(_psnr_db((((pred - target) ** 2) * mask).sum(), mask.sum() * pred.shape[1]))


def spectral_angle(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> float:
    """Mean spectral angle (SAM) in degrees over the valid pixels of the batch; NaN (with a warning)
    when no pixel is valid."""
    valid = mask[:, 0]
    if valid.sum().item() == 0:
        _warn_empty(pred.shape[0], "SAM")
    return float((_angles(pred, target, eps) * valid).sum().double() / valid.sum().double())


def tile_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """PSNR, SSIM and SAM of every tile of a batch as (N,) float64 tensors on the CPU.

    A tile without valid pixels gets NaN in all three, and one warning per call counts them.
    """
    empty = int((~_has_valid(mask)).sum())
    _warn_empty(empty, "PSNR, SSIM and SAM")
    return {
        "psnr": _psnr_db((((pred - target) ** 2) * mask).flatten(1).sum(1), mask.flatten(1).sum(1) * pred.shape[1]).cpu(),
        "ssim": ssim_per_tile(pred, target, mask).double().cpu(),
        "sam": ((_angles(pred, target) * mask[:, 0]).flatten(1).sum(1).double() / mask[:, 0].flatten(1).sum(1).double()).cpu(),
    }


def mean_over_tiles(values: list[float] | torch.Tensor) -> float:
    """Mean of per-tile values, skipping NaN (tiles without valid pixels); NaN when all are NaN."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else math.nan
