"""AsyncCheckpointWriter: same bytes as a synchronous write, a snapshot the caller may change at once,
one write in flight, background errors raised later, and SIGKILL during a write loses nothing."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from axs_lib import checkpoint
from axs_lib.checkpoint import load_checkpoint, read_latest, save_checkpoint, write_checkpoint_files
from axs_lib.checkpoint_writer import AsyncCheckpointWriter
from axs_lib.errors import EXIT_FAILURE, AxsError

REPO = Path(__file__).resolve().parents[1]


def _state(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def _ckpt(model, opt, step: int = 1) -> dict:
    base = torch.arange(10.0)
    return {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        # one tensor twice and a view of it: torch.save writes one storage and references
        "shared": [base, base[2:5], base],
        "param": torch.nn.Parameter(torch.ones(2)),
        "empty": [torch.empty(0), torch.empty(0, dtype=torch.int64)],
        "step": step,
        "config": {"lr": 1e-3, "name": "x"},
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_async_files_are_byte_identical_to_sync_files(tmp_path):
    model, opt = _state()
    (tmp_path / "sync").mkdir()
    (tmp_path / "async").mkdir()
    write_checkpoint_files(tmp_path / "sync", ["best.pt", "checkpoint_step_1.pt"], _ckpt(model, opt), latest="checkpoint_step_1.pt")
    with AsyncCheckpointWriter() as writer:
        writer.submit(tmp_path / "async", ["best.pt", "checkpoint_step_1.pt"], _ckpt(model, opt), latest="checkpoint_step_1.pt")
    for name in ("best.pt", "checkpoint_step_1.pt", "latest"):
        assert sha(tmp_path / "async" / name) == sha(tmp_path / "sync" / name), name
    assert (tmp_path / "async" / "best.pt").stat().st_ino == (tmp_path / "async" / "checkpoint_step_1.pt").stat().st_ino


def test_second_snapshot_reuses_the_buffers_and_still_matches_sync(tmp_path):
    model, opt = _state()
    writer = AsyncCheckpointWriter()
    writer.submit(tmp_path, ["a.pt"], _ckpt(model, opt, step=1))
    writer.wait()
    first = [b.data_ptr() for b in writer._buffers]
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    writer.submit(tmp_path, ["b.pt"], _ckpt(model, opt, step=2))
    writer.close()
    assert [b.data_ptr() for b in writer._buffers or []] in ([], first)  # released on close
    save_checkpoint(_ckpt(model, opt, step=2), tmp_path / "sync.pt")
    assert sha(tmp_path / "b.pt") == sha(tmp_path / "sync.pt")
    assert sha(tmp_path / "a.pt") != sha(tmp_path / "b.pt")


class _GatedSave:
    """Stand-in for torch.save that waits for a gate, so a test controls when serialisation happens."""

    def __init__(self, real):
        self.real, self.gate, self.log = real, threading.Event(), []

    def __call__(self, obj, f):
        self.log.append("start")
        assert self.gate.wait(30)
        self.real(obj, f)
        self.log.append("end")


def test_caller_may_change_the_model_right_after_submit(tmp_path, monkeypatch):
    model, opt = _state()
    save_checkpoint(_ckpt(model, opt), tmp_path / "before.pt")
    gated = _GatedSave(torch.save)
    monkeypatch.setattr(checkpoint.torch, "save", gated)
    writer = AsyncCheckpointWriter()
    ckpt = _ckpt(model, opt)
    writer.submit(tmp_path, ["async.pt"], ckpt)
    with torch.no_grad():  # the next training step, while the write has not even started serialising
        for p in model.parameters():
            p.add_(1.0)
        for state in opt.state.values():
            state["exp_avg"].zero_()
    ckpt["step"] = 99
    ckpt["config"]["name"] = "changed"
    gated.gate.set()
    writer.close()
    monkeypatch.undo()
    assert sha(tmp_path / "async.pt") == sha(tmp_path / "before.pt")


def test_next_submit_waits_for_the_write_in_flight(tmp_path, monkeypatch):
    model, opt = _state()
    gated = _GatedSave(torch.save)
    monkeypatch.setattr(checkpoint.torch, "save", gated)
    writer = AsyncCheckpointWriter()
    writer.submit(tmp_path, ["a.pt"], _ckpt(model, opt, 1), latest="a.pt")
    second = threading.Thread(target=writer.submit, args=(tmp_path, ["b.pt"], _ckpt(model, opt, 2)), kwargs={"latest": "b.pt"})
    second.start()
    time.sleep(0.3)
    assert second.is_alive() and gated.log == ["start"]  # blocked behind the first write
    gated.gate.set()
    second.join(30)
    writer.close()
    assert gated.log == ["start", "end", "start", "end"]
    assert read_latest(tmp_path).name == "b.pt"


@pytest.mark.parametrize("raised_by", ["wait", "submit", "close"])
def test_background_error_is_one_line_raised_by_the_next_call(tmp_path, monkeypatch, raised_by):
    model, opt = _state()
    write_checkpoint_files(tmp_path, ["checkpoint_step_1.pt"], _ckpt(model, opt, 1), latest="checkpoint_step_1.pt")
    monkeypatch.setenv("AXS_FAULT", "enospc:checkpoint_step_2.pt")
    writer = AsyncCheckpointWriter()
    writer.submit(tmp_path, ["checkpoint_step_2.pt"], _ckpt(model, opt, 2), latest="checkpoint_step_2.pt")  # returns at once
    call = {
        "wait": writer.wait,
        "submit": lambda: writer.submit(tmp_path, ["checkpoint_step_3.pt"], _ckpt(model, opt, 3), latest="checkpoint_step_3.pt"),
        "close": writer.close,
    }[raised_by]
    with pytest.raises(AxsError) as caught:
        call()
    assert caught.value.exit_code == EXIT_FAILURE and "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{tmp_path / 'checkpoint_step_2.pt'}: cannot write checkpoint: No space left on device")
    assert read_latest(tmp_path).name == "checkpoint_step_1.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step_1.pt", "latest"]
    writer.close()  # the error was reported once; the writer is usable until closed


def test_submit_refuses_unsafe_content_in_the_caller(tmp_path):
    writer = AsyncCheckpointWriter()
    with pytest.raises(TypeError, match="meta: pathlib"):
        writer.submit(tmp_path, ["a.pt"], {"meta": Path("x")})
    writer.close()
    with pytest.raises(RuntimeError, match="after close"):
        writer.submit(tmp_path, ["a.pt"], {"w": torch.ones(1)})
    assert not list(tmp_path.iterdir())


_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from axs_lib.checkpoint_writer import AsyncCheckpointWriter
    directory, fault = sys.argv[1:]
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    writer = AsyncCheckpointWriter()
    writer.submit(directory, ["checkpoint_step_2.pt"], {"model_state_dict": model.state_dict(), "step": 2}, latest="checkpoint_step_2.pt")
    writer.wait()
    os.environ["AXS_FAULT"] = fault  # read at each write: only the second checkpoint meets it
    with torch.no_grad():
        model.weight.add_(1.0)
    writer.submit(directory, ["checkpoint_step_4.pt", "best.pt"], {"model_state_dict": model.state_dict(), "step": 4},
                  latest="checkpoint_step_4.pt")
    print("submitted", flush=True)
    while True:  # the loop goes on training while the write is in flight
        with torch.no_grad():
            model.weight.mul_(0.999)
        time.sleep(0.01)
""")


@pytest.mark.parametrize("stop_at", ["checkpoint_step_4.pt", "latest"])
def test_sigkill_while_a_write_is_in_flight_keeps_earlier_checkpoints_and_latest(tmp_path, stop_at):
    """A real process, killed from outside while its background write stands at a chosen point."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), f"stop:{stop_at}"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "submitted"
        assert proc.stderr.readline().strip() == f"axs fault: stopped before committing {tmp_path / stop_at}"
        assert proc.poll() is None  # alive: main thread training, writer thread stopped mid-write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_latest(tmp_path).name == "checkpoint_step_2.pt"
    assert load_checkpoint(tmp_path / "checkpoint_step_2.pt")["step"] == 2
    committed = {"checkpoint_step_4.pt": set(), "latest": {"checkpoint_step_4.pt", "best.pt"}}[stop_at]
    visible = {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert visible == {"checkpoint_step_2.pt", "latest"} | committed
    for name in committed:  # what was renamed into place before the kill is complete and durable
        assert load_checkpoint(tmp_path / name)["step"] == 4
