"""Signals as schedulers send them: to the whole process group, DataLoader workers included.

Slurm (``scancel``, ``--signal``), systemd, Kubernetes and ``timeout`` signal every process of the
job, so the workers get SIGTERM at the same moment as the main process. The run must still end
with a checkpoint at the current step, exit 128 + signal number, no traceback, and a resume must
end byte-identical to a run that was never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from axs_lib.cli import main
from axs_lib.ingest import write_synthetic_tiles
from axs_lib.workers import ignore_stop_signals

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
ARGS = ["--seed", "9", "--steps", str(STEPS), "--checkpoint-every", "10", "--batch-size", "2", "--width", "4",
        "--val-every", "10", "--warmup-steps", "2", "--log-every", "1", "--speckle-std", "0.1", "--quiet",
        "--no-plots", "--no-tensorboard"]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    out = tmp_path_factory.mktemp("signal_tiles")
    write_synthetic_tiles(out, count=9, size=16, seed=2)
    return out


@pytest.fixture(scope="module")
def reference(tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("signal_ref") / "run"
    assert main(["train", "stage1", "--data-dir", str(tiles), "--output-dir", str(out), *ARGS]) == 0
    return out


def _shas(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "checkpoints").glob("checkpoint_step_*.pt"))}


def _logged_steps(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if '"train"' in line)


# SIGUSR1 takes the same path with another exit status: in make soak.
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), pytest.param(signal.SIGUSR1, 138, marks=pytest.mark.slow)])
def test_a_signal_to_the_process_group_checkpoints_and_resumes_exactly(tiles, reference, tmp_path, signum, code):
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "scripts" / "train_stage1.py"), "--data-dir", str(tiles), "--output-dir", str(out),
            *ARGS, "--num-workers", "2"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while _logged_steps(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signum)  # every process of the group: main and both workers
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted"
    stopped = info["final_step"]
    assert 3 <= stopped < STEPS
    assert (out / "checkpoints" / "latest").read_text().strip() == f"checkpoint_step_{stopped}.pt"

    assert main(["train", "stage1", "--data-dir", str(tiles), "--output-dir", str(out), *ARGS, "--num-workers", "2",
                 "--resume", "auto"]) == 0
    ref = _shas(reference)
    got = _shas(out)
    assert {k: v for k, v in got.items() if k in ref} == ref


def _spawn(tiles: Path, out: Path, *extra: str, fault: str | None = None) -> subprocess.Popen:
    argv = [sys.executable, str(ROOT / "scripts" / "train_stage1.py"), "--data-dir", str(tiles), "--output-dir", str(out),
            *ARGS, "--num-workers", "2", "--checkpoint-mode", "async", *extra]
    env = {**os.environ, **({"AXS_FAULT": fault} if fault else {})}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_line(proc: subprocess.Popen, text: str) -> None:
    for line in proc.stderr:
        if text in line:
            return
    raise AssertionError(f"the run ended before printing {text!r}: exit {proc.wait()}")


def test_sigterm_while_a_background_checkpoint_write_is_in_flight_finishes_it_and_resumes_exactly(tiles, reference, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(tiles, out, fault="slow:checkpoint_step_10.pt")
    _wait_for_line(proc, "axs fault: slow commit")  # the writer thread sleeps before its rename
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    assert "Traceback" not in err, err
    ckpts = out / "checkpoints"
    stopped = json.loads((out / "run.json").read_text())["final_step"]
    assert (ckpts / "checkpoint_step_10.pt").exists()  # the write in flight was finished, not abandoned
    assert (ckpts / "latest").read_text().strip() == f"checkpoint_step_{stopped}.pt"
    assert main(["train", "stage1", "--data-dir", str(tiles), "--output-dir", str(out), *ARGS, "--num-workers", "1",
                 "--resume", "auto"]) == 0
    ref = _shas(reference)
    assert {k: v for k, v in _shas(out).items() if k in ref} == ref


def test_sigkill_during_a_background_checkpoint_write_then_resume_is_exact(tiles, reference, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(tiles, out, fault="stop:checkpoint_step_20.pt")
    _wait_for_line(proc, "axs fault: stopped before committing")  # the writer thread hangs mid-write
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = out / "checkpoints"
    assert not (ckpts / "checkpoint_step_20.pt").exists()
    assert (ckpts / "latest").read_text().strip() == "checkpoint_step_10.pt"  # still names a complete file
    assert main(["train", "stage1", "--data-dir", str(tiles), "--output-dir", str(out), *ARGS, "--num-workers", "2",
                 "--checkpoint-mode", "async", "--resume", "auto"]) == 0
    assert _shas(out) == _shas(reference)


def test_the_documented_slurm_script_checkpoints_on_term_and_requeues(tiles, reference, tmp_path):
    """docs/reproducibility.md's batch script, with ``scontrol requeue`` recorded instead of run and
    SIGTERM sent to the batch shell alone (what ``--signal=B:TERM@60`` does)."""
    from doc_blocks import parse_blocks

    block = next(b for b in parse_blocks(ROOT / "docs" / "reproducibility.md") if "#SBATCH --signal" in b.code)
    script = block.code.replace("scontrol requeue $SLURM_JOB_ID", "echo requeue $SLURM_JOB_ID > requeued")
    (tmp_path / "job.sh").write_text(script)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "stage1", "--data-dir", str(tiles), *ARGS, "--num-workers", "2", "--print-config"]) == 0
    (tmp_path / "exp.yaml").write_text(printed.getvalue())
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    assert (bin_dir / "axs").exists(), "the axs console script is installed beside the interpreter"

    job = subprocess.Popen(["bash", "job.sh"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "runs" / "exp"
    deadline = time.monotonic() + 240
    while _logged_steps(out) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # to the batch shell only; its trap forwards it to the trainer
    _, err = job.communicate(timeout=240)
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"], err
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"

    again = subprocess.run(["bash", "job.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    ref = _shas(reference)
    assert {k: v for k, v in _shas(out).items() if k in ref} == ref


def test_under_nohup_the_log_file_shows_step_lines_while_the_run_is_alive(tiles, tmp_path):
    """stdout redirected to a file (nohup, Slurm, ``| tee``): no progress bar, a plain step line every
    ``--log-every`` steps, flushed at once rather than when the process ends."""
    log_path = tmp_path / "train.log"
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "scripts" / "train_stage1.py"), "--data-dir", str(tiles), "--output-dir", str(out),
            *[a for a in ARGS if a != "--quiet"], "--steps", "400", "--checkpoint-every", "400", "--val-every", "400"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as on a user's machine
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["nohup", *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if "step 3/400" in log_path.read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, log_path.read_text()  # still training, and the lines are already there
        text = log_path.read_text()
        assert "step 1/400" in text and "device cpu" in text
        assert "\r" not in text  # no progress bar redraws in a log file
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --------------------------------------------------------------------------- worker start-up


def _stopped_before_ignoring(worker_id: int) -> None:
    """A scheduler's SIGTERM landing in a starting worker before it ignores the stop signals
    (torch's own worker SIGTERM handler is already installed then, and kills the worker)."""
    os.kill(os.getpid(), signal.SIGTERM)
    ignore_stop_signals(worker_id)


def test_a_stop_signal_reaching_a_worker_before_it_ignores_stop_signals_does_not_kill_it():
    from torch.utils.data import DataLoader

    from axs_lib.loader import ResumableLoader
    from axs_lib.workers import stop_signals_held

    with ResumableLoader(list(range(8)), 2, seed=0, num_workers=2, worker_init_fn=_stopped_before_ignoring) as loader:
        assert sorted(i for batch in loader for i in batch.tolist()) == list(range(8))
    plain = DataLoader(list(range(8)), 2, num_workers=2, worker_init_fn=_stopped_before_ignoring)
    with stop_signals_held():  # how the trainer starts its validation workers
        batches = iter(plain)
    assert sorted(i for batch in batches for i in batch.tolist()) == list(range(8))
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, [])  # nothing left blocked here


def test_progress_lines_for_a_log_carry_rate_elapsed_time_and_eta():
    from axs_lib.training import progress_line as _progress

    assert _progress(30, 90, 10.0) == "3.00 steps/s  elapsed 00:10  eta 00:30"
    assert _progress(0, 5, 0.0).endswith("eta ?")
