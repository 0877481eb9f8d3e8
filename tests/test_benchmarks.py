"""The benchmarks run, in their smallest modes, and return well-formed ratios.

No timing is asserted here: benchmarks report ratios measured side by side (`make bench`); a test
only checks that each one executes end to end and that its figures are finite positive numbers.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo on the path
    sys.path.insert(0, str(REPO))

import benchmarks.__main__ as runner  # noqa: E402
from benchmarks import bench_compare, bench_data, bench_quality, bench_train  # noqa: E402


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_ratios(results: dict, keys: list[str]) -> None:
    bad = {k: results.get(k) for k in keys if not _positive(results.get(k))}
    assert not bad, f"not finite positive numbers: {bad}"


def test_bench_data_smallest(monkeypatch, capsys):
    monkeypatch.setattr(bench_data, "NUM_TILES", 16)
    monkeypatch.setattr(bench_data, "BATCH_SIZE", 4)
    monkeypatch.setattr(bench_data, "EPOCHS", 1)
    results = bench_data.main()
    _check_ratios(results, ["loader_tiles_per_s_0_workers", "loader_tiles_per_s_2_workers", "loader_speedup_2_vs_0_workers",
                            "fingerprint_uncached_vs_hashlib", "fingerprint_cached_vs_hashlib", "hashlib_mb_per_s"])
    assert "loader, 2 workers" in capsys.readouterr().out


def test_bench_compare_smallest(capsys):
    results = bench_compare.main(size_mb=8, repeats=1)
    _check_ratios(results, ["checkpoint_mib", "ours_seconds", "naive_seconds", "time_ratio_ours_vs_naive",
                            "ours_peak_rss_mib", "naive_peak_rss_mib", "peak_rss_ratio_ours_vs_naive"])
    assert "peak RSS" in capsys.readouterr().out


def test_bench_train_smallest(capsys):
    results = bench_train.main([
        "--tiles", "8", "--tile-size", "32", "--width", "2", "--batch-size", "2", "--steps", "4",
        "--checkpoint-every", "2", "--repeats", "1", "--startup-repeats", "1", "--no-import-baseline", "--device", "cpu",
    ])
    _check_ratios(results, [
        "trainer_sync_vs_plain_ratio", "trainer_async_vs_plain_ratio", "trainer_vs_bare_loop_ratio", "det_vs_nondet_ratio",
        "async_stall_ratio", "sync_stall_ratio", "startup_s", "cpu_trainer_sync_vs_plain_ratio",
        "cpu_trainer_async_vs_plain_ratio",
    ])
    _check_ratios(results["steps_per_s"], ["trainer_sync", "trainer_async", "plain_same", "plain_bare", "trainer_nondet"])
    _check_ratios(results["save_ms"], ["trainer_sync", "trainer_async", "plain_same"])
    assert results["bf16_vs_32_ratio"] is None and results["imports_s"] is None
    out = capsys.readouterr().out
    for line in ("trainer (sync) vs plain loop, same work", "trainer (async) vs plain loop, same work",
                 "trainer (sync) vs bare plain loop", "async CheckpointManager.save", "sync  CheckpointManager.save",
                 "start to first step"):
        assert line in out


def test_bench_ddp_smallest_measures_both_reductions_with_the_same_bytes_at_two_ranks(capsys):
    from benchmarks import bench_ddp

    results = bench_ddp.main(["--quick", "--world-sizes", "2", "--rounds", "1", "--steps", "1"])
    w2 = results["w2"]
    assert w2["tree"] > 0 and w2["flat"] > 0 and w2["ratio"] == w2["tree"] / w2["flat"]
    assert 0 < w2["bytes_tree"] - w2["bytes_flat"] < 0.01 * w2["bytes_flat"]  # one buffer each (the tree's: + flags, loss)
    assert "bytes/step tree" in capsys.readouterr().out


@pytest.mark.parametrize("argv, compare, train", [
    ([], {"size_mb": runner.COMPARE_SIZE_MB, "repeats": 3}, []),
    (["--full"], {"size_mb": runner.COMPARE_FULL_SIZE_MB, "repeats": 3}, []),
    (["--quick"], {"size_mb": runner.COMPARE_QUICK_SIZE_MB, "repeats": 1}, ["--quick"]),
    (["--size-mb", "32"], {"size_mb": 32, "repeats": 3}, []),
    (["--quick", "--device", "cpu"], {"size_mb": runner.COMPARE_QUICK_SIZE_MB, "repeats": 1}, ["--quick", "--device", "cpu"]),
])
def test_runner_calls_every_benchmark(monkeypatch, capsys, argv, compare, train):
    calls = {}

    def fake(name):
        def main(*args, **kwargs):
            calls[name] = (args, kwargs)
            return {"ratio": 1.0}
        return main

    for name in runner.BENCHMARKS:
        monkeypatch.setattr(importlib.import_module(f"benchmarks.{name}"), "main", fake(name))
    results = runner.main(argv)
    assert list(results) == list(runner.BENCHMARKS)
    assert calls["bench_data"] == ((), {})
    assert calls["bench_compare"] == ((), compare)
    assert calls["bench_train"] == ((train,), {})
    startup = ["--startup", "1000"] + (["--startup", "10000"] if "--full" in argv else [])
    assert calls["bench_loader"] == ((startup + (["--loader-tiles", "128"] if "--quick" in argv else []),), {})
    assert calls["bench_ddp"] == ((["--quick"] if "--quick" in argv else [],), {})
    assert calls["bench_portable"] == ((["--quick"] if "--quick" in argv else [],), {})
    assert calls["bench_quality"] == ((["--quick"] if "--quick" in argv else [],), {})
    assert runner.main(["--only", "bench_train"]).keys() == {"bench_train"}


def test_runner_reports_a_failing_benchmark_and_runs_the_others(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(importlib.import_module("benchmarks.bench_data"), "main", broken)
    monkeypatch.setattr(importlib.import_module("benchmarks.bench_compare"), "main", lambda **kwargs: {"ratio": 1.0})
    results = runner.main(["--only", "bench_data", "--only", "bench_compare"])
    assert results["bench_data"] == {"error": "RuntimeError: disk full"} and results["bench_compare"] == {"ratio": 1.0}
    assert runner.failed(results) == ["bench_data"]
    assert "FAILED: RuntimeError: disk full" in capsys.readouterr().out


@pytest.mark.skipif(not bench_quality.BENV1.is_dir(), reason=f"needs the real tile pairs in {bench_quality.BENV1}")
def test_bench_quality_quick_trains_every_method_on_held_out_scenes(demo_tiles, capsys):
    dirs = [demo_tiles, bench_quality.BENV1]
    results = bench_quality.main(["--quick", "--data-dir", str(demo_tiles), "--data-dir", str(bench_quality.BENV1)])
    test = results["results"]["all"]
    assert set(test) == {"median", "ridge", "pixel MLP", "U-Net"}
    for method in test.values():
        assert set(method["bands"]) == {"B2", "B3", "B4", "B8"}
        _check_ratios(method["overall"], ["mae", "rmse", "psnr", "ssim", "sam"])
    assert results["tiles"]["all"] == sum(bench_quality.held_out(p.stem) for d in dirs for p in d.glob("*.npz")) > 0
    out = capsys.readouterr().out
    assert "| U-Net | B2 |" in out and "U-Net vs best per-pixel model" in out


@pytest.mark.skipif(not bench_quality.BENV1.is_dir(), reason=f"needs the real tile pairs in {bench_quality.BENV1}")
def test_bench_quality_with_several_seeds_reports_each_and_their_spread(demo_tiles, capsys):
    results = bench_quality.main(["--quick", "--seeds", "1,2", "--data-dir", str(demo_tiles), "--data-dir",
                                  str(bench_quality.BENV1)])
    test = results["results"]["all"]
    assert set(test) == {"median", "ridge", "pixel MLP", "U-Net seed 1", "U-Net seed 2", bench_quality.ENSEMBLE}
    assert test["U-Net seed 1"]["overall"]["mae"] != test["U-Net seed 2"]["overall"]["mae"]  # the seeds really differ
    assert test[bench_quality.ENSEMBLE]["overall"]["mae"] not in {test[f"U-Net seed {s}"]["overall"]["mae"] for s in (1, 2)}
    assert set(results["verdict"]["all"]) == {"1", "2", "mean"}
    out = capsys.readouterr().out
    assert "U-Net MAE gain over 2 seeds: mean" in out and f"{bench_quality.ENSEMBLE} vs best per-pixel model" in out


def test_held_out_scenes_follow_the_documented_hash_rule_and_keep_a_scene_together():
    import hashlib

    stem = "S2B_MSIL2A_20180515T094029_32_47"
    assert bench_quality.scene_of(stem) == "S2B_MSIL2A_20180515T094029"
    expected = int(hashlib.sha256(b"S2B_MSIL2A_20180515T094029").hexdigest(), 16) % 3 == 0
    assert bench_quality.held_out(stem) is expected
    assert bench_quality.held_out("S2B_MSIL2A_20180515T094029_51_28") is expected


def test_validation_mode_evaluates_validation_scenes_and_never_touches_a_test_scene():
    import hashlib

    stems = [f"S2A_MSIL2A_2017{m:02d}{d:02d}T101031_{i}_1" for m in range(1, 13) for d in (3, 17) for i in (1, 2)]
    paths = [Path(f"/tiles/{s}.npz") for s in stems]
    train, validation = bench_quality.split_tiles(paths, validation=True)
    test_train, tests = bench_quality.split_tiles(paths)
    assert validation and train and tests
    assert not {p.stem for p in train + validation} & {p.stem for p in tests}
    assert sorted(train + validation) == sorted(test_train)
    for p in validation:
        assert int(hashlib.sha256(("val:" + bench_quality.scene_of(p.stem)).encode()).hexdigest(), 16) % 4 == 0
    # a scene is never split between training and validation
    assert not {bench_quality.scene_of(p.stem) for p in train} & {bench_quality.scene_of(p.stem) for p in validation}


def test_weight_average_of_quality_variants_is_the_bias_corrected_exponential_average_of_the_steps():
    import torch

    from benchmarks.quality_variants import WeightAverage

    net = torch.nn.Linear(3, 2)
    average = WeightAverage(net, decays=(0.9, 0.5))
    steps = []
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        steps.append([p.detach().clone() for p in net.parameters()])
        average.update(net)
    for d in (0.9, 0.5):  # sum_t d^(T-t) w_t / sum_t d^(T-t): the starting weights weigh nothing
        weights = [d ** (len(steps) - 1 - t) for t in range(len(steps))]
        state = average.state_dict(net, d)
        for i, (name, _) in enumerate(net.named_parameters()):
            expected = sum(w * s[i] for w, s in zip(weights, steps)) / sum(weights)
            assert torch.allclose(state[name], expected, atol=1e-6), name
    assert not torch.equal(average.state_dict(net, 0.9)["weight"], net.weight)


def test_quality_variants_pass_trainer_options_by_prefix():
    from benchmarks.quality_variants import trainer_args

    args = trainer_args(["median", "wd0.5", "w8", "bs6", "drop0.1", "gain1"], seed=7)
    assert vars(args) == {"seed": 7, "weight_decay": 0.5, "width": 8, "batch_size": 6, "dropout": 0.1}
    assert vars(trainer_args(["groupnorm", "steps250"], seed=1)) == {"seed": 1, "block": "groupnorm", "steps": 250}


def test_quality_variants_hook_into_the_step_the_trainer_runs(synth_tiles, tmp_path, monkeypatch):
    """The harness wraps `Stage1Trainer.train_step` to average the weights after every step; a
    renamed step would leave its averages at the starting weights without a word."""
    import axs_lib.data as data
    import axs_lib.stage1.train as train
    from axs_lib.stage1.config import build_config
    from benchmarks.quality_variants import install

    for owner, name in ((train.Stage1Trainer, "train_step"), (train, "stage1_loss"), (train, "band_stats"),
                        (data.TileDataset, "__getitem__")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # every patch of install() undone after the test
    from axs_lib.tiles import list_tiles

    holder: dict = {}
    install(["default"], list_tiles(synth_tiles), holder)
    config = build_config({"seed": 3, "steps": 3, "width": 4, "batch_size": 2, "plots": False, "tensorboard": False,
                           "quiet": True, "data_dir": str(synth_tiles), "output_dir": str(tmp_path / "run")})
    train.train_stage1(config, train.ResumeRequest(), log=lambda line: None)
    assert holder["ema"].updates == 3
