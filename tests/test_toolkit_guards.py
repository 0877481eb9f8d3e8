"""The toolkit as a loop of the user's own meets it: stop signals, refused resumes and fresh starts,
hostile states, temp files of a killed write. Each refusal is one line and changes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from axs_lib.errors import CheckpointError, UsageError
from axs_lib.loader import ResumableLoader
from axs_lib.run_dir import CheckpointManager
from axs_lib.sampling import ResumableSampler
from axs_lib.samples import SeededDataset
from axs_lib.signals import StopRequest, StopRequested, exit_code
from axs_lib.early_stopping import EarlyStopping
from axs_lib.state import TrainingState

REPO = Path(__file__).resolve().parents[1]


def _state(seed: int = 7, **extras) -> TrainingState:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), seed=seed,
                         extras=extras or None)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- stop signals


def test_stop_request_turns_a_signal_into_a_flag_and_a_second_one_into_keyboard_interrupt():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code == 143 and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
    assert (exit_code(signal.SIGINT), exit_code(signal.SIGUSR1)) == (130, 138)
    assert StopRequested(signal.SIGINT).code == 130 and isinstance(StopRequested(signal.SIGTERM), SystemExit)


_LOOP = textwrap.dedent("""
    import sys, time
    from axs_lib.loader import ResumableLoader
    from axs_lib.signals import StopRequest

    class Slow:
        def __len__(self):
            return 64
        def __getitem__(self, i):
            time.sleep(0.01)
            return i

    loader = ResumableLoader(Slow(), 2, seed=0, num_workers=2)
    batches = loader.endless()
    with loader, StopRequest() as stop:
        for step in range(10_000):
            next(batches)
            print(step, flush=True)
            if stop.requested:
                print("stopped at", loader.state_dict(), flush=True)
                sys.exit(stop.exit_code)
""")


def test_a_group_sigterm_leaves_resumable_loader_workers_alive_and_the_loop_exits_143():
    """Without a worker_init_fn of the user's: the loader's workers ignore the stop signals themselves."""
    proc = subprocess.Popen([sys.executable, "-c", _LOOP], cwd=REPO, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    for line in proc.stdout:
        if line.strip() == "3":
            break
    os.killpg(proc.pid, signal.SIGTERM)  # the loop and both workers
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped at" in out and "Traceback" not in err, err


# --------------------------------------------------------------------------- resume and fresh start


def test_resume_with_another_seed_or_config_is_refused_unless_forced(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({**_state().state_dict(), "config": {"lr": 0.1}}, 4)
    with pytest.raises(UsageError, match="seed: checkpoint 7, now 8") as caught:
        CheckpointManager(tmp_path).resume("auto", seed=8, config={"lr": 0.1})
    assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(UsageError, match="lr: checkpoint 0.1, now 0.2"):
        CheckpointManager(tmp_path).resume("auto", seed=7, config={"lr": 0.2})
    assert CheckpointManager(tmp_path).resume("auto", seed=8, force=True)[0].name == "checkpoint_step_4.pt"
    path, checkpoint = CheckpointManager(tmp_path).resume("auto", seed=7, config={"lr": 0.1})
    assert path.name == "checkpoint_step_4.pt"


def test_training_state_refuses_a_checkpoint_of_another_seed_in_one_line():
    saved = _state(seed=7).state_dict()
    other = _state(seed=8)
    with pytest.raises(CheckpointError, match="seed: checkpoint 7, now 8"):
        other.load_state_dict(saved, source="ckpt.pt")
    other.load_state_dict(saved, check_seed=False)  # a caller that checked already
    assert other.step == 0


def test_a_fresh_start_over_earlier_checkpoints_is_refused_and_overwrites_nothing(tmp_path):
    CheckpointManager(tmp_path).save(_state().state_dict(), 4)
    before = _files(tmp_path / "checkpoints")
    with pytest.raises(UsageError, match="holds checkpoints of an earlier run"):
        CheckpointManager(tmp_path).resume(None)
    with pytest.raises(UsageError, match="holds checkpoints of an earlier run"):
        CheckpointManager(tmp_path).save(_state().state_dict(), 4)  # a loop that never asked to resume
    assert _files(tmp_path / "checkpoints") == before
    resumed = CheckpointManager(tmp_path)
    assert resumed.resume("auto") is not None
    resumed.save(_state().state_dict(), 8)  # a resumed run writes on


def test_temp_files_of_a_killed_write_are_removed_at_the_first_save_and_no_other_file(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = [folder / ".checkpoint_step_8.pt.k2j4x9.tmp", folder / ".latest.a1b2.tmp", folder / ".best.pt.123.link.tmp"]
    kept = [folder / ".notes.txt.tmp", folder / "mine.tmp"]
    for path in stale + kept:
        path.write_bytes(b"half")
    manager = CheckpointManager(tmp_path)
    assert manager.resume("auto") is None
    manager.save(_state().state_dict(), 2)
    assert not [p for p in stale if p.exists()] and all(p.exists() for p in kept)


# --------------------------------------------------------------------------- states of the wrong shape or type


def test_training_state_keeps_the_callers_extras_dict():
    extras = {"best": None}
    state = TrainingState(seed=7, extras=extras)
    extras["best"] = 0.25  # set after construction, as a loop does
    extras["epoch_metrics"] = [1.0]
    saved = state.state_dict()
    assert saved["best"] == 0.25 and saved["epoch_metrics"] == [1.0]
    restored_into = {"best": None, "epoch_metrics": None}
    TrainingState(seed=7, extras=restored_into).load_state_dict(saved)
    assert restored_into == {"best": 0.25, "epoch_metrics": [1.0]}


@pytest.mark.parametrize("damage", [
    lambda c: [c],  # not a dict
    lambda c: {**c, "model_state_dict": [1, 2]},  # a component state of the wrong type
    lambda c: {**c, "model_state_dict": {"weight": torch.zeros(5, 5), "bias": torch.zeros(2)}},  # wrong shape
    lambda c: {**c, "optimizer_state_dict": {"state": 3}},
    lambda c: {**c, "step": "12"},
])
def test_training_state_refuses_a_damaged_checkpoint_in_one_line_naming_the_file(damage):
    saved = _state().state_dict()
    with pytest.raises(CheckpointError) as caught:
        _state().load_state_dict(damage(saved), source="run/checkpoints/checkpoint_step_4.pt")
    message = str(caught.value)
    assert message.startswith("run/checkpoints/checkpoint_step_4.pt: ") and len(message.splitlines()) == 1, message


@pytest.mark.parametrize("obj, state", [
    (lambda: EarlyStopping(), {"patience": "3"}),
    (lambda: EarlyStopping(), {"best": [1.0], "mode": "min"}),
    (lambda: EarlyStopping(), {"unknown": 1}),
    (lambda: EarlyStopping(), ["patience", 3]),
    (lambda: ResumableSampler(10, 0), {"epoch": 0, "position": "x" * 10_000}),
    (lambda: ResumableSampler(10, 0), {"epoch": 0}),
    (lambda: ResumableLoader(list(range(10)), 2, seed=0), {"epoch": 0, "position": 0, "num_samples": "10"}),
    (lambda: ResumableLoader(list(range(10)), 2, seed=0), ("epoch", 0)),
    (lambda: SeededDataset(list(range(10)), 0), {"epoch": -1}),
    (lambda: SeededDataset(list(range(10)), 0), {"x" * 10_000: 1}),
])
def test_every_toolkit_load_state_dict_refuses_a_wrong_state_in_one_short_line(obj, state):
    target = obj()
    before = target.state_dict()
    with pytest.raises(ValueError) as caught:
        target.load_state_dict(state)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and len(message) < 300, message
    assert target.state_dict() == before


def test_early_stopping_state_round_trips():
    stopper = EarlyStopping(patience=2, mode="max", metric="psnr")
    stopper.update(20.0, 5)
    stopper.update(19.0, 10)
    restored = EarlyStopping()
    restored.load_state_dict(stopper.state_dict())
    assert restored == stopper

