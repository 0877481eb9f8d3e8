"""The metric loggers: CSV always, TensorBoard, MLflow and W&B (offline, local: no network).

Each logger is read back through its own files or API, a resume is seen to drop (CSV) or not resend
(MLflow, W&B) what a killed run logged after its last checkpoint, a logger asked for but not
installed is refused before anything is written, and a trainer run with every logger on (or with
one failing half-way) writes the reference run's checkpoints byte for byte.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import re
import logging
import signal
from pathlib import Path

import numpy as np
import pytest

import killtest
from axs_lib import loggers, run_dir
from axs_lib.cli import main
from axs_lib.errors import InputError
from axs_lib.run_dir import RunDir
from axs_lib.stage1.config import RESULT_FIELD_NAMES, TrainConfig
from conftest import REFERENCE_STEPS, train_in_process


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline with its own folders under tmp_path; MLflow on the run's own store."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                        "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(name, str(value))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # unset for MLflow; the logger sets it, monkeypatch restores it


def records(steps, val_at=()):
    out = []
    for step in steps:
        out.append({"step": step, "split": "train", "loss": 1.0 / step, "lr": 0.001 * step})
        if step in val_at:
            out.append({"step": step, "split": "val", "val_loss": 2.0 / step, "psnr": 20.0 + step})
    return out


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert all(len(row) == len(rows[0]) for row in rows), rows  # every row has the header's width
    return rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]


# --------------------------------------------------------------------------- CSV


def test_csv_columns_grow_when_a_validation_record_brings_new_names(tmp_path):
    log = loggers.CSVLogger(tmp_path / "metrics.csv")
    for record in records(range(1, 5), val_at=(2, 4)):
        log.add(record)
    header, rows = read_csv(tmp_path / "metrics.csv")
    assert header == ["step", "split", "loss", "lr", "val_loss", "psnr"]
    assert [(r["step"], r["split"]) for r in rows] == [("1", "train"), ("2", "train"), ("2", "val"), ("3", "train"),
                                                     ("4", "train"), ("4", "val")]
    assert rows[0]["val_loss"] == "" and rows[2]["loss"] == ""
    assert float(rows[2]["val_loss"]) == 1.0 and float(rows[5]["psnr"]) == 24.0
    assert float(rows[3]["loss"]) == 1.0 / 3  # repr: every float round-trips exactly


def test_csv_resume_drops_rows_past_the_resumed_step_as_metrics_jsonl_does(tmp_path):
    path, jsonl = tmp_path / "metrics.csv", run_dir.MetricsLog(tmp_path / "metrics.jsonl")
    log = loggers.CSVLogger(path)
    for record in records(range(1, 8), val_at=(4,)):
        log.add(record)
        jsonl.append(record)
    with open(path, "a") as f:
        f.write("8,train,0.12")  # a row a kill cut short: no newline, its last number maybe cut too
    loggers.CSVLogger(path, start_step=4)
    jsonl.truncate_after(4)
    header, rows = read_csv(path)
    assert header == ["step", "split", "loss", "lr", "val_loss", "psnr"]  # the columns stay
    assert [(int(r["step"]), r["split"]) for r in rows] == [(r["step"], r["split"]) for r in jsonl.read()]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 4]


def test_a_resumed_csv_appends_under_its_own_header(tmp_path):
    path = tmp_path / "metrics.csv"
    log = loggers.CSVLogger(path)
    for record in records(range(1, 5), val_at=(4,)):
        log.add(record)
    resumed = loggers.CSVLogger(path, start_step=2)
    for record in records(range(3, 7), val_at=(4, 6)):
        resumed.add(record)
    header, rows = read_csv(path)
    assert header == ["step", "split", "loss", "lr", "val_loss", "psnr"]
    assert [(int(r["step"]), r["split"]) for r in rows] == [(1, "train"), (2, "train"), (3, "train"), (4, "train"),
                                                          (4, "val"), (5, "train"), (6, "train"), (6, "val")]


# --------------------------------------------------------------------------- MLflow and W&B, offline


def mlflow_run(root: Path):
    from mlflow.tracking import MlflowClient

    ids = json.loads((root / run_dir.LOGGERS_JSON).read_text())["mlflow"]
    assert ids["tracking_uri"] == (root / run_dir.MLRUNS).resolve().as_uri()
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    return client, client.get_run(ids["run_id"])


def mlflow_points(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_mlflow_gets_params_and_metrics_in_the_run_directory_and_a_resume_continues_its_run(tmp_path, offline):
    pytest.importorskip("mlflow")
    root = tmp_path / "run"
    root.mkdir()
    fanout = loggers.open_loggers(root, 0, ["mlflow"], params={"seed": 42, "lr": 0.001, "threads": None})
    assert fanout.names == ["csv", "mlflow"]
    for record in records(range(1, 7), val_at=(4, 6)):
        fanout.add(record)
    fanout.add_image("samples", np.zeros((8, 6, 3), np.uint8), 4)
    fanout.close()
    client, run = mlflow_run(root)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params == {"seed": "42", "lr": "0.001", "threads": ""}
    assert mlflow_points(client, run, "train/loss") == [(s, 1.0 / s) for s in range(1, 7)]
    assert mlflow_points(client, run, "val/psnr") == [(4, 24.0), (6, 26.0)]
    assert any("samples" in a.path for a in client.list_artifacts(run.info.run_id, "images"))

    fanout = loggers.open_loggers(root, 6, ["mlflow"], params={"seed": 42, "lr": 0.001, "threads": None})
    fanout.close("interrupted")  # stopped by a signal: MLflow's KILLED, and a resume reopens it
    assert mlflow_run(root)[1].info.status == "KILLED"

    # killed after step 6, resumed from the checkpoint of step 4: the same MLflow run, no step twice
    resumed = loggers.open_loggers(root, 4, ["mlflow"], params={"seed": 42, "lr": 0.001, "threads": None, "new": 1})
    for record in records(range(5, 9), val_at=(6, 8)):
        resumed.add(record)
    resumed.close()
    again, run2 = mlflow_run(root)
    assert run2.info.run_id == run.info.run_id and run2.data.params["new"] == "1" and run2.info.status == "FINISHED"
    assert mlflow_points(again, run2, "train/loss") == [(s, 1.0 / s) for s in range(1, 9)]
    assert mlflow_points(again, run2, "val/psnr") == [(4, 24.0), (6, 26.0), (8, 28.0)]


def _started(folder: Path) -> tuple[str, int]:
    """When an offline run folder was started: ``offline-run-<date>_<time>-<id>``, and wandb adds
    ``-1``, ``-2``, ... to a second start of the same run within the same second."""
    match = re.fullmatch(r"offline-run-(\d{8}_\d{6})-[a-z0-9]+(?:-(\d+))?", folder.name)
    assert match, folder.name
    return match.group(1), int(match.group(2) or 0)


def wandb_history(root: Path) -> list[dict]:
    """The history rows of every W&B offline run file under ``<root>/wandb``, read with wandb's own protobuf."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    wandb.teardown()  # the wandb service writes its log in the background: wait until it has written all
    rows = []
    for path in sorted((root / run_dir.WANDB).glob("offline-run-*/run-*.wandb"), key=lambda p: _started(p.parent)):
        for data in _log_records(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def _log_records(raw: bytes, block: int = 32768) -> list[bytes]:
    """wandb's transaction log: a 7-byte ``:W&B`` header, then LevelDB-log chunks (checksum 4 bytes,
    length 2, type 1: full, first, middle, last) that never cross a 32 KiB block."""
    assert raw[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block  # the block's tail is padding
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(data)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + data
        elif kind == 4:
            out.append(pending + data)
    return out


def test_wandb_offline_gets_the_metrics_in_the_run_directory_and_a_resume_continues_its_run(tmp_path, offline):
    pytest.importorskip("wandb")
    root = tmp_path / "run"
    root.mkdir()
    fanout = loggers.open_loggers(root, 0, ["wandb"], params={"seed": 42})
    for record in records(range(1, 7), val_at=(4, 6)):
        fanout.add(record)
    fanout.close()
    run_id = json.loads((root / run_dir.LOGGERS_JSON).read_text())["wandb"]["id"]
    assert [p.name.endswith(f"-{run_id}") for p in (root / "wandb").glob("offline-run-*")] == [True]
    first = wandb_history(root)
    assert [(row["_step"], row["train/loss"]) for row in first] == [(s, 1.0 / s) for s in range(1, 7)]
    assert [(row["_step"], row["val/psnr"]) for row in first if "val/psnr" in row] == [(4, 24.0), (6, 26.0)]

    resumed = loggers.open_loggers(root, 4, ["wandb"], params={"seed": 42})
    for record in records(range(5, 9), val_at=(6, 8)):
        resumed.add(record)
    resumed.close()
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", p.name) for p in runs)  # the same W&B run, started twice
    steps = [row["_step"] for row in wandb_history(root)]
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and sorted(steps[6:]) == steps[6:] and steps[-1] == 8


# --------------------------------------------------------------------------- refusals and failures


def without(monkeypatch, *modules: str) -> None:
    """Make ``modules`` look not installed to `importlib.util.find_spec`."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


@pytest.mark.parametrize(("flag", "module"), [("--mlflow", "mlflow"), ("--wandb", "wandb")])
def test_a_logger_asked_for_but_not_installed_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys,
                                                                                   flag, module):
    without(monkeypatch, module)
    out = tmp_path / "run"
    code = main(["train", "stage1", "--data-dir", str(tmp_path / "tiles"), "--output-dir", str(out), "--seed", "1",
                 "--steps", "2", flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"{flag}: {module} is not installed" in err[0] and f"pip install 'axs-lib[{module}]'" in err[0]
    assert not out.exists()


def test_a_config_file_that_turns_a_missing_logger_on_is_refused_the_same_way(tmp_path, monkeypatch, capsys):
    without(monkeypatch, "wandb")
    (tmp_path / "exp.yaml").write_text("wandb: true\n")
    out = tmp_path / "run"
    code = main(["train", "stage1", "--config", str(tmp_path / "exp.yaml"), "--output-dir", str(out), "--seed", "1"])
    assert code == 2 and "--wandb: wandb is not installed" in capsys.readouterr().err and not out.exists()
    assert main(["train", "stage1", "--config", str(tmp_path / "exp.yaml"), "--no-wandb", "--print-config"]) == 0
    assert "wandb: false" in capsys.readouterr().out.splitlines()


def test_tensorboard_missing_is_a_warning_and_the_other_loggers_open(tmp_path, monkeypatch, caplog):
    without(monkeypatch, "tensorboard")
    with caplog.at_level(logging.WARNING, logger="axs_lib.loggers"):
        fanout = loggers.open_loggers(tmp_path, 0, ["tensorboard"])
    assert fanout.names == ["csv"] and [r.getMessage() for r in caplog.records] == [loggers.TENSORBOARD_MISSING]
    assert loggers.run_files(["tensorboard"]) == [run_dir.METRICS_CSV]  # nothing of TensorBoard's in the manifest


class Broken:
    def __init__(self, at_step: int):
        self.at_step, self.closed = at_step, None

    def add(self, record):
        if record["step"] >= self.at_step:
            raise ConnectionError("tracking server went away")

    def add_image(self, tag, image, step):
        pass

    def close(self, status="finished"):
        self.closed = status


def test_a_logger_that_fails_is_said_once_and_dropped_while_the_others_go_on(tmp_path, caplog):
    broken = Broken(at_step=3)
    fanout = loggers.Loggers({"csv": loggers.CSVLogger(tmp_path / "metrics.csv"), "mlflow": broken})
    with caplog.at_level(logging.WARNING, logger="axs_lib.loggers"):
        for record in records(range(1, 6)):
            fanout.add(record)
        fanout.close()
    (message,) = [r.getMessage() for r in caplog.records]
    assert "MLflow logging failed (add: tracking server went away); MLflow is off" in message
    assert broken.closed == "failed" and fanout.names == []
    assert [int(r["step"]) for r in read_csv(tmp_path / "metrics.csv")[1]] == [1, 2, 3, 4, 5]


def test_loggers_closed_while_an_error_propagates_say_failed():
    logger = Broken(at_step=10**9)
    fanout = loggers.Loggers({"wandb": logger})
    with pytest.raises(KeyError):
        try:
            raise KeyError("boom")
        finally:
            fanout.close()
    assert logger.closed == "failed"


# --------------------------------------------------------------------------- run directory and config


def test_the_loggers_switches_are_run_fields_and_their_files_are_in_the_manifest(monkeypatch):
    assert {"mlflow", "wandb", "tensorboard"}.isdisjoint(RESULT_FIELD_NAMES)
    config = TrainConfig(mlflow=True, wandb=True, tensorboard=False)
    assert loggers.requested(config) == ("mlflow", "wandb")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert loggers.run_files(loggers.requested(config)) == ["metrics.csv", "mlruns/", "wandb/", "loggers.json"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.invalid:5000")  # not ours: not in the manifest
    assert "mlruns/" not in loggers.run_files(["mlflow"])


@pytest.mark.parametrize("part", ["metrics.csv", "loggers.json", "mlruns", "wandb"])
def test_a_logger_part_that_is_a_symlink_is_refused(tmp_path, part):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / part).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="is a symbolic link"):
        run_dir.refuse_symlinked_parts(tmp_path / "run")


def test_overwrite_removes_the_loggers_files_and_keeps_a_users_own(tmp_path, offline):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    root = tmp_path / "run"
    root.mkdir()
    names = ["tensorboard", "mlflow", "wandb"]
    run_dir.write_json(root / run_dir.RUN_JSON, {run_dir.RUN_MARKER: 1, "status": "completed",
                                                 "written": [run_dir.RUN_JSON, *loggers.run_files(names)]})
    for start in (0, 1):  # a start and a resume: within one second, wandb names the second folder <...>-<id>-1
        fanout = loggers.open_loggers(root, start, names, params={"seed": 1})
        for record in records(range(start + 1, 3)):
            fanout.add(record)
        fanout.close()
    for mine in ("wandb/my_notes.txt", "mlruns/README", "tensorboard/my.txt"):
        (root / mine).write_text("mine\n")
    run = RunDir(root)
    run.check(resume=False, overwrite=True)
    with run.open():
        run.clear_previous()
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == [".lock", "mlruns", "mlruns/README", "tensorboard", "tensorboard/my.txt", "wandb", "wandb/my_notes.txt"]
    wandb_names = run_dir.LIBRARY_FOLDERS[run_dir.WANDB]  # the second start in one second, whenever it happens
    assert wandb_names.match("offline-run-20261203_145804-mr5nf0vi-1") and not wandb_names.match("offline-notes")


# --------------------------------------------------------------------------- the trainer


def shas(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "checkpoints").glob("*.pt"))}


def test_every_logger_on_writes_the_reference_checkpoints_and_each_logger_gets_every_step(
        demo_tiles, stage1_reference, tmp_path, offline):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    out = tmp_path / "all"
    train_in_process(killtest.train_argv(demo_tiles, out, REFERENCE_STEPS, "--mlflow", "--wandb", num_workers=0))
    assert shas(out) == shas(stage1_reference)  # the reference: TensorBoard and CSV only
    steps = list(range(1, REFERENCE_STEPS + 1))
    assert [int(r["step"]) for r in read_csv(out / "metrics.csv")[1] if r["split"] == "train"] == steps
    client, run = mlflow_run(out)
    assert [s for s, _ in mlflow_points(client, run, "train/loss")] == steps
    assert run.data.params["seed"] == "42" and run.data.params["width"] == "8"
    assert [row["_step"] for row in wandb_history(out) if "train/loss" in row] == steps
    manifest = json.loads((out / run_dir.RUN_JSON).read_text())["written"]
    assert {"metrics.csv", "loggers.json", "mlruns/", "wandb/", "tensorboard/"} <= set(manifest)


def test_a_logger_failing_mid_run_loses_no_checkpoint(demo_tiles, stage1_reference, tmp_path, monkeypatch, capsys):
    real_add = loggers.CSVLogger.add

    def add(self, record):
        if record["step"] >= 5:
            raise OSError(28, "No space left on device")
        real_add(self, record)

    monkeypatch.setattr(loggers.CSVLogger, "add", add)
    out = tmp_path / "failing"
    train_in_process(killtest.train_argv(demo_tiles, out, REFERENCE_STEPS, "--no-tensorboard", num_workers=0))
    assert shas(out) == shas(stage1_reference)  # every checkpoint, the ones after the failure too
    assert "CSV logging failed (add: [Errno 28] No space left on device); CSV is off" in capsys.readouterr().err
    assert [int(r["step"]) for r in read_csv(out / "metrics.csv")[1]] == [1, 2, 3, 4, 4]
    assert json.loads((out / run_dir.RUN_JSON).read_text())["status"] == "completed"


def test_killed_in_a_checkpoint_write_and_resumed_every_logger_holds_each_step_once(
        demo_tiles, stage1_reference, tmp_path, offline):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    out = tmp_path / "killed"
    argv = killtest.train_argv(demo_tiles, out, REFERENCE_STEPS, "--mlflow", "--wandb", num_workers=0)
    proc = killtest.spawn(argv, killtest.child_env({"AXS_FAULT": "kill:checkpoint_step_6.pt"}), tmp_path / "log")
    assert proc.wait(timeout=120) == -signal.SIGKILL  # steps 5 and 6 logged, their checkpoint not written
    first_ids = json.loads((out / run_dir.LOGGERS_JSON).read_text())
    train_in_process([*argv, "--resume", "auto"])
    assert shas(out) == shas(stage1_reference)
    assert (out / "metrics.csv").read_bytes() == (stage1_reference / "metrics.csv").read_bytes()
    assert json.loads((out / run_dir.LOGGERS_JSON).read_text()) == first_ids  # the same MLflow and W&B runs
    client, run = mlflow_run(out)
    train = [r for r in read_csv(out / "metrics.csv")[1] if r["split"] == "train"]
    assert mlflow_points(client, run, "train/loss") == [(int(r["step"]), float(r["loss"])) for r in train]


def test_run_ids_from_an_edited_loggers_file_never_name_a_path(tmp_path, offline, caplog):
    """Both libraries build file and folder names from the stored ids: ``..`` or an absolute path in
    loggers.json starts new runs (one warning each) and nothing is written outside the run."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    root = tmp_path / "run"
    root.mkdir()
    uri = (root.resolve() / run_dir.MLRUNS).as_uri()
    (root / run_dir.LOGGERS_JSON).write_text(json.dumps({"mlflow": {"tracking_uri": uri, "run_id": "../../escaped"},
                                                         "wandb": {"id": str(tmp_path / "abs")}}))
    before = {p for p in tmp_path.iterdir()}
    with caplog.at_level(logging.WARNING, logger="axs_lib.loggers"):
        fanout = loggers.open_loggers(root, 0, ["mlflow", "wandb"], params={"seed": 1})
        fanout.add({"step": 1, "split": "train", "loss": 1.0})
        fanout.close()
    assert sum("is not a plain id" in r.getMessage() for r in caplog.records) == 2
    ids = json.loads((root / run_dir.LOGGERS_JSON).read_text())
    assert loggers.PLAIN_ID.fullmatch(ids["mlflow"]["run_id"]) and loggers.PLAIN_ID.fullmatch(ids["wandb"]["id"])
    new = {p.name for p in tmp_path.iterdir()} - {p.name for p in before}
    assert not {n for n in new if not n.startswith("wandb-")}  # only wandb's own config and cache (the fixture's)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "abs").exists()
