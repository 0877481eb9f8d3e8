"""The session layer (`axs_lib.training`) carries a second trainer: examples/stage2_trainer.py, a
land-cover classifier that writes only its data, model, loss and validation, gets the Stage-1
trainer's promises (reruns, worker counts, a stop and resume give identical bytes; a changed
config is refused before anything is written)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from axs_lib.errors import UsageError
from axs_lib.ingest import write_synthetic_tiles
from axs_lib.training import ResumeRequest, resume_problems, run_training
from conftest import import_file

REPO = Path(__file__).resolve().parents[1]
example = import_file(REPO / "examples" / "stage2_trainer.py", "stage2_trainer_example")
STEPS, EVERY = 12, 4


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    out = tmp_path_factory.mktemp("landcover_tiles")
    write_synthetic_tiles(out, count=10, size=16, seed=3)
    return out


def config(tiles, out, **changes):
    return example.LandCoverConfig(str(tiles), str(out), seed=5, steps=STEPS, batch_size=2, accum_steps=2, val_every=EVERY,
                                   checkpoint_every=EVERY, **changes)


def train(cfg, resume=None):
    return run_training(example.LandCoverTrainer, cfg, ResumeRequest(resume), log=lambda line: None)


def checkpoints(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "checkpoints").glob("*.pt"))}


@pytest.fixture(scope="module")
def reference(tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("landcover_ref")
    result = train(config(tiles, out))
    assert (result.exit_code, result.final_step, result.status) == (0, STEPS, "completed")
    return out


def test_a_second_trainer_writes_the_session_records_and_checkpoints(reference):
    files = checkpoints(reference)
    assert {f"checkpoint_step_{s}.pt" for s in range(EVERY, STEPS + 1, EVERY)} <= set(files)
    info = json.loads((reference / "run.json").read_text())
    assert info["status"] == "completed" and info["final_step"] == STEPS
    assert {"checkpoints/checkpoint_step_4.pt", "metrics.jsonl", "environment.json"} <= set(info["written"])
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "val"] == [4, 8, 12]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records if r["split"] == "val")


def test_a_second_trainer_reruns_byte_identically_with_any_worker_count(tiles, reference, tmp_path):
    train(config(tiles, tmp_path, num_workers=2))
    assert checkpoints(tmp_path) == checkpoints(reference)


def test_a_second_trainer_with_another_seed_writes_other_bytes(tiles, reference, tmp_path):
    cfg = config(tiles, tmp_path)
    cfg.seed = 6
    train(cfg)
    other, ref = checkpoints(tmp_path), checkpoints(reference)
    assert other.keys() == ref.keys() and all(other[name] != ref[name] for name in ref)  # the control: bits do move


def stop_by_signal_at(monkeypatch, stop_at: int):
    """Make the example trainer send itself SIGUSR1 (as `scancel --signal=USR1` would) in the step that
    starts at ``stop_at - 1``, once; returns the unpatched loss for the resume to put back."""
    original = example.LandCoverTrainer.micro_batch_loss

    def loss_then_stop(self, batch):
        if self.state.step == stop_at - 1 and not getattr(self, "stopped", False):
            self.stopped = True
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, batch)

    monkeypatch.setattr(example.LandCoverTrainer, "micro_batch_loss", loss_then_stop)
    return original


def test_a_second_trainer_stopped_by_a_signal_resumes_to_the_same_bytes(tiles, reference, tmp_path, monkeypatch):
    stop_at = 5  # mid-epoch (8 training tiles, 4 a step) and between two checkpoints: the stop writes step 5
    original = stop_by_signal_at(monkeypatch, stop_at)
    stopped = train(config(tiles, tmp_path))
    assert (stopped.exit_code, stopped.final_step, stopped.status) == (128 + signal.SIGUSR1, stop_at, "interrupted")
    monkeypatch.setattr(example.LandCoverTrainer, "micro_batch_loss", original)
    resumed = train(config(tiles, tmp_path), resume="auto")
    assert resumed.final_step == STEPS
    assert json.loads((tmp_path / "run.json").read_text())["resumed_from"]["step"] == stop_at  # continued, not redone
    ref = checkpoints(reference)
    got = checkpoints(tmp_path)
    assert {name: got[name] for name in ref} == ref


def test_a_trainer_whose_loader_position_was_not_restored_is_refused_on_resume(tiles, reference, tmp_path, monkeypatch):
    """A subclass that registers its loader after loading the state would resume at the start of the
    data without a word: `attach_data` refuses it."""
    import shutil

    from axs_lib.state import TrainingState

    shutil.copytree(reference, tmp_path / "run")
    original = TrainingState.__init__

    def without_loader(self, **components):
        components.pop("loader", None)
        original(self, **components)

    monkeypatch.setattr(TrainingState, "__init__", without_loader)
    with pytest.raises(TypeError, match="loader's position was not restored"):
        train(config(tiles, tmp_path / "run"), resume="auto")


def test_a_second_trainer_refuses_a_resume_under_another_result_field_before_writing(tiles, reference, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match=r"cannot resume exactly: lr: checkpoint 0\.003, now 0\.001"):
        train(config(tiles, run, lr=1e-3), resume="auto")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_the_resume_rule_names_an_earlier_versions_sharding_and_accumulation():
    fp = {"scheme": "s", "sha256": "a"}
    base = {"format_version": 2, "data_fingerprint": fp}
    assert resume_problems(base, [], fp) == []
    sharded = resume_problems({**base, "world_size": 2}, [], fp)
    assert len(sharded) == 1 and "sharded each step over 2 ranks" in sharded[0]
    assert resume_problems({**base, "world_size": 2}, [], fp, allow_world_size_change=True) == []
    summed = resume_problems({**base, "world_size": 1, "config": {"accum_steps": 4}}, ["lr: differs"], fp)
    assert summed[0] == "lr: differs" and "drew all 4 micro-batches" in summed[1]


def test_the_gpu_checks_sync_guard_wraps_the_step_the_trainer_runs(monkeypatch):
    """tools/gpu_check.py forbids host syncs inside `Trainer.train_step` by wrapping it; a rename of
    the step would make that check a crash on the GPU machine, where CI never looks."""
    from axs_lib.stage1.train import Stage1Trainer

    gpu_check = import_file(REPO / "tools" / "gpu_check.py", "gpu_check_tool")
    modes, calls = [], []
    monkeypatch.setattr("torch.cuda.set_sync_debug_mode", modes.append)
    monkeypatch.setattr(Stage1Trainer, "train_step", lambda self, n: calls.append(n) or n)  # undone after the test
    gpu_check.strict_steps()
    assert Stage1Trainer.train_step(None, 3) == 3
    assert calls == [3] and modes == ["error", "default"]


def test_a_second_trainer_refuses_an_optimizer_state_that_does_not_fit_its_parameters(tiles, reference, tmp_path):
    """The session checks the optimizer state a trainer loaded, so a task without its own check
    still gets one line instead of a traceback inside the first step."""
    import shutil

    import torch

    from axs_lib.checkpoint import CHECKSUM_KEYS, FORMAT_KEY, load_checkpoint, save_checkpoint
    from axs_lib.errors import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    path = run / "checkpoints" / "checkpoint_step_8.pt"
    ckpt = {k: v for k, v in load_checkpoint(path).items() if k not in (*CHECKSUM_KEYS, FORMAT_KEY)}
    state = ckpt["optimizer_state_dict"]["state"]
    state[next(iter(state))]["exp_avg_sq"] = torch.zeros(5)
    save_checkpoint(ckpt, path)
    with pytest.raises(CheckpointError, match=r"exp_avg_sq has shape \(5,\)"):
        run_training(example.LandCoverTrainer, config(tiles, run), ResumeRequest(str(path)), log=lambda line: None)


def test_the_loggers_hear_that_a_run_stopped_by_a_signal_was_interrupted(tiles, tmp_path, monkeypatch):
    """MLflow marks such a run KILLED (not FINISHED); its resume runs on and closes normally."""
    closed = []

    class Recorder:
        def add(self, record):
            pass

        def close(self, status=None):
            closed.append(status)

    monkeypatch.setattr(example.LandCoverTrainer, "open_events", lambda self: Recorder())
    original = stop_by_signal_at(monkeypatch, 3)
    assert train(config(tiles, tmp_path)).status == "interrupted"
    monkeypatch.setattr(example.LandCoverTrainer, "micro_batch_loss", original)
    assert train(config(tiles, tmp_path), resume="auto").status == "completed"
    assert closed == ["interrupted", None]  # None: the loggers' own rule (finished, or failed on an exception)


def test_a_task_whose_event_log_closes_without_a_status_still_stops_cleanly(tiles, tmp_path, monkeypatch):
    closed = []

    class PlainEvents:  # an events object of one's own, from before close() took a status
        def add(self, record):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setattr(example.LandCoverTrainer, "open_events", lambda self: PlainEvents())
    stop_by_signal_at(monkeypatch, 3)
    result = train(config(tiles, tmp_path))
    assert result.status == "interrupted" and closed == [True]
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
