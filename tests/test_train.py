"""The Stage-1 trainer on the real demo tiles: byte-identical across reruns, kills, signals and workers.

Every run here is compared with one uninterrupted reference run (``stage1_reference`` in
conftest.py, trained once per test run). Training runs in this process; a subprocess is started
only where a separate process is the point: SIGKILL (mid-epoch with DataLoader workers, inside a
checkpoint write), SIGTERM, and a second process against a live run's lock. Many kills at random
moments are the kill harness's job (tests/test_kill_harness.py, ``make soak``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import killtest
from axs_lib.checkpoint import CHECKSUM_KEY, FORMAT_KEY, content_digest, load_checkpoint, read_latest
from axs_lib.cli import main
from conftest import REFERENCE_STEPS as STEPS

ROOT = Path(__file__).resolve().parents[1]


def args(data: Path, out: Path, *extra: str, steps: int = STEPS, workers: int = 0) -> list[str]:
    """The reference's command line (the kill harness's configuration), with ``extra`` flags."""
    return killtest.train_argv(data, out, steps, *extra, num_workers=workers)


def train(*argv: str) -> int:
    return main(["train", "stage1", *argv])


SPAWNED: list[subprocess.Popen] = []


def spawn(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    """The trainer script in a process of its own, in its own session (killpg reaches its workers)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train_stage1.py"), *argv],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    SPAWNED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def no_run_left_behind():
    """A test that fails or times out must not leave its trainer (and workers) running."""
    yield
    while SPAWNED:
        proc = SPAWNED.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()


def shas(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "checkpoints").glob("*.pt"))}


def wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    """Wait until the run has logged ``step`` (metrics are logged every step in these tests)."""
    deadline = time.monotonic() + timeout
    log = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()}")
        if log.exists() and any(json.loads(line).get("step", 0) >= step for line in log.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture
def reference(stage1_reference):
    return stage1_reference


def test_run_writes_what_it_promises(reference):
    names = set(shas(reference))
    assert {f"checkpoint_step_{s}.pt" for s in range(2, STEPS + 1, 2)} | {"best.pt"} == names
    assert read_latest(reference / "checkpoints").name == f"checkpoint_step_{STEPS}.pt"
    run = json.loads((reference / "run.json").read_text())
    assert run["status"] == "completed" and run["final_step"] == STEPS and run["seed"] == 42
    assert run["data_fingerprint"]["num_tiles"] == 6
    assert json.loads((reference / "split.json").read_text())["val"]
    assert "packages" in json.loads((reference / "environment.json").read_text())
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, STEPS + 1))
    assert {"val_loss", "psnr", "ssim", "sam"} <= set(next(r for r in records if r["split"] == "val"))


def test_checkpoint_schema_loads_weights_only(reference):
    ckpt = torch.load(reference / "checkpoints" / f"checkpoint_step_{STEPS}.pt", weights_only=True)
    for key in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "seed_info", "rng_state",
                "step", "epoch", "sampler_state", "early_stopping", "config", "environment", "data_fingerprint",
                FORMAT_KEY, CHECKSUM_KEY):
        assert key in ckpt, key
    assert ckpt["step"] == STEPS and ckpt["seed_info"]["seed"] == 42
    text = json.dumps(ckpt["config"]) + json.dumps(ckpt["environment"])
    assert str(reference) not in text and "output_dir" not in ckpt["config"]


def test_rerun_is_byte_identical(reference, demo_tiles, tmp_path):
    out = tmp_path / "again"
    assert train(*args(demo_tiles, out)) == 0
    assert shas(out) == shas(reference)


def test_another_seed_gives_other_weights(reference, demo_tiles, tmp_path):
    out = tmp_path / "seed43"
    argv = args(demo_tiles, out)
    argv[argv.index("--seed") + 1] = "43"
    assert train(*argv) == 0
    a = load_checkpoint(out / "checkpoints" / f"checkpoint_step_{STEPS}.pt")["model_state_dict"]
    b = load_checkpoint(reference / "checkpoints" / f"checkpoint_step_{STEPS}.pt")["model_state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_epoch_with_workers_then_resume(reference, demo_tiles, tmp_path):
    out = tmp_path / "killed"
    proc = spawn(args(demo_tiles, out, workers=2))
    wait_for_step(out, proc, 5)  # 4 train tiles, batch 3: epochs end mid-batch, checkpoints fall mid-epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert train(*args(demo_tiles, out, "--resume", "auto", workers=2)) == 0
    assert shas(out) == shas(reference)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert steps == list(range(1, STEPS + 1))  # no duplicated or lost log lines


def test_kill_during_checkpoint_write_then_resume(reference, demo_tiles, tmp_path):
    out = tmp_path / "killed_in_write"
    proc = spawn(args(demo_tiles, out, workers=2), env={"AXS_FAULT": "kill:checkpoint_step_6.pt"})
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert not (ckpts / "checkpoint_step_6.pt").exists()
    assert list(ckpts.glob(".checkpoint_step_6.pt.*.tmp"))  # the half-written temp file
    assert read_latest(ckpts).name == "checkpoint_step_4.pt"
    load_checkpoint(ckpts / "checkpoint_step_4.pt")
    assert train(*args(demo_tiles, out, "--resume", "auto")) == 0
    assert not list(ckpts.glob(".*.tmp"))
    assert shas(out) == shas(reference)


@pytest.mark.slow  # make test has SIGTERM to the whole group, the harder case (test_signals)
def test_sigterm_checkpoints_current_step_and_resumes_exactly(reference, demo_tiles, tmp_path):
    out = tmp_path / "terminated"
    proc = spawn(args(demo_tiles, out, "--checkpoint-every", "100", workers=2))
    wait_for_step(out, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    stopped = read_latest(out / "checkpoints")
    assert stopped is not None and stopped.exists()
    step = load_checkpoint(stopped)["step"]
    assert 3 <= step < STEPS
    assert train(*args(demo_tiles, out, "--checkpoint-every", "100", "--resume", "auto", workers=2)) == 0
    final = f"checkpoint_step_{STEPS}.pt"
    assert shas(out)[final] == shas(reference)[final]
    assert shas(out)[f"checkpoint_step_{step}.pt"] == shas(reference).get(f"checkpoint_step_{step}.pt", shas(out)[f"checkpoint_step_{step}.pt"])


def test_full_disk_keeps_earlier_checkpoints_and_resume_is_exact(reference, demo_tiles, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    monkeypatch.setenv("AXS_FAULT", "enospc:checkpoint_step_4.pt")
    assert train(*args(demo_tiles, out)) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert read_latest(out / "checkpoints").name == "checkpoint_step_2.pt"
    assert set(shas(out)) <= {"checkpoint_step_2.pt", "best.pt"}
    monkeypatch.delenv("AXS_FAULT")
    assert train(*args(demo_tiles, out, "--resume", "auto")) == 0
    assert shas(out) == shas(reference)


def test_corrupt_latest_falls_back_to_newest_valid(reference, demo_tiles, tmp_path, capsys):
    out = tmp_path / "corrupt"
    shutil.copytree(reference, out)
    latest = out / "checkpoints" / f"checkpoint_step_{STEPS}.pt"
    latest.write_bytes(latest.read_bytes()[:-100])
    assert train(*args(demo_tiles, out, "--resume", "auto")) == 0
    captured = capsys.readouterr()
    assert f"checkpoint_step_{STEPS}.pt" in captured.err and "skipping" in captured.err
    assert shas(out) == shas(reference)


ES = ("--early-stopping", "--patience", "2", "--min-delta", "0.003", "--val-every", "2", "--lr", "0.003")


@pytest.fixture(scope="module")
def early_stopped(demo_tiles, tmp_path_factory):
    """A run (at most 60 steps) that early stopping ends, and the step it stopped at."""
    full = tmp_path_factory.mktemp("es") / "full"
    assert train(*args(demo_tiles, full, *ES, steps=60)) == 0
    run = json.loads((full / "run.json").read_text())
    assert run["status"] == "early_stopped" and 6 <= run["final_step"] < 60
    return full, run["final_step"]


def test_early_stopping_resumed_run_stops_at_the_same_step(early_stopped, demo_tiles, tmp_path):
    """Resumed two steps before the stop (the later checkpoints gone, as after a crash there)."""
    full, stop = early_stopped
    resumed = tmp_path / "es_resumed"
    shutil.copytree(full, resumed)
    ckpts = resumed / "checkpoints"
    for path in ckpts.glob("checkpoint_step_*.pt"):
        if int(path.stem.rsplit("_", 1)[1]) > stop - 2:
            path.unlink()
    (ckpts / "latest").write_text(f"checkpoint_step_{stop - 2}.pt\n")
    assert read_latest(ckpts).name == f"checkpoint_step_{stop - 2}.pt"
    assert train(*args(demo_tiles, resumed, *ES, "--resume", "auto", steps=60)) == 0
    assert json.loads((resumed / "run.json").read_text())["final_step"] == stop
    assert shas(resumed) == shas(full)


@pytest.mark.slow
def test_early_stopping_run_killed_in_a_write_stops_at_the_same_step(early_stopped, demo_tiles, tmp_path):
    full, stop = early_stopped
    resumed = tmp_path / "es_killed"
    proc = spawn(args(demo_tiles, resumed, *ES, steps=60), env={"AXS_FAULT": f"kill:checkpoint_step_{stop - 2}.pt"})
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert train(*args(demo_tiles, resumed, *ES, "--resume", "auto", steps=60)) == 0
    assert json.loads((resumed / "run.json").read_text())["final_step"] == stop
    assert shas(resumed) == shas(full)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--seed", "43"], "seed: checkpoint 42, now 43"),
        (["--lr", "0.01"], "lr: checkpoint 0.001, now 0.01"),
        (["--max-tiles", "5"], "tile set: checkpoint 6 tiles"),
    ],
)
def test_resume_with_a_difference_is_refused_and_named(reference, demo_tiles, tmp_path, capsys, change, named):
    out = tmp_path / "mismatch"
    shutil.copytree(reference, out)
    before = shas(out)
    argv = args(demo_tiles, out, "--resume", "auto", steps=STEPS + 2)
    argv[argv.index("--steps") + 1] = str(STEPS)
    for flag, value in zip(change[::2], change[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert train(*argv) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and "--force-resume" in err
    assert shas(out) == before


def test_resume_of_another_format_version_is_refused(reference, demo_tiles, tmp_path, capsys):
    out = tmp_path / "format"
    shutil.copytree(reference, out)
    path = out / "checkpoints" / f"checkpoint_step_{STEPS}.pt"
    ckpt = load_checkpoint(path)
    ckpt[FORMAT_KEY] = 99
    ckpt[CHECKSUM_KEY] = content_digest({k: v for k, v in ckpt.items() if k != CHECKSUM_KEY})
    torch.save(ckpt, path)
    assert train(*args(demo_tiles, out, "--resume", "auto")) == 2
    assert "checkpoint format: checkpoint 99" in capsys.readouterr().err


def test_resume_takes_unspecified_settings_from_the_checkpoint(reference, demo_tiles, tmp_path):
    out = tmp_path / "short_resume"
    shutil.copytree(reference, out)
    (out / "checkpoints" / f"checkpoint_step_{STEPS}.pt").unlink()
    (out / "checkpoints" / "latest").write_text("checkpoint_step_8.pt\n")
    # only --output-dir, --data-dir and run settings: everything else comes from the checkpoint
    assert train("--output-dir", str(out), "--resume", "auto", "--quiet", "--no-plots", "--checkpoint-every", "2") == 0
    assert shas(out) == shas(reference)


def test_second_run_into_used_dir_is_refused(reference, demo_tiles, tmp_path, capsys):
    out = tmp_path / "used"
    shutil.copytree(reference, out)
    before = shas(out)
    assert train(*args(demo_tiles, out)) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--resume" in err and "--overwrite" in err
    assert shas(out) == before
    (out / "notes.txt").write_text("mine")
    assert train(*args(demo_tiles, out, "--overwrite")) == 0
    assert shas(out) == before and (out / "notes.txt").read_text() == "mine"


def test_live_lock_stops_a_second_run(demo_tiles, tmp_path, capsys):
    """The lock is a POSIX record lock, held per process: another process holds it (a small one,
    without torch) while the run starts here."""
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from axs_lib.run_dir import locked\n"
                               "with locked(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()", str(out)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert train(*args(demo_tiles, out, "--resume", "auto")) == 2
    finally:
        holder.communicate(timeout=60)
    err = capsys.readouterr().err
    assert f"another run (pid {holder.pid})" in err and "Traceback" not in err
    assert train(*args(demo_tiles, out, "--resume", "auto", "--steps", "1")) == 0  # released with its holder


def test_guide_command_and_default_output_dir(demo_tiles, tmp_path, monkeypatch, capsys):
    """The guide's quick test from a directory holding tiles/, and --output-dir defaulting to
    runs/stage1_seed<SEED> (in this process; tests/test_guide.py runs the guide's script itself)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiles").symlink_to(demo_tiles)
    argv = ["--seed", "7", "--steps", "2", "--max-tiles", "10", "--width", "8", "--no-plots", "--quiet"]
    assert train(*argv) == 0
    assert (tmp_path / "runs" / "stage1_seed7" / "checkpoints" / "checkpoint_step_2.pt").exists()
    capsys.readouterr()
    assert train(*argv[2:]) == 0
    assert "notice: no --seed given" in capsys.readouterr().err  # shown even with --quiet
    assert (tmp_path / "runs" / "stage1_seed42").is_dir()


def test_plots_samples_and_tensorboard_events_are_written(demo_tiles, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "plots"
    argv = [a for a in args(demo_tiles, out, steps=4) if a != "--no-plots"]
    assert train(*argv) == 0
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    assert (out / "samples" / "step_4.png").stat().st_size > 1000
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "val/val_loss", "val/psnr", "val/ssim", "val/sam"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_run_from_before_the_linear_head_resumes_as_it_was_trained(demo_tiles, tmp_path):
    """Its checkpoints' configs have no ``head``, ``clear_sky`` or ``block``: a resume without flags keeps
    the sigmoid head, every tile and the GroupNorm blocks, and ends byte-identical to the run that never stopped."""
    from axs_lib.checkpoint import save_checkpoint

    old = ("--head", "sigmoid", "--keep-flagged", "--block", "groupnorm")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train(*args(demo_tiles, whole, *old, steps=4)) == 0
    assert train(*args(demo_tiles, cut, *old, steps=4)) == 0
    step2 = cut / "checkpoints" / "checkpoint_step_2.pt"
    ckpt = load_checkpoint(step2)
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in ("head", "clear_sky", "block")}
    save_checkpoint(ckpt, step2)  # as the earlier version wrote it
    for name in ("checkpoint_step_4.pt", "best.pt"):
        (cut / "checkpoints" / name).unlink(missing_ok=True)
    (cut / "checkpoints" / "latest").write_text("checkpoint_step_2.pt\n")
    assert train(*args(demo_tiles, cut, steps=4), "--resume", "auto") == 0
    assert shas(cut)["checkpoint_step_4.pt"] == shas(whole)["checkpoint_step_4.pt"]


def test_members_resume_byte_identical_and_each_trains_as_a_run_of_its_own(demo_tiles, tmp_path):
    """Two members: an interrupted run resumes to the same bytes, and member 0 (built first, from the
    run's initial weights) ends bit for bit where a one-member run ends: each member gets the gradient
    of its own loss and its own gradient clipping (a clipping limit that every step reaches, so
    clipping all members together would show)."""
    whole, cut, single = tmp_path / "whole", tmp_path / "cut", tmp_path / "single"
    clip = ("--grad-clip", "0.01")
    assert train(*args(demo_tiles, whole, "--members", "2", *clip, steps=4)) == 0
    assert train(*args(demo_tiles, cut, "--members", "2", *clip, steps=4)) == 0
    for name in ("checkpoint_step_4.pt", "best.pt"):
        (cut / "checkpoints" / name).unlink(missing_ok=True)
    (cut / "checkpoints" / "latest").write_text("checkpoint_step_2.pt\n")
    assert train(*args(demo_tiles, cut, "--members", "2", *clip, steps=4), "--resume", "auto") == 0
    assert shas(cut)["checkpoint_step_4.pt"] == shas(whole)["checkpoint_step_4.pt"]

    assert train(*args(demo_tiles, single, *clip, steps=4)) == 0
    pair = load_checkpoint(whole / "checkpoints" / "checkpoint_step_4.pt")["model_state_dict"]
    alone = load_checkpoint(single / "checkpoints" / "checkpoint_step_4.pt")["model_state_dict"]
    first = {k[len("members.0."):]: v for k, v in pair.items() if k.startswith("members.0.")}
    second = {k[len("members.1."):]: v for k, v in pair.items() if k.startswith("members.1.")}
    assert first.keys() == alone.keys() == second.keys()
    assert all(torch.equal(first[k], alone[k]) for k in alone)
    assert not all(torch.allclose(second[k], alone[k], rtol=1e-3, atol=1e-4) for k in alone)  # the control: 0.4 apart


def test_resuming_a_members_checkpoint_as_one_network_says_how_many_members_it_has(demo_tiles, tmp_path, capsys):
    out = tmp_path / "pair"
    assert train(*args(demo_tiles, out, "--members", "2", steps=2)) == 0
    capsys.readouterr()
    code = train(*args(demo_tiles, out, "--members", "1", steps=2), "--resume", "auto", "--force-resume")
    err = capsys.readouterr().err
    assert code == 2 and "its config says 2 members" in err, err
