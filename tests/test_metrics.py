"""The quality metrics of `axs_lib.stage1.metrics`: pooled, masked and on a range where a constant
image cannot look good."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_msssim import ssim as library_ssim

from axs_lib.stage1.metrics import (SAM_MIN_BRIGHTNESS, SCALE, QualityMetrics, flat, jsonable, psnr_db,
                                    ssim_per_band)


def _field(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    """A textured optical batch (N, 4, H, W) around reflectance 0.05-0.3, smooth at several scales."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 4, size // 8, size // 8, generator=g)
    fine = torch.rand(n, 4, size, size, generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (0.05 + 0.2 * up + 0.05 * fine).float()


def test_psnr_is_pooled_over_every_pixel_not_averaged_per_tile():
    target = torch.full((2, 4, 8, 8), 0.2)
    pred = target.clone()
    pred[0] += 0.001  # an easy tile: tiny error
    pred[1] += 0.1  # a hard tile
    mask = torch.ones(2, 1, 8, 8)
    metrics = QualityMetrics()
    metrics.update(pred, target, mask)
    result = metrics.result()
    pooled_mse = ((0.001 * SCALE) ** 2 + (0.1 * SCALE) ** 2) / 2
    per_tile_mean = (psnr_db((0.001 * SCALE) ** 2) + psnr_db((0.1 * SCALE) ** 2)) / 2
    assert result["overall"]["psnr"] == pytest.approx(psnr_db(pooled_mse), abs=1e-3)
    assert result["overall"]["psnr"] < per_tile_mean - 10  # the per-tile mean flatters: 40 dB vs 23 dB
    assert result["bands"]["B2"]["rmse"] == pytest.approx(math.sqrt(pooled_mse), rel=1e-4)
    assert result["overall"]["mae"] == pytest.approx((0.001 + 0.1) / 2 * SCALE, rel=1e-4)


def test_results_do_not_depend_on_how_tiles_are_batched():
    target, pred = _field(0, n=4), _field(1, n=4)
    mask = torch.ones(4, 1, 32, 32)
    mask[2, :, :5] = 0
    whole, parts = QualityMetrics(), QualityMetrics()
    whole.update(pred, target, mask)
    for i in range(4):
        parts.update(pred[i:i + 1], target[i:i + 1], mask[i:i + 1])
    assert flat(whole.result()) == pytest.approx(flat(parts.result()), rel=1e-12)


def test_sam_leaves_out_pixels_darker_than_the_documented_brightness():
    target = torch.full((1, 4, 8, 8), 0.2)
    pred = target.clone()
    dark = SAM_MIN_BRIGHTNESS / SCALE / 2
    target[0, :, 0, 0] = torch.tensor([dark, dark / 4, dark, dark / 4])  # a dark pixel...
    pred[0, :, 0, 0] = torch.tensor([dark / 4, dark, dark / 4, dark])  # ...whose angle is large noise
    metrics = QualityMetrics()
    metrics.update(pred, target, torch.ones(1, 1, 8, 8))
    result = metrics.result()
    assert result["sam_pixels"] == 63
    assert result["overall"]["sam"] == pytest.approx(0.0, abs=1e-3)  # the bright pixels match exactly


def test_ssim_at_the_tiles_range_scores_a_constant_image_low_and_a_good_prediction_high():
    target = _field(0)
    mask = torch.ones(2, 1, 32, 32)
    constant = torch.full_like(target, float(target.median()))
    g = torch.Generator().manual_seed(5)
    good = target + 0.005 * torch.randn(target.shape, generator=g)
    assert ssim_per_band(constant, target, mask).mean() < 0.3
    assert ssim_per_band(good, target, mask).mean() > 0.8
    # at the fixed range 10000 (data range 1 here) the constant image would score far higher
    assert library_ssim(constant, target, data_range=1.0, win_size=7).item() > ssim_per_band(constant, target, mask).mean() + 0.3


def test_a_tile_without_valid_pixels_is_left_out_and_an_empty_set_is_nan(caplog):
    target, pred = _field(0), _field(1)
    mask = torch.ones(2, 1, 32, 32)
    mask[1] = 0
    both, first = QualityMetrics(), QualityMetrics()
    both.update(pred, target, mask)
    first.update(pred[:1], target[:1], mask[:1])
    assert flat(both.result()) == pytest.approx(flat(first.result()), rel=1e-12)
    assert "without a single valid pixel" in caplog.text
    empty = QualityMetrics()
    empty.update(pred, target, torch.zeros_like(mask))
    assert all(math.isnan(v) for v in flat(empty.result()).values())
    assert jsonable(flat(empty.result())) == dict.fromkeys(flat(empty.result()))
