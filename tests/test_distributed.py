"""Distributed training under torchrun: 2 CPU ranks with gloo on loopback, byte-identical results.

Every torchrun starts three processes that import torch, so ``make test`` starts one (the shared
two-rank run) and checks what needs it: every rank's RNG state in the checkpoint, and a resume
on another world size refused, then allowed. A rerun with another worker count and a kill inside
a checkpoint write with its resume (two more torchruns each) are ``make soak`` (``-m slow``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from axs_lib.cli import main
from axs_lib.stage1.train import reshard

ROOT = Path(__file__).resolve().parents[1]


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), "--seed", "42", "--steps", "6", "--batch-size", "1",
            "--width", "8", "--checkpoint-every", "2", "--val-every", "2", "--log-every", "1", "--no-plots", "--quiet", *extra]


def torchrun(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "train_stage1.py"), *argv]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def shas(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "checkpoints").glob("*.pt"))}


@pytest.fixture(scope="module")
def two_rank_run(demo_tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun(args(demo_tiles, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_two_ranks_rerun_with_other_worker_count_is_byte_identical(two_rank_run, demo_tiles, tmp_path):
    out = tmp_path / "again"
    proc = torchrun(args(demo_tiles, out, "--num-workers", "1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shas(out) == shas(two_rank_run)
    assert len(shas(out)) == 4  # steps 2, 4, 6 and best.pt


def test_checkpoint_holds_every_ranks_rng_state(two_rank_run):
    import torch

    ckpt = torch.load(two_rank_run / "checkpoints" / "checkpoint_step_6.pt", weights_only=True)
    assert ckpt["world_size"] == 2
    states = ckpt["rank_rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["torch_rng_state"], states[1]["torch_rng_state"])


@pytest.mark.slow
def test_killed_during_checkpoint_write_and_resumed_is_byte_identical(two_rank_run, demo_tiles, tmp_path):
    out = tmp_path / "killed"
    proc = torchrun(args(demo_tiles, out), env={"AXS_FAULT": "kill:checkpoint_step_4.pt"})
    assert proc.returncode != 0
    assert not (out / "checkpoints" / "checkpoint_step_4.pt").exists()
    proc = torchrun(args(demo_tiles, out, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shas(out) == shas(two_rank_run)


def test_resume_on_another_world_size_is_refused_then_allowed(two_rank_run, demo_tiles, tmp_path, capsys):
    out = tmp_path / "one_rank"
    shutil.copytree(two_rank_run, out)
    before = shas(out)
    resume = ["--resume", str(out / "checkpoints" / "checkpoint_step_2.pt")]
    assert main(["train", "stage1", *args(demo_tiles, out, *resume)]) == 2
    err = capsys.readouterr().err
    assert "world size: checkpoint 2, now 1" in err
    assert shas(out) == before
    assert main(["train", "stage1", *args(demo_tiles, out, *resume, "--allow-world-size-change")]) == 0
    assert "notice: world size 2 -> 1: epoch" in capsys.readouterr().err
    assert shas(out)["checkpoint_step_2.pt"] == before["checkpoint_step_2.pt"]
    assert shas(out)["checkpoint_step_6.pt"] != before["checkpoint_step_6.pt"]  # other world size, other bits


@pytest.mark.parametrize(
    ("position", "old", "new", "shard", "expected"),
    [(0, 2, 1, 5, 0), (1, 2, 1, 5, 2), (2, 1, 2, 3, 1), (4, 1, 4, 2, 1), (2, 2, 1, 3, 2)],
)
def test_reshard_keeps_the_consumed_share_of_the_epoch(position, old, new, shard, expected):
    assert reshard(position, old, new, shard) == expected
