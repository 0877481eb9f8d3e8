"""The trainer never loses the user's files: every input is checked before the output directory is
touched, --overwrite removes only what the earlier run wrote, a resume never trains over checkpoints
it could not load nor adopts another run's, and a non-finite loss is never saved.

Each case checks the exit status, one stderr line naming the file or flag, no traceback, and a byte
snapshot of every file that was there before.
"""

from __future__ import annotations

import json
import shutil

import pytest

from axs_lib.cli import main
from axs_lib.ingest import write_synthetic_tiles

BASE = ["--seed", "5", "--steps", "4", "--checkpoint-every", "2", "--batch-size", "2", "--width", "4",
        "--val-every", "2", "--warmup-steps", "1", "--quiet", "--no-plots", "--no-tensorboard"]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    out = tmp_path_factory.mktemp("guard_tiles")
    write_synthetic_tiles(out, count=6, size=16, seed=1)
    return out


@pytest.fixture(scope="module")
def finished_run(tiles, tmp_path_factory):
    """A completed 4-step run, copied fresh into each test that changes it."""
    out = tmp_path_factory.mktemp("guard_run") / "run"
    assert main(["train", "stage1", "--data-dir", str(tiles), "--output-dir", str(out), *BASE]) == 0
    return out


def _copy(run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _snapshot(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _train(capsys, *argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["train", "stage1", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("axs: error")]
    assert "Traceback" not in err
    return code, lines


def _one_error(lines: list[str], *words: str) -> None:
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]


def test_overwrite_with_a_mistyped_data_dir_keeps_the_earlier_run(finished_run, tiles, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    before = _snapshot(run)
    code, lines = _train(capsys, "--data-dir", str(tiles) + "_typo", "--output-dir", str(run), *BASE, "--overwrite")
    assert code == 2
    _one_error(lines, "_typo")
    assert _snapshot(run) == before


def test_overwrite_with_a_too_large_batch_keeps_the_earlier_run(finished_run, tiles, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    before = _snapshot(run)
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(run), *BASE, "--batch-size", "64", "--overwrite")
    assert code == 2
    _one_error(lines, "--batch-size")
    assert _snapshot(run) == before


def test_overwrite_replaces_the_run_and_keeps_the_users_own_files(finished_run, tiles, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    (run / "checkpoints" / "my_notes.txt").write_text("mine")
    (run / "analysis.ipynb").write_text("mine too")
    code, _ = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(run), *BASE, "--steps", "2", "--overwrite")
    assert code == 0
    assert (run / "checkpoints" / "my_notes.txt").read_text() == "mine"
    assert (run / "analysis.ipynb").read_text() == "mine too"
    assert not (run / "checkpoints" / "checkpoint_step_4.pt").exists()  # the earlier run's, removed
    assert json.loads((run / "run.json").read_text())["final_step"] == 2


def test_resume_auto_refuses_to_train_over_checkpoints_it_cannot_load(finished_run, tiles, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    for ckpt in (run / "checkpoints").glob("checkpoint_step_*.pt"):
        ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated, as by a failing disk
    before = _snapshot(run)
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(run), *BASE, "--resume", "auto")
    assert code == 2
    _one_error(lines, "refusing to start again from step 0")
    assert _snapshot(run) == before


def test_resume_sets_an_unloadable_newer_checkpoint_aside_instead_of_writing_over_it(finished_run, tiles, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    damaged = (run / "checkpoints" / "checkpoint_step_4.pt").read_bytes()[:100]
    (run / "checkpoints" / "checkpoint_step_4.pt").write_bytes(damaged)
    code, _ = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(run), *BASE, "--resume", "auto")
    assert code == 0
    assert (run / "checkpoints" / "checkpoint_step_4.pt.unloadable").read_bytes() == damaged
    assert (run / "checkpoints" / "checkpoint_step_4.pt").read_bytes() == (finished_run / "checkpoints" / "checkpoint_step_4.pt").read_bytes()


def test_resume_from_another_runs_checkpoint_is_refused(finished_run, tiles, tmp_path, capsys):
    mine = _copy(finished_run, tmp_path)
    other = tmp_path / "other"
    assert main(["train", "stage1", "--data-dir", str(tiles), "--output-dir", str(other), *BASE, "--seed", "6", "--steps", "2"]) == 0
    before = _snapshot(mine)
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(mine), *BASE,
                         "--resume", str(other / "checkpoints" / "checkpoint_step_2.pt"))
    assert code == 2
    _one_error(lines, "another run")
    assert _snapshot(mine) == before


def test_adopt_checkpoint_forks_another_run_into_a_new_directory(finished_run, tiles, tmp_path, capsys):
    fork = tmp_path / "fork"
    code, _ = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(fork), *BASE,
                     "--resume", str(finished_run / "checkpoints" / "checkpoint_step_2.pt"), "--adopt-checkpoint")
    assert code == 0
    assert json.loads((fork / "run.json").read_text())["resumed_from"]["step"] == 2
    final = "checkpoints/checkpoint_step_4.pt"
    assert (fork / final).read_bytes() == (finished_run / final).read_bytes()


def test_resume_into_a_directory_that_is_not_a_run_keeps_the_users_files(tiles, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "run.json").write_text('{"experiment": "my own notes"}\n')
    (folder / "metrics.jsonl").write_text('{"my": 1}\n')
    before = _snapshot(folder)
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(folder), *BASE, "--resume", "auto")
    assert code == 2
    _one_error(lines, "not a training run directory")
    assert _snapshot(folder) == before


def test_a_lock_symlink_is_refused_and_its_target_untouched(tiles, tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").symlink_to(target)
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(folder), *BASE)
    assert code == 2
    _one_error(lines, ".lock")
    assert target.read_text() == "keep"


def test_checkpoints_that_is_a_file_is_one_error(finished_run, tiles, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")
    before = _snapshot(run)
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(run), *BASE, "--resume", "auto")
    assert code == 2
    _one_error(lines, "checkpoints")
    assert _snapshot(run) == before


def test_force_resume_with_a_checkpoint_of_another_width_is_one_error(finished_run, tiles, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    before = _snapshot(run)
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(run), *BASE, "--width", "8",
                         "--resume", "auto", "--force-resume")
    assert code == 2
    _one_error(lines, "width 8")
    assert _snapshot(run) == before


def test_a_non_finite_loss_stops_the_run_and_saves_nothing_of_it(tiles, tmp_path, capsys):
    out = tmp_path / "run"
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(out), *BASE, "--lr", "1e30",
                         "--grad-clip", "0", "--steps", "40", "--checkpoint-every", "40", "--val-every", "40")
    assert code == 1
    _one_error(lines, "not finite")
    assert not list((out / "checkpoints").glob("*.pt"))  # nothing of the bad steps was saved
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_a_learning_rate_that_overflows_the_optimizer_is_one_error(tiles, tmp_path, capsys):
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(tmp_path / "run"), *BASE, "--lr", "1e38")
    assert code == 2
    _one_error(lines, "--lr")


def test_on_nonfinite_skip_drops_the_bad_updates_and_finishes(tiles, tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(out), *BASE, "--lr", "1e30",
                     "--grad-clip", "0", "--steps", "40", "--checkpoint-every", "40", "--val-every", "40", "--on-nonfinite", "skip")
    info = json.loads((out / "run.json").read_text())
    assert code == 0 and info["final_step"] == 40 and info["skipped_steps"] > 0
    assert (out / "checkpoints" / "checkpoint_step_40.pt").exists()


def test_resume_from_another_working_directory_finds_the_runs_tiles(tiles, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tiles, work / "tiles")
    monkeypatch.chdir(work)
    assert main(["train", "stage1", "--data-dir", "tiles", "--output-dir", "run", *BASE]) == 0
    (work / "run" / "checkpoints" / "checkpoint_step_4.pt").unlink()  # as if killed after step 2's checkpoint
    (work / "run" / "checkpoints" / "latest").write_text("checkpoint_step_2.pt\n")
    monkeypatch.chdir(tmp_path)  # elsewhere: "tiles" no longer resolves, and --data-dir is not repeated
    code, _ = _train(capsys, "--output-dir", str(work / "run"), *BASE, "--resume", "auto")
    assert code == 0
    assert json.loads((work / "run" / "run.json").read_text())["final_step"] == 4
    assert (work / "run" / "checkpoints" / "checkpoint_step_4.pt").exists()


def test_overwrite_over_a_step_checkpoint_the_earlier_run_did_not_write_is_refused_before_training(demo_tiles, tmp_path, capsys):
    from axs_lib.cli import main

    out = tmp_path / "run"
    argv = ["train", "stage1", "--data-dir", str(demo_tiles), "--output-dir", str(out), "--seed", "1", "--steps", "2",
            "--width", "4", "--checkpoint-every", "2", "--no-plots", "--quiet"]
    assert main(argv) == 0
    stranger = out / "checkpoints" / "checkpoint_step_1.pt"
    stranger.write_bytes(b"the user's own file")
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints the earlier run did not write (checkpoint_step_1.pt)" in err
    assert stranger.read_bytes() == b"the user's own file"
    assert (out / "checkpoints" / "checkpoint_step_2.pt").exists()  # nothing of the earlier run removed either


def test_keep_last_deletes_the_runs_own_old_checkpoints_and_never_a_file_copied_in(tiles, tmp_path, capsys):
    """--keep-last prunes what the run wrote (its manifest); a step file the user copied into
    checkpoints/ is theirs, whatever its name."""
    run, argv = tmp_path / "run", ["--data-dir", str(tiles), "--output-dir", str(tmp_path / "run"), *BASE, "--steps", "8"]
    assert _train(capsys, *argv) == (0, [])
    folder = run / "checkpoints"
    for name in ("checkpoint_step_6.pt", "checkpoint_step_8.pt", "latest"):  # as if killed after step 4's checkpoint
        (folder / name).unlink()
    (folder / "checkpoint_step_1.pt").write_bytes((folder / "checkpoint_step_2.pt").read_bytes())  # the user's copy
    assert _train(capsys, *argv, "--keep-last", "1", "--resume", "auto") == (0, [])
    steps = sorted(p.name for p in folder.glob("checkpoint_step_*.pt"))
    assert steps == ["checkpoint_step_1.pt", "checkpoint_step_8.pt"]  # 2, 4 and 6 were the run's: pruned


def test_an_optimizer_state_of_other_shapes_is_one_line_before_anything_is_written(finished_run, tiles, tmp_path, capsys):
    """A checkpoint with a valid checksum whose AdamW moment has another shape (crafted, or another
    model's) used to fail inside the first step, as a traceback, after the run directory was opened."""
    import torch

    from axs_lib.checkpoint import CHECKSUM_KEYS, FORMAT_KEY, load_checkpoint, save_checkpoint

    run = _copy(finished_run, tmp_path)
    path = run / "checkpoints" / "checkpoint_step_4.pt"
    ckpt = {k: v for k, v in load_checkpoint(path).items() if k not in (*CHECKSUM_KEYS, FORMAT_KEY)}
    state = ckpt["optimizer_state_dict"]["state"]
    state[next(iter(state))]["exp_avg"] = torch.zeros(3)
    save_checkpoint(ckpt, path)
    before = _snapshot(run)
    code, lines = _train(capsys, "--data-dir", str(tiles), "--output-dir", str(run), *BASE, "--resume", str(path))
    assert code == 2
    _one_error(lines, str(path), "exp_avg has shape (3,) for a parameter of shape")
    assert _snapshot(run) == before
