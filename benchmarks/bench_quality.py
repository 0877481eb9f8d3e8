"""Model-quality benchmark: the Stage-1 U-Net against per-pixel baselines on held-out *places*.

Data: every real tile pair at hand: the six demo pairs (``axs tiles demo``, written here) and the
BigEarthNet v1 pairs in ``../shared/data/benv1`` when that folder exists (``--data-dir`` adds or
replaces folders). Synthetic tiles never count.

Held-out split (fixed, never tuned): a tile's *scene* is its stem up to the S2 acquisition, i.e. the
first three ``_``-separated fields (``S2B_MSIL2A_20180515T094029`` for
``S2B_MSIL2A_20180515T094029_32_47``); tiles of one scene are one place and one pass of the
satellite. A scene is held out when ``int(sha256(scene).hexdigest(), 16) % 3 == 0`` (`held_out`),
about a third of the scenes; every tile of a held-out scene is a test tile and no tile of it ever
trains. On the 36 tiles at hand: 25 train, 11 test (10 scenes).

Validation (``--validation``), for choosing defaults without looking at the test scenes: a
training scene is a validation scene when ``int(sha256("val:" + scene).hexdigest(), 16) % 4 == 0``
(`validation_scene`). In that mode the test scenes are left out altogether, the validation scenes
are held out from training, and every figure is on them instead.

Every method sees the same training tiles, with the sidecar cloud/snow flags applied as the trainer
applies them (flagged tiles never train):

* ``median``: the per-band median of every valid training pixel, predicted everywhere (a constant);
* ``ridge``: per-pixel ridge regression of each band on [VV, VH, VV - VH] in dB;
* ``pixel MLP``: a per-pixel network (3 -> 64 -> 64 -> 4, SiLU) on the same features, L2 on
  standardised bands, `MLP_STEPS` Adam steps on random batches of 4096 pixels (seeded);
* ``U-Net``: `axs_lib.stage1.train.train_stage1` at the trainer's defaults (the step count scales
  with the training tiles) unless ``--steps`` / ``--width`` say otherwise; its final checkpoint is
  evaluated through `axs_lib.stage1.predict.evaluate_checkpoint`, the code of ``axs evaluate``.

Metrics are `axs_lib.stage1.metrics.QualityMetrics` (pooled PSNR at range 10000; SSIM at each true
tile's 2-98 % range; SAM over pixels brighter than 0.03), on two test sets: *all* test tiles, and *clear*
test tiles: those without a cloud/snow flag whose median true blue (B2) is at most `CLEAR_B2_MAX`
(reflectance 0.2; the v1 sidecars here carry no cloud flags, and a SAR model cannot predict a
cloud). The rule matches the one flagged tile at hand (seasonal snow, median B2 above 0.3).

``python -m benchmarks --only bench_quality``; ``--quick`` trains a tiny U-Net for a few steps (a
smoke test of the pipeline, not a quality figure).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from axs_lib.run_dir import CHECKPOINTS, checkpoint_name
from axs_lib.stage1.metrics import BANDS, QualityMetrics
from axs_lib.tiles import OPTICAL_RANGE, SAR_DB_RANGE, list_tiles, read_sidecar, read_tile

BENV1 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "benv1"
HELD_OUT_MODULUS = 3
VALIDATION_MODULUS = 4
CLEAR_B2_MAX = 2000.0  # reflectance 0.2 x 10000: median blue above it is cloud or snow
CLOUD_SNOW_FLAGS = ("cloud_or_shadow", "seasonal_snow")
MLP_STEPS = 3000
ENSEMBLE = "U-Net, mean of the seeds"  # the row of the runs' averaged predictions (with --seeds)
MLP_BATCH = 4096
QUICK = {"steps": 6, "width": 4, "mlp_steps": 50}


def scene_of(stem: str) -> str:
    """The S2 scene (place and pass) of a tile stem: its first three ``_``-separated fields."""
    return "_".join(stem.split("_")[:3])


def held_out(stem: str) -> bool:
    """Whether the tile's scene is held out: ``sha256(scene) % 3 == 0``."""
    return int(hashlib.sha256(scene_of(stem).encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def validation_scene(stem: str) -> bool:
    """Whether a (training) tile's scene is a validation scene: ``sha256("val:" + scene) % 4 == 0``."""
    digest = hashlib.sha256(("val:" + scene_of(stem)).encode()).hexdigest()
    return int(digest, 16) % VALIDATION_MODULUS == 0


def flagged(path: Path) -> bool:
    return bool(set(read_sidecar(path).get("quality_flags") or []) & set(CLOUD_SNOW_FLAGS))


def clear(path: Path) -> bool:
    """No cloud/snow flag and a median true blue (B2) of at most `CLEAR_B2_MAX`."""
    tile = read_tile(path)
    return not flagged(path) and float(np.nanmedian(tile.optical[0])) <= CLEAR_B2_MAX


# --------------------------------------------------------------------------- data


def gather_tiles(data_dirs: list[Path]) -> list[Path]:
    """Every tile of ``data_dirs``, sorted by name; a stem in two folders is an error."""
    paths: list[Path] = []
    for d in data_dirs:
        paths += list_tiles(d)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise SystemExit("bench_quality: the same tile stem appears in two data folders")
    return sorted(paths, key=lambda p: p.name)


def split_tiles(paths: list[Path], validation: bool = False) -> tuple[list[Path], list[Path]]:
    """(training tiles, evaluated tiles): the held-out test scenes, or with ``validation`` the validation
    scenes of the training scenes (the test scenes then take no part at all)."""
    train = [p for p in paths if not held_out(p.stem)]
    if not validation:
        return train, [p for p in paths if held_out(p.stem)]
    return [p for p in train if not validation_scene(p.stem)], [p for p in train if validation_scene(p.stem)]


def materialise_train_dir(paths: list[Path], out: Path) -> Path:
    """``out`` with a link to each training tile and a sidecar saying ``split: train`` (so the trainer
    trains on all of them and keeps their quality flags)."""
    out.mkdir(parents=True)
    for path in paths:
        os.symlink(path.resolve(), out / path.name)
        meta = read_sidecar(path) if path.with_suffix(".json").exists() else {}
        meta["split"] = "train"
        (out / f"{path.stem}.json").write_text(json.dumps(meta))
    return out


def pixels(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(features (P, 3): VV, VH, VV - VH in dB; targets (P, 4) reflectance x 10000) over valid pixels."""
    feats, targets = [], []
    for path in paths:
        tile = read_tile(path)
        valid = np.isfinite(tile.sar).all(0) & np.isfinite(tile.optical).all(0)
        sar = np.clip(tile.sar[:, valid].T.astype(np.float64), *SAR_DB_RANGE)
        feats.append(np.column_stack([sar, sar[:, 0] - sar[:, 1]]))
        targets.append(tile.optical[:, valid].T.astype(np.float64))
    return np.concatenate(feats), np.concatenate(targets)


def tile_features(path: Path) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, tuple[int, int]]:
    tile = read_tile(path)
    sar = np.clip(np.nan_to_num(tile.sar, nan=SAR_DB_RANGE[0]).astype(np.float64), *SAR_DB_RANGE)
    feats = np.stack([sar[0], sar[1], sar[0] - sar[1]]).reshape(3, -1).T
    mask = np.isfinite(tile.sar).all(0) & np.isfinite(tile.optical).all(0)
    target = np.nan_to_num(tile.optical) / OPTICAL_RANGE[1]
    return feats, torch.from_numpy(target[None]).float(), torch.from_numpy(mask[None, None].astype(np.float32)), sar.shape[1:]


# --------------------------------------------------------------------------- baselines


def fit_median(train: list[Path]):
    _, y = pixels(train)
    median = np.median(y, axis=0)
    return lambda feats: np.broadcast_to(median, (feats.shape[0], 4))


def fit_ridge(train: list[Path], alpha: float = 1.0):
    x, y = pixels(train)
    mu, sd = x.mean(0), x.std(0)
    xs = np.column_stack([(x - mu) / sd, np.ones(len(x))])
    reg = alpha * np.eye(xs.shape[1])
    reg[-1, -1] = 0.0
    coef = np.linalg.solve(xs.T @ xs + reg, xs.T @ y)
    return lambda feats: np.column_stack([(feats - mu) / sd, np.ones(len(feats))]) @ coef


def fit_pixel_mlp(train: list[Path], steps: int = MLP_STEPS, seed: int = 0):
    x, y = pixels(train)
    mu, sd, ym, ys = x.mean(0), x.std(0), y.mean(0), y.std(0)
    xt = torch.from_numpy((x - mu) / sd).float()
    yt = torch.from_numpy((y - ym) / ys).float()
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (MLP_BATCH,), generator=g)
        loss = torch.nn.functional.mse_loss(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()

    def predict(feats):
        with torch.no_grad():
            out = net(torch.from_numpy((feats - mu) / sd).float()).double().numpy()
        return out * ys + ym
    return predict


def evaluate_pixel_model(predict, tests: list[Path]) -> dict:
    metrics = QualityMetrics()
    for path in tests:
        feats, target, mask, shape = tile_features(path)
        pred = np.asarray(predict(feats)).T.reshape(4, *shape) / OPTICAL_RANGE[1]
        metrics.update(torch.from_numpy(np.ascontiguousarray(pred[None])), target, mask)
    return metrics.result()


# --------------------------------------------------------------------------- the U-Net


def train_unet(train_dir: Path, out: Path, args, seed: int | None = None) -> Path:
    from axs_lib.stage1.config import build_config
    from axs_lib.stage1.train import ResumeRequest, train_stage1

    seed = args.seed if seed is None else seed
    explicit = {"data_dir": str(train_dir), "output_dir": str(out), "seed": seed, "split_source": "sidecar",
                "plots": False, "tensorboard": False, "quiet": True, "checkpoint_every": 10**9}
    for name in ("steps", "width", "batch_size", "lr", "ssim_weight", "head", "block", "dropout", "l1_weight", "weight_decay",
                 "warmup_steps", "speckle_std", "members", "grad_clip"):
        if getattr(args, name, None) is not None:
            explicit[name] = getattr(args, name)
    config = build_config(explicit)
    config.data_dir, config.output_dir = explicit["data_dir"], explicit["output_dir"]
    result = train_stage1(config, ResumeRequest(), log=lambda line: None)
    if result.exit_code:
        raise RuntimeError(f"U-Net training failed with exit {result.exit_code}")
    return out / CHECKPOINTS / checkpoint_name(result.final_step)


# --------------------------------------------------------------------------- report


def summary_table(results: dict[str, dict]) -> str:
    lines = ["| method | MAE | RMSE | PSNR (pooled) | SSIM (tile 2-98 % range) | SAM |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        o = r["overall"]
        lines.append(f"| {name} | {o['mae']:.0f} | {o['rmse']:.0f} | {o['psnr']:.2f} | {o['ssim']:.3f} | {o['sam']:.2f} |")
    return "\n".join(lines)


def band_table(results: dict[str, dict]) -> str:
    lines = ["| method | band | MAE | RMSE | PSNR | SSIM |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        for band in BANDS:
            m = r["bands"][band]
            lines.append(f"| {name} | {band} | {m['mae']:.0f} | {m['rmse']:.0f} | {m['psnr']:.2f} | {m['ssim']:.3f} |")
    return "\n".join(lines)


def unet_name(seed: int, seeds: list[int]) -> str:
    """The U-Net's row: ``U-Net``, or ``U-Net seed S`` when several seeds are compared."""
    return "U-Net" if len(seeds) == 1 else f"U-Net seed {seed}"


def verdict(results: dict[str, dict]) -> dict:
    """The targets: U-Net MAE and RMSE >= 15 % better than the best per-pixel model; B2-B4 MAE below the median's."""
    unet = results["U-Net"]["overall"]
    pixel = [results[k]["overall"] for k in ("ridge", "pixel MLP")]
    best_mae, best_rmse = min(p["mae"] for p in pixel), min(p["rmse"] for p in pixel)
    out = {"mae_gain": 1 - unet["mae"] / best_mae, "rmse_gain": 1 - unet["rmse"] / best_rmse}
    for band in ("B2", "B3", "B4"):
        out[f"{band}_mae_vs_median"] = results["U-Net"]["bands"][band]["mae"] / results["median"]["bands"][band]["mae"]
        out[f"{band}_rmse_vs_median"] = results["U-Net"]["bands"][band]["rmse"] / results["median"]["bands"][band]["rmse"]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", action="append", type=Path, help="tile folder (repeatable); default: demo tiles + ../shared/data/benv1")
    p.add_argument("--quick", action="store_true", help="a tiny U-Net for a few steps: checks the pipeline, not the quality")
    p.add_argument("--validation", action="store_true",
                   help="tune mode: leave the test scenes out, hold out the validation scenes and report on them")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")],
                   help="train the U-Net once per seed (e.g. 42,7,123) and report each, their spread, and the mean "
                        "of their predictions: a single seed's margin over the per-pixel models can be luck")
    p.add_argument("--steps", type=int, help="U-Net steps (default: the trainer's, scaled to the training tiles)")
    p.add_argument("--width", type=int)
    p.add_argument("--members", type=int, help="U-Nets trained side by side in each run (the trainer's --members)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--ssim-weight", type=float)
    p.add_argument("--l1-weight", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--head", choices=("linear", "sigmoid"))
    p.add_argument("--block", choices=("residual", "groupnorm"))
    p.add_argument("--mlp-steps", type=int, default=MLP_STEPS)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = args.steps or QUICK["steps"]
        args.width = args.width or QUICK["width"]
        args.mlp_steps = QUICK["mlp_steps"]
    return args


def main(argv=None) -> dict:
    from axs_lib.ingest import write_demo_tiles
    from axs_lib.stage1.predict import evaluate_checkpoint

    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="axs-bench-quality-") as tmp:
        work = Path(tmp)
        dirs = args.data_dir
        if not dirs:
            write_demo_tiles(work / "demo")
            dirs = [work / "demo"] + ([BENV1] if BENV1.is_dir() else [])
        paths = gather_tiles(dirs)
        train, tests = split_tiles(paths, args.validation)
        train_clear = [p for p in train if not flagged(p)]
        test_sets = {"all": tests, "clear": [p for p in tests if clear(p)]}
        print(f"quality: {len(paths)} real tiles; train {len(train)} ({len(train) - len(train_clear)} flagged left out), "
              f"{'validation' if args.validation else 'test'} {len(tests)} of {len({scene_of(p.stem) for p in tests})} held-out scenes "
              f"({len(test_sets['clear'])} clear)", flush=True)
        fits = {"median": fit_median(train_clear), "ridge": fit_ridge(train_clear),
                "pixel MLP": fit_pixel_mlp(train_clear, args.mlp_steps)}
        t0 = time.perf_counter()
        seeds = args.seeds or [args.seed]
        train_dir = materialise_train_dir(train, work / "train")
        ckpts = {seed: train_unet(train_dir, work / f"run_{seed}", args, seed) for seed in seeds}
        unet_seconds = (time.perf_counter() - t0) / len(seeds)
        results: dict[str, dict] = {}
        for name, tiles in test_sets.items():
            if not tiles:
                continue
            res = {m: evaluate_pixel_model(f, tiles) for m, f in fits.items()}
            for seed, ckpt in ckpts.items():
                res[unet_name(seed, seeds)] = evaluate_checkpoint(ckpt, tiles)
            if len(seeds) > 1:  # the mean of the runs' predictions (`axs predict CKPT CKPT ...`)
                res[ENSEMBLE] = evaluate_checkpoint(list(ckpts.values()), tiles)
            results[name] = res
        config = torch.load(ckpts[seeds[0]], weights_only=True)["config"]
    out = {"split": "validation" if args.validation else "test", "tiles": {"train": len(train_clear), **{k: len(v) for k, v in test_sets.items()}},
           "unet": {"steps": config["steps"], "width": config["width"], "batch_size": config["batch_size"],
                    "head": config["head"], "seconds": unet_seconds},
           "seeds": seeds, "results": results,
           "verdict": {k: verdict(v) for k, v in results.items()} if len(seeds) == 1 else
                      {k: {**{str(seed): verdict({**v, "U-Net": v[unet_name(seed, seeds)]}) for seed in seeds},
                           "mean": verdict({**v, "U-Net": v[ENSEMBLE]})} for k, v in results.items()}}
    print(f"U-Net: {config['steps']} steps, width {config['width']}, batch {config['batch_size']}, {config['head']} head, "
          f"{unet_seconds:.0f} s to train")
    for name, res in results.items():
        print(f"\nheld-out {out['split']} tiles: {name} ({out['tiles'][name]})\n{summary_table(res)}\n\n{band_table(res)}")
        verdicts = {seeds[0]: out["verdict"][name]} if len(seeds) == 1 else {s: out["verdict"][name][str(s)] for s in seeds}
        if len(seeds) > 1:
            verdicts["mean"] = out["verdict"][name]["mean"]
        for seed, v in verdicts.items():
            label = ENSEMBLE if seed == "mean" else unet_name(seed, seeds)
            print(f"{label} vs best per-pixel model: MAE {v['mae_gain']:+.1%}, RMSE {v['rmse_gain']:+.1%} better; "
                  + ", ".join(f"{b} MAE x{v[f'{b}_mae_vs_median']:.2f} RMSE x{v[f'{b}_rmse_vs_median']:.2f}" for b in ("B2", "B3", "B4"))
                  + " of the median's")
        if len(seeds) > 1:
            gains = [verdicts[s]["mae_gain"] for s in seeds]
            print(f"U-Net MAE gain over {len(seeds)} seeds: mean {sum(gains) / len(gains):+.1%}, "
                  f"from {min(gains):+.1%} to {max(gains):+.1%}")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
