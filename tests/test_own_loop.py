"""examples/own_loop.py: a user's own loop (global-RNG augmentation, dropout, AdamW, OneCycleLR)
made exact by the toolkit: reruns, worker counts, and SIGKILL + --resume auto give identical bytes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from axs_lib.ingest import write_synthetic_tiles
from conftest import import_file

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_loop.py"
STEPS, EVERY = 24, 4


def load_example():
    return import_file(EXAMPLE, "own_loop_example")


own_loop = load_example()


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    out = tmp_path_factory.mktemp("own_loop_tiles")
    write_synthetic_tiles(out, count=10, size=24, seed=1)
    return out


def argv(tiles, out, workers, *extra):
    return ["--data-dir", str(tiles), "--output-dir", str(out), "--seed", "7", "--steps", str(STEPS),
            "--batch-size", "4", "--crop", "16", "--checkpoint-every", str(EVERY), "--num-workers", str(workers), *extra]


def train(tiles, out, workers, *extra):
    return own_loop.train(own_loop.parse_args(argv(tiles, out, workers, *extra)), log=lambda line: None)


def checkpoint_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "checkpoints").glob("checkpoint_step_*.pt"))}


@pytest.fixture(scope="module")
def reference(tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("own_loop_ref")
    assert train(tiles, out, 0) == STEPS
    files = checkpoint_bytes(out)
    assert sorted(files) == sorted(f"checkpoint_step_{s}.pt" for s in range(EVERY, STEPS + 1, EVERY))
    return files


def test_a_rerun_and_two_workers_write_the_same_bytes(tiles, tmp_path, reference):
    train(tiles, tmp_path / "rerun", 0)
    assert checkpoint_bytes(tmp_path / "rerun") == reference
    train(tiles, tmp_path / "workers", 2)
    assert checkpoint_bytes(tmp_path / "workers") == reference


def test_another_seed_writes_other_bytes(tiles, tmp_path, reference):
    args = own_loop.parse_args(argv(tiles, tmp_path / "other", 0))
    args.seed = 8
    own_loop.train(args, log=lambda line: None)
    assert checkpoint_bytes(tmp_path / "other").keys() == reference.keys()
    assert all(checkpoint_bytes(tmp_path / "other")[k] != reference[k] for k in reference)


def run_and_kill(cmd: list[str], out: Path, rng: random.Random) -> bool:
    """Start ``cmd`` in its own process group; once it has written its first or second checkpoint
    (drawn), SIGKILL the whole group (workers included) after a random delay: mid-step, mid-batch
    or mid-write, with steps still to go on any machine. True when the kill came before the run ended."""
    wanted = rng.choice([1, 2])
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and len(list(out.glob("checkpoints/checkpoint_step_*.pt"))) < wanted and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.05))
    finally:
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    return killed


def test_sigkill_with_workers_then_resume_with_another_worker_count_writes_the_same_bytes(tiles, tmp_path, reference):
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "killed"
    assert run_and_kill([sys.executable, str(EXAMPLE), *argv(tiles, out, 2)], out, rng), "the run ended before the kill"
    assert len(checkpoint_bytes(out)) < len(reference)
    run_and_kill([sys.executable, str(EXAMPLE), *argv(tiles, out, 2, "--resume", "auto")], out, rng)
    assert train(tiles, out, 1, "--resume", "auto") == STEPS  # a third worker count
    assert checkpoint_bytes(out) == reference, f"kill moments drawn with random.Random({seed})"


def test_every_checkpoint_loads_weights_only(tiles, reference, tmp_path):
    for name, data in reference.items():
        path = tmp_path / name
        path.write_bytes(data)
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["step"] == int(name.split("_")[-1][:-3])
        assert set(checkpoint["sampler_state"]) >= {"epoch", "position"}


def test_sigterm_to_the_process_group_checkpoints_the_step_reached_exits_143_and_resumes_exactly(tiles, tmp_path, reference):
    """As Slurm stops a job: SIGTERM to every process of the group, the loader's 2 workers included.
    Step 8's write is held 3 s (AXS_FAULT=slow), so the signal lands before the run can end."""
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), *argv(tiles, out, 2)], cwd=REPO, start_new_session=True,
                            env={**os.environ, "AXS_FAULT": "slow:checkpoint_step_8.pt"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "checkpoint_step_4.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr
    stopped = int(stdout.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 4 <= stopped <= 8
    assert (out / "checkpoints" / "latest").read_text().strip() == f"checkpoint_step_{stopped}.pt"
    assert train(tiles, out, 1, "--resume", "auto") == STEPS
    assert {k: v for k, v in checkpoint_bytes(out).items() if k in reference} == reference


def test_a_resume_with_another_seed_is_refused_naming_it_and_writes_nothing(tiles, tmp_path, reference, capsys):
    out = tmp_path / "seeded"
    train(tiles, out, 0, "--steps", "8")
    before = checkpoint_bytes(out)
    args = argv(tiles, out, 0, "--steps", "8", "--resume", "auto")
    args[args.index("--seed") + 1] = "8"
    assert own_loop.main(args) == 2
    err = capsys.readouterr().err
    assert "cannot resume exactly: seed: checkpoint 7, now 8" in err and len(err.strip().splitlines()) == 1
    assert checkpoint_bytes(out) == before


def test_a_fresh_run_into_a_directory_with_checkpoints_is_refused_and_writes_nothing(tiles, tmp_path, reference, capsys):
    out = tmp_path / "again"
    train(tiles, out, 0, "--steps", "4")
    before = checkpoint_bytes(out)
    assert own_loop.main(argv(tiles, out, 0, "--steps", "4")) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert checkpoint_bytes(out) == before
