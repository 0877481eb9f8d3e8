"""Loss and metrics on valid pixels only: a tile without a valid pixel is NaN, never a perfect score."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from pytorch_msssim import ssim

from axs_lib.stage1.losses import (
    SSIM_WIN,
    masked_l1,
    masked_ssim,
    mean_over_tiles,
    psnr,
    spectral_angle,
    ssim_per_tile,
    stage1_loss,
    tile_metrics,
)

LOGGER = "axs_lib.stage1.losses"


def batch(n: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 4, size, size, generator=g)
    pred = (target + 0.1 * torch.randn(n, 4, size, size, generator=g)).clamp(0, 1)
    mask = torch.ones(n, 1, size, size)
    return pred, target, mask


def empty_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_psnr_of_a_tile_without_valid_pixels_is_nan_with_a_warning(caplog):
    pred, target, mask = batch(1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        value = psnr(pred, target, torch.zeros_like(mask))
    assert math.isnan(value)
    assert empty_warnings(caplog) == ["1 tile(s) without a single valid pixel: PSNR set to NaN (not counted as a perfect score)"]


def test_ssim_of_a_tile_without_valid_pixels_is_nan_not_one(caplog):
    pred, target, mask = batch(1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        value = masked_ssim(pred, target, torch.zeros_like(mask))
    assert math.isnan(value.item())
    assert len(empty_warnings(caplog)) == 1


def test_sam_of_a_tile_without_valid_pixels_is_nan(caplog):
    pred, target, mask = batch(1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert math.isnan(spectral_angle(pred, target, torch.zeros_like(mask)))
    assert len(empty_warnings(caplog)) == 1


def test_metrics_of_tiles_with_valid_pixels_give_no_warning(caplog):
    pred, target, mask = batch(2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        values = [psnr(pred, target, mask), masked_ssim(pred, target, mask).item(), spectral_angle(pred, target, mask)]
        tile_metrics(pred, target, mask)
    assert all(math.isfinite(v) for v in values)
    assert empty_warnings(caplog) == []


def test_a_perfect_match_still_has_infinite_psnr():
    _, target, mask = batch(1)
    assert psnr(target, target, mask) == math.inf


def test_tile_metrics_mark_only_the_empty_tile_nan(caplog):
    pred, target, mask = batch(3)
    mask[1] = 0
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        metrics = tile_metrics(pred, target, mask)
    assert empty_warnings(caplog) == ["1 tile(s) without a single valid pixel: PSNR, SSIM and SAM set to NaN "
                                      "(not counted as a perfect score)"]
    for name in ("psnr", "ssim", "sam"):
        assert metrics[name].shape == (3,) and metrics[name].dtype == torch.float64
        assert math.isnan(metrics[name][1]) and math.isfinite(metrics[name][0]) and math.isfinite(metrics[name][2])
    assert metrics["psnr"][0].item() == pytest.approx(psnr(pred[:1], target[:1], mask[:1]), rel=1e-6)
    assert metrics["sam"][2].item() == pytest.approx(spectral_angle(pred[2:], target[2:], mask[2:]), rel=1e-5)


def test_ssim_per_tile_matches_the_library_on_valid_tiles():
    pred, target, mask = batch(2)
    expected = ssim(pred, target, data_range=1.0, size_average=False, win_size=SSIM_WIN)
    assert torch.equal(ssim_per_tile(pred, target, mask), expected)


def test_mean_over_tiles_skips_nan_and_is_nan_when_nothing_is_left():
    assert mean_over_tiles([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(mean_over_tiles([math.nan, math.nan]))
    assert math.isnan(mean_over_tiles([]))


def test_masked_ssim_averages_only_tiles_with_valid_pixels(caplog):
    pred, target, mask = batch(2)
    mask[0] = 0
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        value = masked_ssim(pred, target, mask)
    assert value.item() == pytest.approx(masked_ssim(pred[1:], target[1:], mask[1:]).item(), rel=1e-6)


def test_loss_with_every_tile_valid_is_l1_plus_one_minus_the_batch_ssim():
    pred, target, mask = batch(3)
    expected = masked_l1(pred, target, mask) + 0.5 * (1.0 - ssim(pred * mask, target * mask, data_range=1.0,
                                                                 size_average=True, win_size=SSIM_WIN))
    # the same value up to rounding: the loss averages per-tile terms (no branch, no host sync on GPU)
    assert stage1_loss(pred, target, mask, 1.0, 0.5).item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_ignores_a_tile_without_valid_pixels():
    pred, target, mask = batch(2)
    mask[0] = 0
    both = stage1_loss(pred, target, mask)
    alone = stage1_loss(pred[1:], target[1:], mask[1:])
    assert both.item() == pytest.approx(alone.item(), rel=1e-6)


def test_loss_of_a_batch_without_valid_pixels_is_zero_with_zero_gradient():
    pred, target, mask = batch(2)
    pred = pred.clone().requires_grad_(True)
    loss = stage1_loss(pred, target, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))
