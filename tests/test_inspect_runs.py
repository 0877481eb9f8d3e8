"""`axs inspect` and `axs runs`: what a checkpoint holds, and whether experiments are comparable."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from axs_lib.checkpoint import save_checkpoint
from axs_lib.cli import main
from axs_lib.run_dir import lock_holders
from test_compare import make_checkpoint


@pytest.fixture(scope="module")
def ckpt() -> dict:
    return make_checkpoint(seed=42, step=3)


def write_run(root: Path, ckpt: dict, *, seed: int = 42, data: str = "d" * 64, manifest: bool = True) -> Path:
    (root / "checkpoints").mkdir(parents=True)
    save_checkpoint(dict(ckpt, seed_info=dict(ckpt["seed_info"], seed=seed)), root / "checkpoints" / "checkpoint_step_3.pt")
    (root / "checkpoints" / "latest").write_text("checkpoint_step_3.pt\n")
    if manifest:
        run = {
            "config": {"seed": seed}, "seed": seed, "environment": ckpt["environment"],
            "data_fingerprint": {"sha256": data}, "started_at": "2026-01-01T00:00:00Z",
            "ended_at": "2026-01-01T00:01:00Z", "status": "completed", "final_step": 3,
            "best": {"metric": "val_loss", "value": 0.25, "step": 2},
        }
        (root / "run.json").write_text(json.dumps(run))
    return root


# --------------------------------------------------------------------------- inspect


def test_inspect_reports_step_seed_flags_fingerprints_and_tensors(tmp_path, ckpt, capsys):
    path = tmp_path / "c.pt"
    save_checkpoint(ckpt, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for expected in ("loads safely: yes", "checksum: verified", "step: 3", "seed: 42", "sha256: dddd",
                     "seed_info.use_deterministic_algorithms: True", "val_loss: 0.5", "lr: 0.001"):
        assert expected in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n_tensors = sum(isinstance(v, torch.Tensor) for v in _leaves(ckpt))
    assert info["tensors"]["count"] == n_tensors
    assert info["tensors"]["by_section"]["model_state_dict"]["bytes"] == sum(
        t.numel() * t.element_size() for t in ckpt["model_state_dict"].values())
    assert (info["step"], info["seed_info"]["seed"], info["loads_safely"]) == (3, 42, True)
    assert info["environment"]["torch"] == torch.__version__


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def test_inspect_plain_guide_checkpoint_and_unsafe_pickle(tmp_path, capsys):
    plain = tmp_path / "model.pt"
    torch.save({"model_state_dict": {"w": torch.ones(2)}, "epoch": 10, "loss": 0.123}, plain)
    assert main(["inspect", str(plain)]) == 2  # no checksum: a damaged checksum key would look the same
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no content checksum" in err[0] and "--allow-unverified" in err[0]
    assert main(["inspect", str(plain), "--allow-unverified"]) == 0
    out = capsys.readouterr().out
    assert "checksum: NONE: not verified" in out and "epoch: 10" in out and "tensors: 1 " in out

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model_state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, unsafe)
    assert main(["inspect", str(unsafe)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--trust" in err[0]
    assert main(["inspect", str(unsafe), "--trust", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loads_safely"] is False


def test_inspect_damaged_checkpoint_is_one_line_exit_2(tmp_path, ckpt, capsys):
    path = tmp_path / "c.pt"
    save_checkpoint(ckpt, path)
    data = bytearray(path.read_bytes())
    at = data.find(ckpt["model_state_dict"]["0.weight"].numpy().tobytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "checksum mismatch" in err and "Traceback" not in err


# --------------------------------------------------------------------------- runs


def test_runs_lists_experiments_and_warns_on_different_seeds(tmp_path, ckpt, capsys):
    exp1 = write_run(tmp_path / "exp1_seed42", ckpt)
    exp2 = write_run(tmp_path / "exp2_seed123", ckpt, seed=123)
    exp3 = write_run(tmp_path / "exp3_seed42", ckpt, manifest=False)  # falls back to the latest checkpoint
    assert main(["runs", str(exp1), str(exp2), str(exp3)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["experiment", "seed", "status", "step", "best"]
    row1 = lines[1].split()
    assert row1[:5] == [str(exp1), "42", "completed", "3", "val_loss=0.25@2"]
    assert lines[3].split()[:2] == [str(exp3), "42"]
    assert "warning: different seeds used: 42, 123" in lines
    assert not any("different data" in line for line in lines)


def test_runs_same_seed_and_data_is_confirmed_different_data_warned(tmp_path, ckpt, capsys):
    a = write_run(tmp_path / "a", ckpt)
    b = write_run(tmp_path / "b", ckpt)
    c = write_run(tmp_path / "c", ckpt, data="e" * 64)
    assert main(["runs", str(a), str(b)]) == 0
    assert "all experiments use seed 42 and the same data" in capsys.readouterr().out
    assert main(["runs", str(a), str(c), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["seed"] for e in data["experiments"]] == [42, 42]
    assert data["warnings"] == ["different data used: dddddddddddd, eeeeeeeeeeee"]


def test_runs_accepts_the_guides_checkpoint_files(tmp_path, capsys):
    paths = []
    for name, seed in (("exp1", 42), ("exp2", None)):
        (tmp_path / name).mkdir()
        ckpt = {"model_state_dict": {"w": torch.ones(2)}, "epoch": 10, "loss": 0.1}
        if seed is not None:
            ckpt["seed_info"] = {"seed": seed}
        torch.save(ckpt, tmp_path / name / "model.pt")
        paths.append(str(tmp_path / name / "model.pt"))
    assert main(["runs", *paths]) == 0
    out = capsys.readouterr().out
    assert f"warning: {paths[1]}: no seed info" in out


def test_runs_bad_input_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    for bad in ("missing", "empty_dir", "broken"):
        assert main(["runs", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"axs: error: {tmp_path / bad}") and "Traceback" not in err


def _refuse_to_block(*_):
    raise AssertionError("blocked for more than 5 s")


@pytest.mark.parametrize("part,kind", [("run.json", "fifo"), ("run.json", "dev-zero"), ("checkpoints/latest", "fifo"),
                                       ("checkpoints/latest", "dev-zero")])
def test_runs_on_a_part_that_is_a_fifo_or_dev_zero_is_one_line_without_blocking(tmp_path, ckpt, capsys, part, kind):
    run = write_run(tmp_path / "run", ckpt, manifest=part == "run.json")
    target = run / part
    target.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(target)  # nobody writes to it: an ordinary open would wait forever
    else:
        target.symlink_to("/dev/zero")  # an ordinary read would never end
    old = signal.signal(signal.SIGALRM, _refuse_to_block)
    signal.alarm(5)
    try:
        assert main(["runs", str(run)]) == 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"axs: error: {target}") and "Traceback" not in err


@pytest.mark.parametrize("command", ["compare", "inspect", "runs"])
def test_help_shows_an_example(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "example" in out and f"axs {command} " in out


# --------------------------------------------------------------------------- runs: killed runs

HOLD_LOCK = (
    "import sys, time\n"
    "from axs_lib.run_dir import locked\n"
    "with locked(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(300)\n"
)


def _running_manifest(run: Path) -> None:
    manifest = json.loads((run / "run.json").read_text())
    manifest.update(status="running", final_step=0, ended_at=None)
    (run / "run.json").write_text(json.dumps(manifest))


def _status(capsys, run: Path) -> dict:
    assert main(["runs", str(run), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["experiments"][0]


def test_runs_shows_a_sigkilled_run_as_killed_at_its_newest_checkpoint(tmp_path, ckpt, capsys):
    run = write_run(tmp_path / "exp", ckpt)
    _running_manifest(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        live = _status(capsys, run)
        assert (live["status"], live["step"]) == ("running", 0) and "note" not in live
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL
    killed = _status(capsys, run)
    assert (killed["status"], killed["step"]) == ("killed", 3)
    assert "no process holds" in killed["note"] and "--resume auto" in killed["note"]
    assert main(["runs", str(run)]) == 0
    out = capsys.readouterr().out
    assert " killed " in out and f"note: {run}: run.json says running" in out


def test_runs_probe_leaves_a_lock_held_by_this_process_in_place(tmp_path, ckpt, capsys):
    # POSIX record locks belong to the process: opening and closing the lock file here would drop
    # a lock this process holds (a run started from a notebook). The probe must not do that.
    from axs_lib.run_dir import locked

    run = write_run(tmp_path / "exp", ckpt)
    _running_manifest(run)
    with locked(run):
        assert _status(capsys, run)["status"] == "running"
        try_lock = ("import fcntl, os, sys\n"
                    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                    "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")
        other = subprocess.run([sys.executable, "-c", try_lock, str(run / ".lock")], timeout=60)
        assert other.returncode == 3  # still held: another process cannot take it
    assert _status(capsys, run)["status"] == "killed"


def test_lock_holders_reads_granted_locks_of_that_file_only(tmp_path):
    run = tmp_path / "exp"
    run.mkdir()
    (run / ".lock").write_text("")
    st = os.stat(run / ".lock")
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    table = tmp_path / "locks"
    table.write_text(
        f"1: POSIX  ADVISORY  WRITE 111 {file_id} 0 EOF\n"
        f"1: -> POSIX  ADVISORY  WRITE 222 {file_id} 0 EOF\n"
        f"2: FLOCK  ADVISORY  WRITE 333 {file_id} 0 EOF\n"
        f"3: POSIX  ADVISORY  WRITE 444 {file_id}9 0 EOF\n"
    )
    assert lock_holders(run, str(table)) == {111}
    table.write_text(f"3: POSIX  ADVISORY  WRITE 444 {file_id}9 0 EOF\n")
    assert lock_holders(run, str(table)) == set()
    assert lock_holders(tmp_path / "no_run", str(table)) == set()
    assert lock_holders(run, str(tmp_path / "unreadable")) is None


@pytest.mark.parametrize(("manifest", "odd"), [
    ({"seed": [1], "status": "completed"}, "seed"),
    ({"seed": 1, "data_fingerprint": {"sha256": 5}}, "data"),
    ({"seed": 1, "environment": {"torch": "2.4", "gpus": 5}}, None),
    ({"seed": 1, "environment": {"torch": "2.4", "gpus": [[1]]}}, "environment.device"),
    ({"seed": 1, "status": 5, "best": {"value": [1], "metric": "val_loss", "step": 2}}, "status, best.value"),
    ({"seed": {"a": 1}, "final_step": "4", "environment": {"fingerprint": 3}}, "seed, step"),
])
def test_runs_on_a_hand_edited_run_json_shows_the_row_and_names_what_is_unreadable(tmp_path, ckpt, capsys, manifest, odd):
    edited, good = tmp_path / "edited", write_run(tmp_path / "good", ckpt)
    edited.mkdir()
    (edited / "run.json").write_text(json.dumps(manifest))
    assert main(["runs", str(edited), str(good)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err == ""
    assert str(good) in captured.out
    if odd:
        assert f"note: {edited}: {edited / 'run.json'}: unreadable fields shown as missing ({odd})" in captured.out
    assert main(["runs", str(edited), "--json"]) == 0
    json.loads(capsys.readouterr().out)


def test_runs_shows_the_duration_and_a_column_for_each_config_field_that_differs(tmp_path, ckpt, capsys):
    runs = []
    for name, lr, width in (("a", 0.001, 16), ("b", 0.002, 16), ("c", 0.001, 16)):
        run = write_run(tmp_path / name, ckpt)
        manifest = json.loads((run / "run.json").read_text())
        manifest["config"].update(lr=lr, width=width, output_dir=str(run))  # where a run lives is no difference
        (run / "run.json").write_text(json.dumps(manifest))
        runs.append(str(run))
    assert main(["runs", *runs]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:8] == ["experiment", "seed", "status", "step", "best", "duration", "lr", "data"]
    assert lines[1].split()[5:7] == ["1m00s", "0.001"] and lines[2].split()[6] == "0.002"
    assert main(["runs", "--json", *runs]) == 0
    assert json.loads(capsys.readouterr().out)["config_differences"] == ["lr"]
