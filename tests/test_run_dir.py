"""The run directory and the checkpoint manager: layout, manifest, --overwrite, resume fallback, retention."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from axs_lib import run_dir
from axs_lib.checkpoint import load_checkpoint
from axs_lib.errors import CheckpointError, InputError, UsageError
from axs_lib.run_dir import CheckpointManager, RunDir, check_resume
from axs_lib.state import TrainingState


def _ckpt(step: int, value: float = 1.0) -> dict:
    return {"step": step, "weights": torch.full((3,), value), "seed_info": {"seed": 7}, "world_size": 1,
            "config": {"lr": 0.1}, "data_fingerprint": {"sha256": "a" * 64, "num_tiles": 4}, "format_version": 2}


def _snapshot(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- checkpoint manager


def test_save_writes_the_step_file_and_moves_latest(tmp_path):
    with CheckpointManager(tmp_path) as manager:
        manager.save(_ckpt(5), 5)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "checkpoint_step_5.pt"
    assert load_checkpoint(tmp_path / "checkpoints" / "checkpoint_step_5.pt")["step"] == 5


def test_best_is_a_second_name_of_the_same_file(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(_ckpt(4), 4, best=True)
    best, step = tmp_path / "checkpoints" / "best.pt", tmp_path / "checkpoints" / "checkpoint_step_4.pt"
    assert os.path.samefile(best, step)


def test_keep_last_deletes_older_step_files_but_never_what_latest_names(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        manager.save(_ckpt(step), step, best=step == 1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "checkpoint_step_3.pt", "checkpoint_step_4.pt", "latest"]
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 1  # the link outlives its step file


def test_resume_auto_takes_latest_and_falls_back_past_a_corrupt_file(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(_ckpt(2), 2)
    manager.save(_ckpt(4), 4)
    (tmp_path / "checkpoints" / "checkpoint_step_4.pt").write_bytes(b"garbage")
    lines = []
    path, ckpt = manager.resume("auto", log=lines.append)
    assert path.name == "checkpoint_step_2.pt" and ckpt["step"] == 2
    assert any("checkpoint_step_4.pt" in line for line in lines)
    assert manager.set_aside_unloadable() == ["checkpoint_step_4.pt -> checkpoint_step_4.pt.unloadable"]
    assert (tmp_path / "checkpoints" / "checkpoint_step_4.pt.unloadable").read_bytes() == b"garbage"


def test_resume_auto_refuses_when_checkpoints_exist_but_none_loads(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint_step_3.pt").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="refusing to start again from step 0"):
        CheckpointManager(tmp_path).resume("auto", log=lambda line: None)
    assert (tmp_path / "checkpoints" / "checkpoint_step_3.pt").read_bytes() == b"\0" * 10


def test_resume_auto_with_no_checkpoint_is_a_fresh_start(tmp_path):
    assert CheckpointManager(tmp_path).resume("auto") is None


def test_resume_from_another_runs_checkpoint_needs_adopt(tmp_path):
    other = CheckpointManager(tmp_path / "other")
    other.save(_ckpt(3), 3)
    source = tmp_path / "other" / "checkpoints" / "checkpoint_step_3.pt"
    with pytest.raises(UsageError, match="another run"):
        CheckpointManager(tmp_path / "mine").resume(source)
    assert CheckpointManager(tmp_path / "mine").resume(source, adopt=True)[1]["step"] == 3


def test_check_resume_names_each_difference():
    ckpt = _ckpt(1)
    assert check_resume(ckpt, seed=7, config={"lr": 0.1}, data_fingerprint={"sha256": "a" * 64, "num_tiles": 4}) == []
    problems = check_resume(ckpt, seed=8, config={"lr": 0.2}, data_fingerprint={"sha256": "b" * 64, "num_tiles": 5}, world_size=2)
    assert [p.split(":")[0] for p in problems] == ["seed", "lr", "tile set", "world size"]


def test_async_mode_writes_the_same_bytes_as_sync(tmp_path):
    for mode in ("sync", "async"):
        with CheckpointManager(tmp_path / mode, checkpoint_mode=mode) as manager:
            manager.save(_ckpt(2, 3.0), 2, best=True)
    assert _snapshot(tmp_path / "sync") == _snapshot(tmp_path / "async")


# --------------------------------------------------------------------------- the whole directory


def _fake_run(root, written: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in written:
        if not name.endswith("/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("old")
    (root / "run.json").write_text(json.dumps({run_dir.RUN_MARKER: 1, "status": "completed", "written": written + ["run.json"]}))


def test_overwrite_removes_only_what_the_manifest_lists(tmp_path):
    root = tmp_path / "run"
    _fake_run(root, ["metrics.jsonl", "checkpoints/checkpoint_step_2.pt", "checkpoints/latest"])
    (root / "checkpoints" / "my_notes.txt").write_text("mine")
    (root / "README").write_text("mine too")
    run = RunDir(root)
    run.check(resume=False, overwrite=True)
    with run.open():
        removed = run.clear_previous()
    assert sorted(removed) == ["checkpoints/checkpoint_step_2.pt", "checkpoints/latest", "metrics.jsonl", "run.json"]
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [".lock", "README", "checkpoints/my_notes.txt"]


def test_check_writes_nothing(tmp_path):
    root = tmp_path / "run"
    _fake_run(root, ["metrics.jsonl"])
    before = _snapshot(root)
    RunDir(root).check(resume=False, overwrite=True)
    RunDir(tmp_path / "new").check(resume=False, overwrite=False)
    assert _snapshot(root) == before and not (tmp_path / "new").exists()


def test_a_directory_that_is_not_a_run_is_neither_overwritten_nor_resumed_into(tmp_path):
    (tmp_path / "run.json").write_text('{"my": "own file"}')
    (tmp_path / "metrics.jsonl").write_text("mine\n")
    for resume, overwrite in ((False, True), (True, False)):
        with pytest.raises(UsageError, match="not a training run directory"):
            RunDir(tmp_path).check(resume=resume, overwrite=overwrite)


def test_a_used_directory_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        RunDir(tmp_path).check(resume=False, overwrite=False)


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    root = tmp_path / "run"
    root.mkdir()
    (root / ".lock").symlink_to(target)
    with pytest.raises(InputError, match="lock"):
        RunDir(root).check(resume=True, overwrite=False)
    with pytest.raises(InputError, match="symbolic link"):
        RunDir(root).open()
    assert target.read_text() == "keep me"


def test_a_second_live_run_is_refused_by_the_lock_and_a_killed_one_is_not(tmp_path):
    # POSIX record locks belong to a process: the holder must be another process
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from axs_lib import run_dir; "
         "held = run_dir.locked(sys.argv[1]); held.__enter__(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_dir.lock_is_held(tmp_path)
        with pytest.raises(UsageError, match=f"another run \\(pid {holder.pid}\\)"):
            RunDir(tmp_path).open()
    finally:
        holder.kill()
        holder.wait()
    assert not run_dir.lock_is_held(tmp_path)
    RunDir(tmp_path).open().close()


def test_a_run_json_that_is_not_json_is_one_error(tmp_path):
    (tmp_path / "run.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(InputError, match="run.json"):
        RunDir(tmp_path).check(resume=True, overwrite=False)


def test_metrics_log_skips_foreign_lines_and_cuts_back_to_a_step(tmp_path):
    log = run_dir.MetricsLog(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n{"step": "x"}\nnot json\n{"step": 3}\n')
    assert log.read() == [{"step": 1}, {"step": "x"}, {"step": 3}]
    log.truncate_after(2)
    assert log.read() == [{"step": 1}]


def test_a_metrics_log_that_is_a_fifo_or_a_link_is_refused_by_kind_without_blocking(tmp_path):
    path = tmp_path / "metrics.jsonl"
    os.mkfifo(path)  # nobody writes to it: an ordinary open would wait forever
    with pytest.raises(InputError, match=r"metrics.jsonl: is a FIFO \(named pipe\), not a metrics log"):
        run_dir.MetricsLog(path).read()
    path.unlink()
    path.symlink_to("/dev/zero")  # a read through it would never end
    with pytest.raises(InputError, match="metrics.jsonl: is a symbolic link"):
        run_dir.MetricsLog(path).read()
    path.unlink()
    assert run_dir.MetricsLog(path).read() == []  # absent: nothing logged yet


def test_config_differences_names_the_fields_that_are_not_the_same_bits_in_every_run():
    nan = float("nan")
    a = {"lr": 0.1, "steps": 2, "dropout": nan, "output_dir": "runs/a", "data_dir": "tiles", "seed": 1}
    b = {"lr": 0.1, "steps": 3, "dropout": nan, "output_dir": "runs/b", "data_dir": "other", "seed": 2, "width": 8}
    assert run_dir.config_differences(a, b) == ["steps", "seed", "width"]  # where a run lives is no difference
    assert run_dir.config_differences(a, b, ignore=(*run_dir.LOCATION_FIELDS, "seed")) == ["steps", "width"]
    assert run_dir.config_differences(dict(a, lr=0.0), dict(a, lr=-0.0)) == ["lr"]
    assert run_dir.config_differences(a, dict(a), dict(a, steps=9)) == ["steps"]
    assert run_dir.config_differences(a) == []


# --------------------------------------------------------------------------- training state


def test_training_state_round_trips_every_component(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = TrainingState(model=model, optimizer=optimizer, seed=7, step=5, extras={"best": 0.5})
    saved = state.state_dict()
    assert {"model_state_dict", "optimizer_state_dict", "step", "epoch", "best", "seed_info", "rng_state"} <= set(saved)

    other_model = torch.nn.Linear(3, 2)
    other = TrainingState(model=other_model, optimizer=torch.optim.AdamW(other_model.parameters(), lr=0.1), seed=7,
                          extras={"best": None})
    other.load_state_dict(saved)
    assert other.step == 5 and other.extras["best"] == 0.5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other_model.state_dict().values()))


def test_training_state_refuses_a_checkpoint_missing_a_key_before_touching_anything():
    model = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match="optimizer_state_dict"):
        state.load_state_dict({"step": 1, "model_state_dict": {k: torch.zeros_like(v) for k, v in before.items()}})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_state_refuses_objects_without_state_dict():
    with pytest.raises(TypeError, match="state_dict"):
        TrainingState(model=object())


def _run_with_every_part(root):
    """A run directory holding every part a run writes (a manager's checkpoints, a manifest)."""
    manager = CheckpointManager(root)
    manager.save(_ckpt(2), 2, best=True)
    run_dir.write_json(root / run_dir.RUN_JSON, {run_dir.RUN_MARKER: 1, "status": "completed", "written": []})
    for name in (run_dir.CONFIG_FILE, run_dir.ENVIRONMENT_JSON, run_dir.SPLIT_JSON, run_dir.METRICS):
        (root / name).write_text("{}\n")
    for name in (run_dir.PLOTS, run_dir.SAMPLES, run_dir.TENSORBOARD):
        (root / name).mkdir()


RUN_PARTS = ["run.json", "config.yaml", "environment.json", "split.json", "metrics.jsonl", "checkpoints", "plots", "samples",
             "tensorboard", "checkpoints/latest", "checkpoints/best.pt", "checkpoints/checkpoint_step_2.pt"]


@pytest.mark.parametrize("part", RUN_PARTS)
@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_a_run_part_that_is_a_symlink_is_refused_before_anything_is_read_or_changed(tmp_path, part, mode):
    root, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    _run_with_every_part(root)
    target = elsewhere / part.replace("/", "_")
    os.replace(root / part, target)
    (root / part).symlink_to(target)
    before = _snapshot(tmp_path)
    with pytest.raises(InputError) as caught:
        RunDir(root).check(resume=mode == "resume", overwrite=mode == "overwrite")
    assert caught.value.path == str(root / part) and "is a symbolic link" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert _snapshot(tmp_path) == before


def test_the_run_directory_itself_may_be_a_symlink(tmp_path):
    real = tmp_path / "scratch" / "run"
    real.mkdir(parents=True)
    _run_with_every_part(real)
    (tmp_path / "run").symlink_to(real)
    RunDir(tmp_path / "run").check(resume=True, overwrite=False)  # runs -> /scratch/runs is an ordinary setup


def test_the_checkpoint_manager_alone_refuses_a_linked_checkpoints_folder(tmp_path):
    other = tmp_path / "other"
    CheckpointManager(other, keep_last=1).save(_ckpt(2), 2)
    before = _snapshot(other)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "checkpoints").symlink_to(other / "checkpoints")
    manager = CheckpointManager(mine, keep_last=1)
    with pytest.raises(InputError, match="checkpoints: is a symbolic link"):
        manager.resume("auto")
    with pytest.raises(InputError, match="checkpoints: is a symbolic link"):
        manager.save(_ckpt(4), 4)
    assert _snapshot(other) == before


def test_a_run_json_that_is_a_link_a_fifo_or_a_device_is_one_error_without_blocking(tmp_path):
    (tmp_path / "real.json").write_text('{"status": "completed"}')
    (tmp_path / "run.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(InputError, match="run.json: is a symbolic link"):
        run_dir.read_run_json(tmp_path)
    (tmp_path / "run.json").unlink()
    os.mkfifo(tmp_path / "run.json")  # nobody writes to it: an ordinary read would wait forever
    with pytest.raises(InputError, match=r"run.json: is a FIFO \(named pipe\)"):
        run_dir.read_run_json(tmp_path)


@pytest.mark.parametrize(("key", "value", "words"), [
    ("step", "12", "step is '12' (str), not an integer"),
    ("step", -1, "step is -1: not a count"),
    ("world_size", 0, "world_size is 0: not a count from 1"),
    ("config", [1, 2], "config is [1, 2] (list), not a dict"),
    ("config", {"lr": torch.ones(2)}, "config['lr'] is tensor"),
    ("seed_info", {"seed": [42]}, "seed_info['seed'] is [42]"),
    ("sampler_state", {"epoch": 0, "position": 10**30}, "sampler_state position is 1000"),
    ("sampler_state", {"epoch": 1.0, "position": 0}, "sampler_state epoch is 1.0"),
])
def test_a_well_known_key_of_the_wrong_type_or_range_is_one_checkpoint_error(key, value, words):
    with pytest.raises(CheckpointError, match="^x.pt: " + words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        run_dir.check_known_keys({key: value}, "x.pt")


def test_check_resume_reports_crafted_values_as_differences_instead_of_crashing():
    ckpt = {"format_version": [2], "seed_info": "42", "config": ["lr"], "data_fingerprint": 7, "world_size": "x" * 10**4}
    problems = check_resume(ckpt, seed=42, config={"lr": 0.1}, data_fingerprint={"scheme": "s", "sha256": "a"}, world_size=1)
    assert any(p.startswith("checkpoint format: checkpoint [2]") for p in problems)
    assert any(p.startswith("seed: checkpoint None") for p in problems)
    assert all(len(p) < 400 for p in problems)  # a 10 kB value is cut, not pasted into the message


def test_check_resume_accepts_every_format_the_checkpoint_module_reads_and_names_them_otherwise():
    from axs_lib.checkpoint import FORMAT_KEY, FORMAT_VERSION, READABLE_FORMATS

    assert {1, FORMAT_VERSION} <= READABLE_FORMATS  # format 1 differs only in its checksum
    for version in READABLE_FORMATS:
        assert check_resume({FORMAT_KEY: version}) == []
    unknown = max(READABLE_FORMATS) + 1
    assert check_resume({FORMAT_KEY: unknown}) == [
        f"checkpoint format: checkpoint {unknown}, this version reads {sorted(READABLE_FORMATS)}"]


def test_the_checkpoint_manager_alone_does_not_resume_a_linked_step_file(tmp_path):
    other = tmp_path / "other"
    CheckpointManager(other).save(_ckpt(8), 8)
    mine = tmp_path / "mine"
    CheckpointManager(mine).save(_ckpt(2), 2)
    (mine / "checkpoints" / "checkpoint_step_8.pt").symlink_to(other / "checkpoints" / "checkpoint_step_8.pt")
    with pytest.raises(InputError, match="checkpoint_step_8.pt: is a symbolic link"):
        CheckpointManager(mine).resume("auto")
