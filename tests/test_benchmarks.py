"""The benchmarks run, in their smallest modes, and return well-formed ratios.

No timing is asserted here: benchmarks report ratios measured side by side (`make bench`); a test
only checks that each one executes end to end and that its figures are finite positive numbers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo on the path
    sys.path.insert(0, str(REPO))

import benchmarks.__main__ as runner  # noqa: E402
from benchmarks import bench_compare, bench_data, bench_train  # noqa: E402


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
        "--checkpoint-every", "2", "--repeats", "1", "--startup-repeats", "1", "--write-repeats", "1",
        "--skip-default-width", "--no-import-baseline",
    ])
    _check_ratios(results, [
        "trainer_steps_per_s", "plain_steps_per_s", "trainer_vs_plain_ratio", "nondet_steps_per_s", "det_vs_nondet_ratio",
        "checkpoint_write_ms", "torch_save_ms", "torch_save_fsync_ms", "checkpoint_write_ratio",
        "checkpoint_write_vs_fsync_ratio", "checkpoint_mb", "fresh_startup_s", "resume_startup_s",
        "resume_vs_fresh_ratio",
    ])
    _check_ratios(results["checkpoint_stages_ms"], list(results["checkpoint_stages_ms"]))
    assert results["checkpoint_write_default_width"] is None and results["imports_s"] is None
    out = capsys.readouterr().out
    for line in ("trainer vs plain loop:", "deterministic vs not:", "checkpoint write:", "resume vs fresh start-up:"):
        assert line in out


@pytest.mark.parametrize("argv, compare, train", [
    ([], {"size_mb": runner.COMPARE_SIZE_MB, "repeats": 3}, []),
    (["--full"], {"size_mb": runner.COMPARE_FULL_SIZE_MB, "repeats": 3}, []),
    (["--quick"], {"size_mb": runner.COMPARE_QUICK_SIZE_MB, "repeats": 1}, ["--quick"]),
    (["--size-mb", "32"], {"size_mb": 32, "repeats": 3}, []),
])
def test_runner_calls_every_benchmark(monkeypatch, capsys, argv, compare, train):
    calls = {}

    def fake(name):
        def main(*args, **kwargs):
            calls[name] = (args, kwargs)
            return {"ratio": 1.0}
        return main

    for name in runner.BENCHMARKS:
        monkeypatch.setattr(sys.modules[f"benchmarks.{name}"], "main", fake(name))
    results = runner.main(argv)
    assert list(results) == list(runner.BENCHMARKS)
    assert calls["bench_data"] == ((), {})
    assert calls["bench_compare"] == ((), compare)
    assert calls["bench_train"] == ((train,), {})
    assert runner.main(["--only", "bench_train"]).keys() == {"bench_train"}
