"""Experiment harness: U-Net variants on bench_quality's validation scenes, without changing the trainer.

Not one of the ratio benchmarks (``python -m benchmarks`` does not run it). It trains the Stage-1
U-Net exactly as `benchmarks.bench_quality` does (`bench_quality.train_unet`, the trainer's
defaults on the same tiles) with one or more *variants* switched in from the outside, and reports
the clear-validation figures of the final weights and of exponential moving averages (EMA) of the
weights at several decays, which a single run can track without changing its training at all.
The variants replace trainer internals by assignment (``axs_lib.stage1.train.stage1_loss``,
``band_stats``, ``Stage1Trainer.train_step``, ``TileDataset.__getitem__``): a prototype, to be
measured before anything moves into the trainer, and tied to the trainer's current names.

``python -m benchmarks.quality_variants VARIANT SEED[,SEED...] [--baselines] [--out FILE.jsonl]``
(with several seeds, the mean of their final models' predictions is scored as weights ``mean``); VARIANT is
one or more of these, joined by commas:

* ``default``: nothing switched (the linear head centred on each band's training mean);
* ``median``: the head centred on each band's training median instead (the best constant under
  the L1 loss; reflectance is skewed, so the mean sits far above it: B4 mean 371, median 197 on
  the validation mode's training tiles); ``median_visible``: the median for B2, B3 and B4 and the
  mean for B8. The median is taken over the same pixels as `band_stats`'s mean;
* ``mad``: the L1 divides each band's error by its training median absolute deviation instead of
  its standard deviation (rescaled so that the mean per-band weight is unchanged);
* ``log``: the L1 taken on ``log(reflectance + 0.01)``, each band divided by the standard deviation
  of that log over the training pixels;
* ``gain<S>``: per-tile SAR radiometric augmentation: N(0, S dB) added to VV and VH alike and a
  further N(0, S/2 dB) to VH alone, drawn from ``derive_seed(seed, "gain", epoch, index)``;
* ``wd<X>``, ``w<N>``, ``bs<N>``, ``drop<X>``, ``lr<X>``, ``steps<N>``, ``speckle<X>``, ``members<K>``,
  ``clip<X>``: the trainer's ``--weight-decay``, ``--width``, ``--batch-size``, ``--dropout``, ``--lr``,
  ``--steps``, ``--speckle-std``, ``--members``, ``--grad-clip``;
* ``cutmix<P>``: with probability P a training sample gets a rectangle (each side 30-70 % of the
  tile's) of another training tile pasted in, SAR, optical and mask alike: a tile that is part
  water and part land, so that the model has to decide locally rather than tile by tile;
* ``groupnorm``: the trainer's ``--block groupnorm`` (the blocks before the residual shortcut);
* ``norm<kind>``: the GroupNorm blocks with their normalisation replaced: ``none`` (convolutions with
  bias, nothing normalised), ``first`` (no normalisation in the first block only), ``ln`` (LayerNorm
  over the channels of each pixel);
* ``l2mix<W>``: the loss ``|e| + W e^2`` on the standardised error ``e`` of each band;
* ``crop<N>``: training samples cropped to N x N at an offset drawn per (epoch, tile);
* ``bandpow<A>``: each band's error divided by ``std_b ** (1 - A) * g ** A`` (``g`` the geometric
  mean of the bands' standard deviations) instead of ``std_b``: A = 0 is the trainer's loss, A = 1
  weighs every band in reflectance units, as the overall MAE does (where B8 is most of the error);
* ``instd``: the SAR input standardised per channel (mean and standard deviation of the training
  pixels) before the first block, as the pixel MLP's inputs are; the normalised dB values otherwise
  span about 0.2 per 10 dB;
* ``pix``: a per-pixel branch (1x1 convolutions 2 -> 64 -> 64 -> 4, SiLU) from the input straight
  to the head's output, added to it: the pixel MLP inside the U-Net;
* ``mse``: the squared standardised error instead of its absolute value (the conditional mean, as
  the pixel MLP fits, instead of the median).

Every final model is also scored as ``tta``: the mean of its predictions over the eight flips and
quarter turns of the tile (the training augmentation's group), each mapped back.

``--split cv<k>`` (k = 0, 1, 2) is cross-validation over the *training* scenes: a training scene's
fold is ``sha256(CV_SALT + scene) % 3``; fold k is evaluated and the other two train, and the test
scenes take no part. Three folds of 8, 8 and 9 tiles evaluate every training tile once, where the
validation mode evaluates 7 tiles of two scenes, so a choice made on them rests on every training place.

EMA (`WeightAverage`): after every optimizer step, ``avg += (w - avg) * (1 - d) / (1 - d**t)`` for
step t = 1, 2, ...: the bias-corrected average (as Adam's moments), so the untrained starting
weights carry no weight of their own; the first step sets ``avg = w``.

Figures go to ``--out`` (JSON lines: variant, weights, seed, split, set, MAE / RMSE overall and per
band) and are printed; ``--split test`` evaluates on the held-out scenes instead (for the one
candidate kept, once).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import bench_quality as bq

EMA_DECAYS = (0.99, 0.995, 0.998, 0.999, 0.9995, 0.9998)
LOG_EPS = 0.01  # reflectance 100: the log's offset, so water (reflectance near 0) stays finite
TRAINER_OPTIONS = (("wd", "weight_decay", float), ("w", "width", int), ("bs", "batch_size", int), ("drop", "dropout", float),
                   ("lr", "lr", float), ("steps", "steps", int), ("speckle", "speckle_std", float), ("members", "members", int),
                   ("clip", "grad_clip", float))
CV_FOLDS = 3
CV_SALT = "cv11:"  # the first salt (of cv0: .. cv39:) that splits the 25 training tiles 8 / 8 / 9


class WeightAverage:
    """Bias-corrected exponential moving averages of a model's parameters, one per decay.

    ``update(model)`` after each optimizer step; ``state_dict(model, decay)`` is the model's state
    dict with the averaged parameters (buffers as the model has them), ready for ``load_state_dict``.
    """

    def __init__(self, model: torch.nn.Module, decays=EMA_DECAYS):
        self.averages = {d: [p.detach().clone() for p in model.parameters()] for d in decays}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        params = [p.detach() for p in model.parameters()]
        for d, average in self.averages.items():
            torch._foreach_lerp_(average, params, (1.0 - d) / (1.0 - d**self.updates))

    def state_dict(self, model: torch.nn.Module, decay: float) -> dict:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for (name, _), average in zip(model.named_parameters(), self.averages[decay]):
            state[name] = average.clone()
        return state


def _pixels(paths) -> np.ndarray:
    """(P, 4) training reflectance normalised to [0, 1] over valid pixels."""
    return bq.pixels(paths)[1] / bq.OPTICAL_RANGE[1]


def install(parts: list[str], train_paths, holder: dict) -> None:
    """Switch the variants in ``parts`` into the trainer; ``holder`` receives the `WeightAverage`."""
    import axs_lib.data as data
    import axs_lib.stage1.train as train
    from axs_lib.stage1.losses import masked_l1, stage1_loss
    from axs_lib.stage1.model import band_stats

    y = _pixels(train_paths)
    if "median" in parts or "median_visible" in parts:
        bands = 4 if "median" in parts else 3
        train.band_stats = lambda dataset, max_tiles=64: _centred_on_medians(band_stats, dataset, max_tiles, bands)
    if "mad" in parts:
        std, mad = y.std(0), np.median(np.abs(y - np.median(y, 0)), 0)
        weights = (1 / mad) / np.mean(1 / mad) * np.mean(1 / std)
        scale = torch.tensor(1 / weights, dtype=torch.float32)
        train.stage1_loss = lambda pred, target, mask, l1_weight=1.0, ssim_weight=0.0, band_scale=None: stage1_loss(
            pred, target, mask, l1_weight, ssim_weight, scale.to(pred.device))
    if "log" in parts:
        log_std = torch.tensor(np.log(y + LOG_EPS).std(0), dtype=torch.float32).reshape(1, -1, 1, 1)

        def log_loss(pred, target, mask, l1_weight=1.0, ssim_weight=0.0, band_scale=None):
            log_pred = torch.log(pred.clamp_min(-LOG_EPS + 1e-3) + LOG_EPS)
            return l1_weight * masked_l1(log_pred / log_std, torch.log(target + LOG_EPS) / log_std, mask)
        train.stage1_loss = log_loss
    depth = [p for p in parts if p.startswith("depth")]
    if depth:
        import axs_lib.stage1.model as model_module
        model_module.DEPTH = int(depth[0][len("depth"):])
        model_module.STRIDE = 2**model_module.DEPTH
    norms = [p for p in parts if p.startswith("norm")]
    if norms:
        _install_norm(norms[0][len("norm"):])
    mixes = [p for p in parts if p.startswith("l2mix")]
    if mixes:
        weight = float(mixes[0][len("l2mix"):])

        def mix_loss(pred, target, mask, l1_weight=1.0, ssim_weight=0.0, band_scale=None):
            scale = band_scale.to(pred.dtype).reshape(1, -1, 1, 1)
            err = (pred - target) / scale
            count = (mask.sum() * pred.shape[1]).clamp_min(1.0)
            return ((err.abs() + weight * err**2) * mask).sum() / count
        train.stage1_loss = mix_loss
    pows = [p for p in parts if p.startswith("bandpow")]
    if pows:
        alpha = float(pows[0][len("bandpow"):])

        def pow_loss(pred, target, mask, l1_weight=1.0, ssim_weight=0.0, band_scale=None):
            std = band_scale.double()
            scale = (std ** (1 - alpha) * std.log().mean().exp() ** alpha).to(band_scale.dtype)
            return stage1_loss(pred, target, mask, l1_weight, ssim_weight, scale)
        train.stage1_loss = pow_loss
    if "instd" in parts or "pix" in parts:
        _install_input_paths(train_paths, "instd" in parts, "pix" in parts)
    if "mse" in parts:
        def mse_loss(pred, target, mask, l1_weight=1.0, ssim_weight=0.0, band_scale=None):
            err = (pred - target) / band_scale.to(pred.dtype).reshape(1, -1, 1, 1)
            return (err**2 * mask).sum() / (mask.sum() * pred.shape[1]).clamp_min(1.0)
        train.stage1_loss = mse_loss
    crops = [p for p in parts if p.startswith("crop")]
    if crops:
        _install_crop(data, train, int(crops[0][len("crop"):]))
    mixes = [p for p in parts if p.startswith("cutmix")]
    if mixes:
        _install_cutmix(data, train, float(mixes[0][len("cutmix"):]))
    gains = [p for p in parts if p.startswith("gain")]
    if gains:
        _install_gain(data, train, float(gains[0][len("gain"):]))

    original_step = train.Stage1Trainer.train_step

    def train_step(self, step):
        holder.setdefault("ema", WeightAverage(self.model))
        holder.setdefault("model", self.model)
        total = original_step(self, step)
        holder["ema"].update(self.model)
        return total
    train.Stage1Trainer.train_step = train_step


class DihedralMean(torch.nn.Module):
    """The mean of a model's predictions over the 8 flips and quarter turns of its input, each mapped back."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sar: torch.Tensor) -> torch.Tensor:
        total = None
        for turns in range(4):
            for flip in (False, True):
                x = torch.rot90(sar, turns, (-2, -1))
                x = x.flip(-1) if flip else x
                y = self.model(x)
                y = y.flip(-1) if flip else y
                y = torch.rot90(y, -turns, (-2, -1))
                total = y if total is None else total + y
        return total / 8


def _centred_on_medians(band_stats, dataset, max_tiles: int, bands: int):
    """`band_stats` with the first ``bands`` centres replaced by the median over the same tiles and pixels."""
    means, stds = band_stats(dataset, max_tiles)
    n = len(dataset)
    pixels = []
    for index in sorted({i * n // min(n, max_tiles) for i in range(min(n, max_tiles))}):
        sample = dataset[index]
        pixels.append(sample["optical"].numpy().astype(np.float64)[:, sample["mask"].numpy()[0] > 0])
    medians = np.median(np.concatenate(pixels, axis=1), axis=1)
    return tuple(float(m) for m in medians[:bands]) + tuple(means[bands:]), stds


def _install_input_paths(train_paths, standardise: bool, pixel_branch: bool) -> None:
    import axs_lib.stage1.model as model_module
    from torch import nn

    sar = bq.pixels(train_paths)[0][:, :2]  # (P, 2) dB, valid pixels
    normalised = (sar - bq.SAR_DB_RANGE[0]) / (bq.SAR_DB_RANGE[1] - bq.SAR_DB_RANGE[0])
    mean = torch.tensor(normalised.mean(0), dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(normalised.std(0), dtype=torch.float32).reshape(1, -1, 1, 1)
    cls = model_module.UNet
    original_init, original_forward = cls.__init__, cls.forward

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if pixel_branch:
            self.pixel = nn.Sequential(nn.Conv2d(2, 64, 1), nn.SiLU(), nn.Conv2d(64, 64, 1), nn.SiLU(), nn.Conv2d(64, 4, 1))
            with torch.no_grad():
                self.pixel[-1].weight.mul_(model_module.HEAD_WEIGHT_SCALE)
                self.pixel[-1].bias.zero_()

    def forward(self, sar):
        x = (sar - mean) / std if standardise else sar
        out = original_forward(self, x)  # head * target_std + target_mean
        return out + self.pixel(x) * self.target_std[:, None, None] if pixel_branch else out
    cls.__init__ = init
    cls.forward = forward


def _augment_samples(data, train, stream: str, change) -> None:
    """Wrap ``TileDataset.__getitem__``: every training sample (augmented, with an epoch) is handed
    to ``change(dataset, sample, generator, index, read)``, with a generator seeded from
    ``derive_seed(seed, stream, epoch, index)`` and ``read(dataset, i)`` the unwrapped reader."""
    original = data.TileDataset.__getitem__

    def getitem(self, key):
        out = original(self, key)
        epoch, index = int(getattr(key, "epoch", -1)), int(key)
        if self.augment and epoch >= 0:
            change(self, out, torch.Generator().manual_seed(train.derive_seed(self.seed, stream, epoch, index)), index, original)
        return out
    data.TileDataset.__getitem__ = getitem


def _install_cutmix(data, train, prob: float) -> None:
    def paste(dataset, out, g, index, read):
        if len(dataset) < 2:
            return
        draw = torch.rand(6, generator=g, dtype=torch.float64).tolist()
        if draw[0] >= prob:
            return
        other = min(int(draw[1] * (len(dataset) - 1)), len(dataset) - 2)
        other += other >= index
        donor = read(dataset, other)
        h, w = out["sar"].shape[-2:]
        if donor["sar"].shape[-2:] != (h, w):
            return
        ch, cw = int(h * (0.3 + 0.4 * draw[2])), int(w * (0.3 + 0.4 * draw[3]))
        top, left = int(draw[4] * (h - ch + 1)), int(draw[5] * (w - cw + 1))
        for name in ("sar", "optical", "mask"):
            out[name] = out[name].clone()
            out[name][..., top:top + ch, left:left + cw] = donor[name][..., top:top + ch, left:left + cw]
    _augment_samples(data, train, "cutmix", paste)


def _install_gain(data, train, sigma: float) -> None:
    span = bq.SAR_DB_RANGE[1] - bq.SAR_DB_RANGE[0]

    def shift(dataset, out, g, index, read):
        shared, vh = torch.randn(2, generator=g, dtype=torch.float64).tolist()
        offsets = torch.tensor([sigma * shared, sigma * shared + sigma / 2 * vh], dtype=torch.float32) / span
        out["sar"] = torch.where(out["mask"] > 0, (out["sar"] + offsets[:, None, None]).clamp(0, 1), out["sar"])
    _augment_samples(data, train, "gain", shift)


def _install_norm(kind: str) -> None:
    """The U-Net's blocks with another normalisation: ``none`` (convolutions with bias, no norm),
    ``first`` (no norm in the first block only: GroupNorm there removes each tile's mean backscatter),
    ``ln`` (per-pixel LayerNorm over channels)."""
    import axs_lib.stage1.model as model_module
    from torch import nn

    class ChannelNorm(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.norm = nn.LayerNorm(channels)

        def forward(self, x):
            return self.norm(x.movedim(1, -1)).movedim(-1, 1)

    original = model_module._block

    def block(cin, cout):
        use_plain = kind == "none" or (kind == "first" and cin == model_module.IN_CHANNELS)
        if kind == "ln":
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), ChannelNorm(cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), ChannelNorm(cout), nn.SiLU())
        if use_plain:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.SiLU())
        return original(cin, cout)
    model_module.BLOCK_TYPES["groupnorm"] = block


def _install_crop(data, train, size: int) -> None:
    """Training samples cropped to ``size`` x ``size`` at an offset drawn per (epoch, tile)."""
    def crop(dataset, out, g, index, read):
        h, w = out["sar"].shape[-2:]
        top = int(torch.randint(0, h - size + 1, (1,), generator=g))
        left = int(torch.randint(0, w - size + 1, (1,), generator=g))
        for name in ("sar", "optical", "mask"):
            out[name] = out[name][..., top:top + size, left:left + size].contiguous()
    _augment_samples(data, train, "crop", crop)


def cv_fold(stem: str) -> int:
    """A training scene's cross-validation fold: ``sha256(CV_SALT + scene) % CV_FOLDS``."""
    return int(bq.hashlib.sha256((CV_SALT + bq.scene_of(stem)).encode()).hexdigest(), 16) % CV_FOLDS


def split(paths, name: str):
    """(training tiles, evaluated tiles) for ``validation``, ``test`` or ``cv<k>`` (the training scenes
    of fold k evaluated, the other folds trained on; the test scenes take no part)."""
    if not name.startswith("cv"):
        return bq.split_tiles(paths, name == "validation")
    k = int(name[2:])
    pool = [q for q in paths if not bq.held_out(q.stem)]
    return [q for q in pool if cv_fold(q.stem) != k], [q for q in pool if cv_fold(q.stem) == k]


def trainer_args(parts: list[str], seed: int) -> argparse.Namespace:
    args = argparse.Namespace(seed=seed)
    if "groupnorm" in parts or any(p.startswith("norm") for p in parts):
        args.block = "groupnorm"  # the earlier blocks, or (norm<kind>) those with their normalisation replaced
    for part in parts:
        for prefix, name, kind in TRAINER_OPTIONS:
            rest = part[len(prefix):]
            if part.startswith(prefix) and rest[:1].isdigit():
                setattr(args, name, kind(rest))
                break
    return args


def summary(result: dict) -> dict:
    overall, bands = result["overall"], result["bands"]
    return {"mae": overall["mae"], "rmse": overall["rmse"], **{f"{b}_mae": bands[b]["mae"] for b in bands},
            **{f"{b}_rmse": bands[b]["rmse"] for b in bands}}


def main(argv=None) -> list[dict]:
    from axs_lib.ingest import write_demo_tiles
    from axs_lib.stage1.predict import evaluate_model, load_model, load_predictor

    p = argparse.ArgumentParser(prog="python -m benchmarks.quality_variants", description=__doc__.split("\n\n")[0])
    p.add_argument("variant")
    p.add_argument("seed", type=lambda text: [int(x) for x in text.split(",")],
                   help="a seed, or several (42,7,123): each trains, and the mean of their predictions is scored too")
    p.add_argument("--split", choices=("validation", "test") + tuple(f"cv{k}" for k in range(CV_FOLDS)), default="validation")
    p.add_argument("--baselines", action="store_true", help="also the constant median and the pixel MLP")
    p.add_argument("--out", type=Path, default=Path("quality_variants.jsonl"))
    a = p.parse_args(argv)
    parts = a.variant.split(",")
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="axs-quality-variants-") as tmp:
        work = Path(tmp)
        write_demo_tiles(work / "demo")
        paths = bq.gather_tiles([work / "demo"] + ([bq.BENV1] if bq.BENV1.is_dir() else []))
        train_paths, tests = split(paths, a.split)
        train_clear = [q for q in train_paths if not bq.flagged(q)]
        sets = {"clear": [q for q in tests if bq.clear(q)], "all": tests}
        if a.baselines:
            for name, fit in (("median", bq.fit_median(train_clear)), ("pixel MLP", bq.fit_pixel_mlp(train_clear))):
                rows += [{"variant": name, "weights": "", "seed": 0, "split": a.split, "set": s,
                          **summary(bq.evaluate_pixel_model(fit, tiles)),
                          "per_tile": {q.stem: bq.evaluate_pixel_model(fit, [q])["overall"]["mae"] for q in tiles}}
                         for s, tiles in sets.items()]
        holder: dict = {}
        install(parts, train_clear, holder)
        train_dir = bq.materialise_train_dir(train_paths, work / "train")
        ckpts = []
        for seed in a.seed:
            holder.clear()  # this seed's weight averages
            ckpts.append(bq.train_unet(train_dir, work / f"run_{seed}", trainer_args(parts, seed)))
            model, _ = load_model(ckpts[-1])
            weights = {"final": None, **{f"ema{d}": holder["ema"].state_dict(holder["model"], d) for d in EMA_DECAYS}}
            for label, state in weights.items():
                if state is not None:
                    model.load_state_dict(state)
                rows += [{"variant": a.variant, "weights": label, "seed": seed, "split": a.split, "set": s,
                          **summary(evaluate_model(model, tiles)),
                          "per_tile": {q.stem: evaluate_model(model, [q])["overall"]["mae"] for q in tiles}}
                         for s, tiles in sets.items() if s == "clear" or label == "final"]
            model.load_state_dict(holder["model"].state_dict())
            tta = DihedralMean(model)
            rows += [{"variant": a.variant, "weights": "tta", "seed": seed, "split": a.split, "set": s,
                      **summary(evaluate_model(tta, tiles)),
                      "per_tile": {q.stem: evaluate_model(tta, [q])["overall"]["mae"] for q in tiles}}
                     for s, tiles in sets.items()]
        if len(ckpts) > 1:
            mean = load_predictor(ckpts)
            rows += [{"variant": a.variant, "weights": "mean", "seed": ",".join(map(str, a.seed)), "split": a.split,
                      "set": s, **summary(evaluate_model(mean, tiles))} for s, tiles in sets.items()]
            mean_tta = DihedralMean(mean)
            rows += [{"variant": a.variant, "weights": "mean+tta", "seed": ",".join(map(str, a.seed)), "split": a.split,
                      "set": s, **summary(evaluate_model(mean_tta, tiles))} for s, tiles in sets.items()]
    with a.out.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for r in rows:
        if r["set"] == "clear":
            print(f"{r['variant']:>12} {r['weights']:>9} seed {r['seed']!s:<4} MAE {r['mae']:.0f} RMSE {r['rmse']:.0f}  "
                  + " ".join(f"{b} {r[b + '_mae']:.0f}" for b in ("B2", "B3", "B4", "B8")))
    print(f"({time.perf_counter() - started:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
