"""Training loss and validation metrics, all restricted to valid pixels.

Inputs are normalised optical images in [0, 1] of shape (N, 4, H, W) and a mask of shape
(N, 1, H, W) that is 1 where every input and target band is finite. Invalid pixels never enter:
the L1 term and PSNR average over valid pixels only, and SSIM (from ``pytorch_msssim``, a
maintained implementation) sees prediction and target with invalid pixels set to 0 in both.
"""

from __future__ import annotations

import math

import torch
from pytorch_msssim import ssim

SSIM_WIN = 7  # fits tiles of 7 px and up; BigEarthNet patches are 120 px


def _valid_count(mask: torch.Tensor, channels: int) -> torch.Tensor:
    return (mask.sum() * channels).clamp_min(1.0)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over valid pixels and all bands."""
    return ((pred - target).abs() * mask).sum() / _valid_count(mask, pred.shape[1])


def masked_ssim(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean SSIM with invalid pixels zeroed in both images (data range 1)."""
    return ssim(pred * mask, target * mask, data_range=1.0, size_average=True, win_size=SSIM_WIN)


def stage1_loss(pred, target, mask, l1_weight: float = 1.0, ssim_weight: float = 0.5) -> torch.Tensor:
    """``l1_weight * L1 + ssim_weight * (1 - SSIM)``, both masked."""
    loss = l1_weight * masked_l1(pred, target, mask)
    if ssim_weight:
        loss = loss + ssim_weight * (1.0 - masked_ssim(pred, target, mask))
    return loss


def psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB over valid pixels (data range 1); inf for a perfect match."""
    mse = (((pred - target) ** 2) * mask).sum() / _valid_count(mask, pred.shape[1])
    return math.inf if mse.item() == 0 else 10.0 * math.log10(1.0 / mse.item())


def spectral_angle(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> float:
    """Mean spectral angle (SAM) in degrees between predicted and true band vectors, valid pixels only."""
    dot = (pred * target).sum(1)
    norms = pred.norm(dim=1) * target.norm(dim=1)
    angle = torch.rad2deg(torch.acos((dot / (norms + eps)).clamp(-1.0, 1.0)))
    valid = mask[:, 0]
    return float((angle * valid).sum() / valid.sum().clamp_min(1.0))
