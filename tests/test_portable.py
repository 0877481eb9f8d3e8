"""Portable CPU mode: the same checkpoint bytes on one core or two, with any OMP_NUM_THREADS, on any
x86-64 CPU with AVX2 (axs_lib.portable).

One portable run on the demo tiles under ``taskset -c 0`` with ``OMP_NUM_THREADS=1`` and one on
every core with ``OMP_NUM_THREADS=8`` must write the same bytes, and those bytes must equal the
digests in ``tests/data/portable_golden.json``, recorded once for the pinned torch,
Python and NumPy versions: every developer machine (another CPU, another core count) and every CI
run checks cross-machine exactness against them.
On other versions, or a CPU without AVX2, the golden test skips with the reason.

Controls (the checks can fail): without the mode, the thread count changes the weights; and ATen's
capability changes the bits of a plain float32 sum (DEFAULT vs AVX2), which the mode pins.

After a change that is meant to change the bits (the model, the loss, the checkpoint layout),
record the new digests: ``AXS_UPDATE_GOLDEN=1 pytest tests/test_portable.py -k golden``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from axs_lib.cli import main
from axs_lib.portable import PINNED_ENV, cpu_has_avx2

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "portable_golden.json"
TRAIN_ARGS = ["--seed", "42", "--steps", "4", "--width", "8", "--batch-size", "2", "--checkpoint-every", "2",
              "--val-every", "2", "--no-plots", "--quiet", "--no-tensorboard"]

pytestmark = pytest.mark.skipif(not cpu_has_avx2(), reason="portable mode needs an x86-64 CPU with AVX2; this one has none")


def argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), *TRAIN_ARGS, *extra]


def train_process(args: list[str], env: dict[str, str], cpus: str | None = None) -> subprocess.CompletedProcess:
    prefix = ["taskset", "-c", cpus] if cpus and shutil.which("taskset") else []
    cmd = [*prefix, sys.executable, str(ROOT / "scripts" / "train_stage1.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "checkpoints").glob("*.pt"))}


def versions() -> dict[str, str]:
    return {"torch": str(torch.__version__), "python": platform.python_version(), "numpy": np.__version__}


@pytest.fixture(scope="module")
def portable_runs(demo_tiles, tmp_path_factory):
    base = tmp_path_factory.mktemp("portable")
    one = train_process(argv(demo_tiles, base / "one_core", "--portable"), {"OMP_NUM_THREADS": "1"}, cpus="0")
    assert one.returncode == 0, one.stderr[-2000:]
    many = train_process(argv(demo_tiles, base / "all_cores", "--portable"), {"OMP_NUM_THREADS": "8"})
    assert many.returncode == 0, many.stderr[-2000:]
    return base / "one_core", base / "all_cores"


def test_a_portable_run_writes_the_same_bytes_on_one_core_and_on_all_with_any_thread_variable(portable_runs):
    one, many = portable_runs
    assert digests(one) == digests(many)
    assert sorted(digests(one)) == ["best.pt", "checkpoint_step_2.pt", "checkpoint_step_4.pt"]


def test_a_portable_checkpoint_records_the_pinning_and_no_machine_details(portable_runs):
    ckpt = torch.load(portable_runs[0] / "checkpoints" / "checkpoint_step_4.pt", weights_only=True)
    assert ckpt["environment"]["portable"] == {"threads": 4, "cpu_capability": "AVX2", "dnnl_max_cpu_isa": "AVX2",
                                               "mkl_cbwr": "AVX2"}
    assert not {"cpu", "num_threads", "env", "cpu_capability", "gpus"} & set(ckpt["environment"])
    assert ckpt["config"]["portable"] is True and ckpt["config"]["threads"] == 4
    run = json.loads((portable_runs[0] / "run.json").read_text())
    assert run["environment"]["cpu"]  # the machine itself is still recorded, in the run's manifest


def test_portable_checkpoints_match_the_recorded_golden_digests(portable_runs):
    found = digests(portable_runs[0])
    if os.environ.get("AXS_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"versions": versions(), "train_args": TRAIN_ARGS, "sha256": found}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    if golden["versions"] != versions():
        pytest.skip(f"the golden digests are for {golden['versions']}; this machine has {versions()}")
    assert golden["train_args"] == TRAIN_ARGS
    assert found == golden["sha256"]


def test_without_portable_mode_the_thread_count_changes_the_weights(demo_tiles, tmp_path):
    weights = []
    try:
        for threads in ("1", "4"):
            out = tmp_path / f"threads{threads}"
            assert main(["train", "stage1", *argv(demo_tiles, out, "--threads", threads)]) == 0
            weights.append(torch.load(out / "checkpoints" / "checkpoint_step_4.pt", weights_only=True)["model_state_dict"])
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_atens_cpu_capability_changes_the_bits_of_a_float32_sum():
    code = ("import torch; g = torch.Generator().manual_seed(0); "
            "print(torch.randn(1_000_003, generator=g).sum().item().hex())")
    sums = {cap: subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": cap},
                                capture_output=True, text=True, check=True).stdout for cap in ("default", "avx2")}
    assert sums["default"] != sums["avx2"]


def test_portable_mode_in_a_process_whose_torch_already_computed_is_refused_with_the_line_to_add(demo_tiles, tmp_path, capsys):
    before = {k: os.environ.get(k) for k in PINNED_ENV}
    out = tmp_path / "refused"
    assert main(["train", "stage1", *argv(demo_tiles, out, "--portable")]) == 2
    err = capsys.readouterr().err
    assert "torch already computes with CPU capability" in err and "ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2" in err
    assert len(err.strip().splitlines()) == 1
    assert {k: os.environ.get(k) for k in PINNED_ENV} == before  # the process's environment is left as it was
    assert not out.exists()


def test_resuming_a_portable_run_with_another_thread_count_is_refused_naming_it(portable_runs, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(portable_runs[0], out)
    proc = train_process(argv(Path(json.loads((out / "run.json").read_text())["paths"]["data_dir"]), out,
                              "--resume", "auto", "--threads", "2", "--steps", "6"), {})
    assert proc.returncode == 2
    assert "threads: checkpoint 4, now 2" in proc.stderr
    assert digests(out) == digests(portable_runs[0])


def test_compare_names_portable_mode_as_the_cause_when_only_one_run_used_it(portable_runs, demo_tiles, tmp_path, capsys):
    out = tmp_path / "plain"
    try:
        assert main(["train", "stage1", *argv(demo_tiles, out, "--threads", "4")]) == 0  # the same thread count
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    capsys.readouterr()
    assert main(["compare", str(portable_runs[0]), str(out)]) == 1
    report = capsys.readouterr().out
    assert "portable CPU mode in one run only" in report
    assert "another CPU model" not in report and "another intra-op thread count" not in report
