"""A run's files stay its own, and what reaches it from outside cannot run it astray.

* Temp files are exclusive and random (`axs_lib.atomic.create_temp`): a link planted at the name a
  write would use is never written through, for config.yaml and the plots as for checkpoints.
* No part of a run directory may be a symbolic link: through a linked ``checkpoints/`` a resume
  would continue, and ``--keep-last`` prune, another run.
* ``--force-resume`` from an older step sets the newer checkpoints and ``best.pt`` aside.
* A full disk while writing config.yaml, a read-only ``checkpoints/``, a crafted sampler position,
  ``axs verify --num-workers -1``: one line and an exit status, never a traceback.

Trainer cases run in this process on six 16 x 16 tiles (a few seconds each) and compare a byte
snapshot of every file that was there before.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from axs_lib import atomic
from axs_lib.checkpoint import load_checkpoint, save_checkpoint
from axs_lib.cli import main
from axs_lib.errors import EXIT_FAILURE
from axs_lib.ingest import write_synthetic_tiles

REPO = Path(__file__).resolve().parents[1]
BASE = ["--seed", "5", "--checkpoint-every", "2", "--batch-size", "2", "--width", "4", "--val-every", "2",
        "--warmup-steps", "1", "--quiet", "--no-plots", "--no-tensorboard"]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety_tiles")
    write_synthetic_tiles(out, count=6, size=16, seed=1)
    return out


@pytest.fixture(scope="module")
def finished_run(tiles, tmp_path_factory):
    """A completed 4-step run (checkpoints at 2 and 4, best.pt), copied into each test that changes it."""
    out = tmp_path_factory.mktemp("safety_run") / "run"
    assert main(["train", "stage1", "--data-dir", str(tiles), "--output-dir", str(out), "--steps", "4", *BASE]) == 0
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != ".lock"}


def _train(capsys, *argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["train", "stage1", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("axs: error")]


def _one_error(lines: list[str], *words: str) -> None:
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]


# --------------------------------------------------------------------------- temp files


def test_temp_files_are_new_random_names_beside_the_target(tmp_path):
    fd1, a = atomic.create_temp(tmp_path / "f.json")
    fd2, b = atomic.create_temp(tmp_path / "f.json")
    os.close(fd1)
    os.close(fd2)
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith(".f.json.") and a.name.endswith(".tmp")


def test_a_link_planted_at_the_temp_name_is_skipped_not_written_through(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    names = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
    (tmp_path / ".out.txt.aaaaaaaaaaaa.tmp").symlink_to(victim)  # the first name a write will try
    atomic.atomic_write_text(tmp_path / "out.txt", "new\n")
    assert victim.read_text() == "precious\n" and (tmp_path / "out.txt").read_text() == "new\n"
    assert (tmp_path / ".out.txt.aaaaaaaaaaaa.tmp").is_symlink()  # not ours: left as it was


def test_write_config_file_does_not_write_through_a_planted_temp_link(tmp_path):
    from axs_lib.stage1.config import build_config, read_config_file, write_config_file

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / ".config.yaml.tmp").symlink_to(victim)
    write_config_file(build_config({"seed": 3}), tmp_path / "config.yaml")
    assert victim.read_text() == "precious\n"
    assert read_config_file(tmp_path / "config.yaml")["seed"] == 3


def test_plots_do_not_write_through_a_planted_temp_link(tmp_path):
    import numpy as np

    from axs_lib.stage1.plots import write_png

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / ".loss.png.tmp").symlink_to(victim)
    write_png(tmp_path / "loss.png", np.zeros((4, 4, 3), dtype=np.uint8))
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_atomic_write_is_one_write_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    from axs_lib.errors import WriteError

    target = tmp_path / "run.json"
    target.write_text("old\n")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(WriteError) as caught:
        atomic.atomic_write_text(target, "new\n")
    assert str(caught.value).startswith(f"{target}: cannot write: No space left on device")
    assert caught.value.exit_code == EXIT_FAILURE and caught.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


# --------------------------------------------------------------------------- linked run parts


def test_resume_keep_last_through_a_linked_checkpoints_folder_is_refused_and_the_other_run_kept(finished_run, tiles, tmp_path, capsys):
    other = _copy(finished_run, tmp_path / "other")
    before = _snapshot(other)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "checkpoints").symlink_to(other / "checkpoints")
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(mine), "--steps", "8", *BASE,
                         "--resume", "auto", "--keep-last", "1")
    assert code == 2
    _one_error(lines, f"{mine / 'checkpoints'}: is a symbolic link")
    assert _snapshot(other) == before
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoints"]  # nothing created either


@pytest.mark.parametrize("part", ["run.json", "metrics.jsonl", "config.yaml", "plots", "checkpoints/latest", "checkpoints/best.pt"])
def test_a_linked_run_part_stops_the_trainer_before_anything_changes(finished_run, tiles, tmp_path, part, capsys):
    run = _copy(finished_run, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / Path(part).name
    if part == "plots":
        (run / part).mkdir(exist_ok=True)  # this run drew none (--no-plots)
    os.replace(run / part, target)
    (run / part).symlink_to(target)
    before, outside = _snapshot(run), _snapshot(elsewhere)
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(run), "--steps", "6", *BASE,
                         "--resume", "auto", "--force-resume")
    assert code == 2
    _one_error(lines, f"{run / part}: is a symbolic link")
    assert _snapshot(run) == before and _snapshot(elsewhere) == outside


# --------------------------------------------------------------------------- --force-resume from an older step


def test_force_resume_from_an_older_step_sets_the_newer_checkpoints_and_best_aside(finished_run, tiles, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    ckpts = run / "checkpoints"
    step4, best = (ckpts / "checkpoint_step_4.pt").read_bytes(), (ckpts / "best.pt").read_bytes()
    assert load_checkpoint(ckpts / "best.pt")["step"] == 4
    capsys.readouterr()
    code = main(["train", "stage1", "--data-dir", str(tiles), "--output-dir", str(run), "--steps", "4", *BASE,
                 "--resume", str(ckpts / "checkpoint_step_2.pt"), "--force-resume", "--lr", "0.01"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "set aside checkpoint_step_4.pt -> checkpoint_step_4.pt.superseded" in err
    assert (ckpts / "checkpoint_step_4.pt.superseded").read_bytes() == step4  # the old step 4, bytes kept
    assert (ckpts / "best.pt.superseded").read_bytes() == best
    assert (ckpts / "checkpoint_step_4.pt").read_bytes() != step4  # the forced run's own step 4 (lr 0.01)


def test_a_second_forced_resume_keeps_the_first_set_aside_files_too(tmp_path):
    from axs_lib.run_dir import CheckpointManager

    manager = CheckpointManager(tmp_path)
    for step in (2, 4):
        manager.save({"step": step, "w": step}, step)
    assert manager.set_aside_newer(2) == ["checkpoint_step_4.pt -> checkpoint_step_4.pt.superseded"]
    manager.save({"step": 4, "w": 40}, 4)
    assert manager.set_aside_newer(2) == ["checkpoint_step_4.pt -> checkpoint_step_4.pt.superseded.1"]
    assert load_checkpoint(tmp_path / "checkpoints" / "checkpoint_step_4.pt.superseded", verify=False)["w"] == 4
    assert load_checkpoint(tmp_path / "checkpoints" / "checkpoint_step_4.pt.superseded.1", verify=False)["w"] == 40
    assert (tmp_path / "checkpoints" / "latest").read_text() == "checkpoint_step_2.pt\n"


# --------------------------------------------------------------------------- still open from the earlier corpus


def test_a_full_disk_while_writing_config_yaml_is_one_line_and_keeps_the_old_one(finished_run, tiles, tmp_path, capsys, monkeypatch):
    run = _copy(finished_run, tmp_path / "run")
    before = (run / "config.yaml").read_bytes()
    monkeypatch.setenv("AXS_FAULT", "enospc:config.yaml")  # the write fails as on a full disk (axs_lib.faults)
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(run), "--steps", "4", *BASE, "--resume", "auto")
    assert code == EXIT_FAILURE
    _one_error(lines, f"{run / 'config.yaml'}: cannot write: No space left on device")
    assert (run / "config.yaml").read_bytes() == before
    assert not list(run.glob(".*.tmp"))


def test_a_real_full_disk_while_writing_config_yaml_is_one_line(tiles, tmp_path):
    """A tmpfs that holds exactly what the run writes before config.yaml (.lock, run.json, split.json,
    environment.json, whole pages each; their sizes depend on the installed packages, so they are
    measured first by failing that write on purpose): config.yaml is the first write that finds the
    disk full."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root; the AXS_FAULT=enospc case covers the same path")
    argv = [sys.executable, "-m", "axs_lib.cli", "train", "stage1", "--data-dir", str(tiles), "--steps", "4", *BASE]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = tmp_path / "probe"
    subprocess.run([*argv, "--output-dir", str(probe)], capture_output=True, timeout=300,
                   env={**env, "AXS_FAULT": "enospc:config.yaml"})
    page = os.sysconf("SC_PAGE_SIZE")
    held = [p for p in probe.rglob("*") if p.is_file()]
    assert {".lock", "run.json", "environment.json"} <= {p.name for p in held}
    size = sum(-(-max(p.stat().st_size, 1) // page) * page for p in held)
    fs = tmp_path / "fs"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(fs)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        done = subprocess.run([*argv, "--output-dir", str(fs / "run")], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == EXIT_FAILURE, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(f"axs: error: {fs / 'run' / 'config.yaml'}: cannot write: No space left")
        assert not list((fs / "run").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def _without_write_permission(argv: list[str]) -> subprocess.CompletedProcess | None:
    """Run ``axs ARGV`` as a process that mode bits bind: root without CAP_DAC_OVERRIDE (setpriv)."""
    cmd = [sys.executable, "-m", "axs_lib.cli", *argv]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            return None
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("how", ["resume", "overwrite"])
def test_a_read_only_checkpoints_folder_is_one_line_before_anything_changes(finished_run, tiles, tmp_path, how):
    run = _copy(finished_run, tmp_path / "run")
    (run / "checkpoints" / ".checkpoint_step_6.pt.abc.tmp").write_bytes(b"half")  # a killed write's leftover
    before = _snapshot(run)
    os.chmod(run / "checkpoints", 0o555)
    flags = ["--resume", "auto", "--steps", "6", "--force-resume"] if how == "resume" else ["--overwrite", "--steps", "4"]
    try:
        done = _without_write_permission(["train", "stage1", "--data-dir", str(tiles), "--output-dir", str(run), *BASE, *flags])
    finally:
        os.chmod(run / "checkpoints", 0o755)
    if done is None:
        pytest.skip("running as root without setpriv: mode bits do not bind")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"axs: error: {run / 'checkpoints'}: is not writable (read-only directory "
                                                    "or filesystem): this run could not save its files there; make it "
                                                    "writable or use another --output-dir")
    assert _snapshot(run) == before


def _craft(run: Path, **sampler) -> Path:
    path = run / "checkpoints" / "checkpoint_step_4.pt"
    ckpt = load_checkpoint(path)
    ckpt["sampler_state"].update(sampler)
    save_checkpoint(ckpt, path)  # a valid checksum: crafted, not damaged
    return path


@pytest.mark.parametrize(("sampler", "words"), [
    ({"position": 10**30}, "sampler_state position is 10000"),
    ({"epoch": 2**63}, "sampler_state epoch is 9223372036854775808"),
    ({"position": 1000}, "sampler_state position 1000 is past the end of this run's 5-sample epoch"),
    ({"epoch": True}, "sampler_state epoch is True"),
])
def test_a_crafted_sampler_position_is_one_line_naming_the_file(finished_run, tiles, tmp_path, capsys, sampler, words):
    run = _copy(finished_run, tmp_path / "run")
    path = _craft(run, **sampler)
    before = _snapshot(run)
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(run), "--steps", "6", *BASE,
                         "--resume", "auto", "--force-resume")
    assert code == 2
    _one_error(lines, f"{path}: {words}")
    assert _snapshot(run) == before


@pytest.mark.parametrize("workers", ["-1", "100000"])
def test_verify_with_a_worker_count_out_of_range_is_one_line(workers, capsys):
    assert main(["verify", "--num-workers", workers, "--iterations", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"axs: error: --num-workers must be an integer from 0 to 256, got {workers}"


def test_a_write_error_survives_the_trip_from_a_worker_process():
    import pickle

    from axs_lib.errors import WriteError

    error = pickle.loads(pickle.dumps(WriteError("/out/t.npz", OSError(errno.ENOSPC, "No space left on device"))))
    assert isinstance(error, WriteError) and isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert str(error).startswith("/out/t.npz: cannot write: No space left on device") and error.exit_code == EXIT_FAILURE
