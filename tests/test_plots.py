"""Sample pictures a remote-sensing user can trust, their TensorBoard copy, and the model's output
initialisation that keeps early samples from being white."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from axs_lib.data import TileDataset
from axs_lib import loggers
from axs_lib.run_dir import TENSORBOARD
from axs_lib.stage1 import plots
from axs_lib.stage1.model import HEAD_WEIGHT_SCALE, UNet, band_means, band_stats, init_output_bias
from axs_lib.tiles import list_tiles, read_sidecar

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(demo_tiles):
    return TileDataset(list_tiles(demo_tiles), seed=0, augment=False)


def model(seed: int = 0, output_bias=None) -> UNet:
    """The sigmoid-head U-Net (whose output initialisation the tests below are about)."""
    torch.manual_seed(seed)
    return UNet(width=8, dropout=0.1, output_bias=output_bias, head="sigmoid")


# --------------------------------------------------------------------------- the stretch


def test_stretch_maps_each_bands_2nd_and_98th_percentile_to_black_and_white():
    rng = np.random.default_rng(0)
    image = np.stack([rng.uniform(0, 1, (20, 20)), rng.uniform(100, 300, (20, 20))])
    valid = np.ones((20, 20), bool)
    stretched, (low, high) = plots.percentile_stretch(image, valid)
    for band in range(2):
        assert low[band] == pytest.approx(np.percentile(image[band], 2))
        assert high[band] == pytest.approx(np.percentile(image[band], 98))
        assert np.mean(stretched[band] == 0.0) == pytest.approx(0.02, abs=0.01)
        assert np.mean(stretched[band] == 1.0) == pytest.approx(0.02, abs=0.01)


def test_stretch_ignores_invalid_pixels_and_shows_them_as_missing():
    image = np.full((1, 10, 10), 0.2)
    image[0, :5] = 0.6
    image[0, 0, 0] = 1000.0  # an invalid pixel that would wreck the stretch if counted
    valid = np.ones((10, 10), bool)
    valid[0, 0] = False
    stretched, (low, high) = plots.percentile_stretch(image, valid)
    assert (low[0], high[0]) == (pytest.approx(0.2), pytest.approx(0.6))
    assert math.isnan(stretched[0, 0, 0])
    assert np.nanmax(stretched) == 1.0 and np.nanmin(stretched) == 0.0


def test_prediction_is_shown_with_the_true_images_stretch():
    rng = np.random.default_rng(1)
    target = rng.uniform(0.05, 0.15, (3, 16, 16))
    valid = np.ones((16, 16), bool)
    _, limits = plots.percentile_stretch(target, valid)
    too_bright, _ = plots.percentile_stretch(target * 3, valid, limits)
    own_stretch, _ = plots.percentile_stretch(target * 3, valid)
    assert np.mean(too_bright) > 0.95  # shown as the washed-out picture it is
    assert np.mean(own_stretch) < 0.7  # its own stretch would have hidden that


# --------------------------------------------------------------------------- the samples figure


def figure_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]


def test_sample_figure_names_each_tile_and_shows_every_panel(dataset):
    fig = plots.sample_figure(model(), dataset, CPU, 2, step=7)
    texts = figure_texts(fig)
    for index in range(2):
        tile_id = read_sidecar(dataset.paths[index])["tile_id"]
        assert any(t.startswith(tile_id) and "PSNR" in t and "SAM" in t for t in texts), tile_id
    for column in plots.COLUMNS:
        assert texts.count(column) == 2, column
    assert any("step 7" in t and "2-98 %" in t for t in texts)


def test_sample_figure_shows_the_prediction_in_the_truths_stretch_and_in_its_own_and_labels_both(dataset):
    one = TileDataset(dataset.paths[:1], seed=0, augment=False)
    texts = figure_texts(plots.sample_figure(model(), one, CPU, 1))
    assert {"pred. RGB\ntrue's stretch", "pred. RGB\nown stretch", "pred. NIR\ntrue's stretch",
            "pred. NIR\nown stretch"} <= set(texts)
    sample = one[0]
    valid = sample["mask"][0].numpy() > 0
    _, true_limits = plots.percentile_stretch(sample["optical"].numpy()[list(plots.RGB)], valid)
    with torch.no_grad():
        pred = model().eval()(sample["sar"][None])[0].numpy()
    _, own_limits = plots.percentile_stretch(pred[list(plots.RGB)], valid)
    # the limits of each stretch are written under its panels, in reflectance x 10000
    assert texts.count(plots.stretch_label(true_limits)) == 2  # true RGB and the prediction in the truth's stretch
    assert texts.count(plots.stretch_label(own_limits)) == 1
    assert plots.stretch_label(own_limits) != plots.stretch_label(true_limits)


def test_tile_label_falls_back_to_the_file_stem(tmp_path, dataset):
    class NoSidecars:
        paths = [tmp_path / "x" / "some_tile.npz"]

    assert plots.tile_label(NoSidecars(), 0) == "some_tile"
    assert plots.tile_label(dataset, 0) == read_sidecar(dataset.paths[0])["tile_id"]


def test_sample_panel_writes_a_png_and_returns_the_same_pixels(tmp_path, dataset):
    image = plots.sample_panel(tmp_path / "s.png", model(), dataset, CPU, 1)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    on_disk = imread(tmp_path / "s.png")
    assert on_disk.shape[:2] == image.shape[:2]
    assert np.array_equal((on_disk[..., :3] * 255).round().astype(np.uint8), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]


def test_plotting_draws_no_random_numbers_and_restores_training_mode(dataset):
    net = model()
    net.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    plots.sample_figure(net, dataset, CPU, 2)
    assert torch.equal(torch.get_rng_state(), before)
    assert net.training


def test_refresh_writes_loss_curve_and_samples(tmp_path, dataset):
    records = [{"step": 1, "split": "train", "loss": 0.5}, {"step": 2, "split": "val", "val_loss": 0.4}]
    plots.refresh(tmp_path, records, model(), dataset, CPU, 2, 1)
    assert imread(tmp_path / "plots" / "loss.png").shape[2] in (3, 4)
    assert imread(tmp_path / "samples" / "step_2.png").shape[2] in (3, 4)


# --------------------------------------------------------------------------- TensorBoard


def test_samples_go_to_tensorboard_as_the_same_image(tmp_path, dataset):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = loggers.open_loggers(tmp_path, 0, ["tensorboard"])
    plots.refresh(tmp_path, [], model(), dataset, CPU, 3, 1, events=log)
    log.close()
    accumulator = EventAccumulator(str(tmp_path / TENSORBOARD), size_guidance={"images": 0})
    accumulator.Reload()
    assert accumulator.Tags()["images"] == ["samples"]
    (entry,) = accumulator.Images("samples")
    png = imread(tmp_path / "samples" / "step_3.png")
    assert entry.step == 3 and (entry.height, entry.width) == png.shape[:2]


# --------------------------------------------------------------------------- output initialisation


def test_band_means_are_the_float64_mean_over_valid_pixels(dataset):
    sums, count = np.zeros(4), 0
    for index in range(len(dataset)):
        sample = dataset[index]
        valid = sample["mask"][0].numpy() > 0
        sums += sample["optical"].numpy().astype(np.float64)[:, valid].sum(axis=1)
        count += valid.sum()
    means = band_means(dataset)
    assert means == pytest.approx(tuple(sums / count), rel=1e-12)
    assert all(0.0 < m < 1.0 for m in means)


def test_band_means_are_the_same_bits_from_refs_and_from_the_dataset_and_on_every_call(demo_tiles, dataset):
    refs = list_tiles(demo_tiles)
    assert band_means(refs) == band_means(dataset) == band_means(list(reversed(refs))[::-1])
    augmented = TileDataset(refs, seed=5, augment=True)  # int keys are never augmented
    assert band_means(augmented) == band_means(dataset)


def test_band_means_read_a_bounded_evenly_spaced_sample(dataset):
    class Counting:
        def __init__(self, inner):
            self.inner, self.read = inner, []

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, index):
            self.read.append(index)
            return self.inner[index]

    counting = Counting(dataset)
    band_means(counting, max_tiles=3)
    assert counting.read == [0, 2, 4]


def test_band_means_without_valid_pixels_is_none():
    class Empty:
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"optical": torch.ones(4, 8, 8), "mask": torch.zeros(1, 8, 8)}

    assert band_means(Empty()) is None
    assert band_means([]) is None


def test_untrained_model_starts_at_the_band_means(dataset):
    means = band_means(dataset)
    net = model(output_bias=means).eval()
    with torch.no_grad():
        out = net(dataset[0]["sar"][None])[0]
    assert out.mean(dim=(1, 2)).tolist() == pytest.approx(means, abs=0.01)
    assert net.head.bias.tolist() == pytest.approx([math.log(m / (1 - m)) for m in means], rel=1e-6)


def test_output_bias_scales_the_head_and_draws_no_random_numbers():
    plain = model(seed=3)
    after_plain = torch.get_rng_state()
    initialised = model(seed=3, output_bias=(0.1, 0.1, 0.1, 0.3))
    assert torch.equal(torch.get_rng_state(), after_plain)
    assert torch.equal(initialised.head.weight, plain.head.weight * HEAD_WEIGHT_SCALE)
    for name, tensor in plain.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tensor, initialised.state_dict()[name]), name


def test_output_bias_refuses_wrong_or_non_finite_means():
    with pytest.raises(ValueError, match="4 finite band means"):
        init_output_bias(model(), (0.1, 0.2))
    with pytest.raises(ValueError, match="4 finite band means"):
        init_output_bias(model(), (0.1, 0.2, float("nan"), 0.3))


def test_linear_head_starts_at_the_band_means_and_carries_the_statistics(dataset):
    means, stds = band_stats(dataset)
    assert means == band_means(dataset)
    torch.manual_seed(0)
    net = UNet(width=8, dropout=0.1, target_stats=(means, stds)).eval()
    assert net.target_mean.tolist() == pytest.approx(means) and net.target_std.tolist() == pytest.approx(stds)
    assert net.band_scale is net.target_std and {"target_mean", "target_std"} <= set(net.state_dict())
    with torch.no_grad():
        out = net(dataset[0]["sar"][None])[0]
    assert out.mean(dim=(1, 2)).tolist() == pytest.approx(means, abs=0.5 * min(stds))
    assert model().band_scale is None and "target_mean" not in model().state_dict()


def test_band_stats_are_the_float64_standard_deviation_over_valid_pixels(dataset):
    sample = np.stack([dataset[i]["optical"].numpy().astype(np.float64) for i in range(len(dataset))])
    valid = np.stack([dataset[i]["mask"].numpy()[0] > 0 for i in range(len(dataset))])
    expected = [sample[:, band][valid].std() for band in range(4)]
    assert band_stats(dataset)[1] == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------- the loss plot


def test_loss_plot_has_integer_step_ticks_and_a_visible_train_line_in_a_short_run():
    records = [{"step": 4, "split": "train", "loss": 0.9}, {"step": 4, "split": "val", "val_loss": 1.0},
               {"step": 8, "split": "train", "loss": 0.8}, {"step": 8, "split": "val", "val_loss": 0.95}]
    fig = plots.loss_figure(records)
    plots.render(fig)  # ticks are placed when the figure is drawn
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    train = [line for line in ax.get_lines() if line.get_label() == "train loss"][0]
    assert list(train.get_xdata()) == [4, 8] and train.get_marker() not in (None, "None", "")


def test_early_samples_are_not_white_with_the_output_initialised(dataset):
    sample = dataset[0]
    valid = sample["mask"][0].numpy() > 0
    _, limits = plots.percentile_stretch(sample["optical"].numpy()[list(plots.RGB)], valid)

    def brightness(net) -> float:
        with torch.no_grad():
            pred = net.eval()(sample["sar"][None])[0].numpy()
        shown, _ = plots.percentile_stretch(pred[list(plots.RGB)], valid, limits)
        return float(np.nanmean(shown))

    assert brightness(model()) > 0.95  # the default init: a white picture
    assert brightness(model(output_bias=band_means(dataset))) < 0.8
