"""Metric loggers: the views of a run's records in the tools people read training curves with.

A record is a flat dict ``{"step": <int>, "split": "train" | "val", <name>: <number>, ...}``, the
line a trainer appends to ``metrics.jsonl``. That file stays the record of the run; every logger
here is a view of it, and none of them touches anything that decides the trained bits (no random
draw, no tensor, nothing in a checkpoint), so a run with every logger on writes the same
checkpoints, byte for byte, as a run with all of them off.

A logger has three methods (`Logger`): ``add(record)``, ``add_image(tag, image, step)`` for an
(H, W, 3) uint8 picture (the samples figure) and ``close(status)``. `open_loggers` opens the ones a
run asked for and returns one `Loggers` that fans every call out to them:

* **CSV**, always: ``<run>/metrics.csv``, one row per record. The columns are ``step``, ``split``,
  then every metric name in the order it first appeared; when a record brings a new name (the
  first validation adds ``val_loss``, ``psnr`` ...), the file is rewritten once with the wider
  header, earlier rows left empty there, so every row always has the header's width.
* **TensorBoard** (``tensorboard`` installed; on unless ``--no-tensorboard``): event files in
  ``<run>/tensorboard/``, scalars as ``<split>/<name>``, pictures as images. Missing, it is said
  once, as a warning, and the run goes on.
* **MLflow** (``pip install 'axs-lib[mlflow]'``, mlflow-skinny): one MLflow run per run directory,
  params = the run's config, metrics ``<split>/<name>`` with their step, pictures as image
  artifacts. The tracking store is ``MLFLOW_TRACKING_URI`` when set, else a local file store in
  ``<run>/mlruns`` (``mlflow ui --backend-store-uri <run>/mlruns``). mlflow-skinny has no SQL store,
  and MLflow 3 refuses the file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true, so for that
  default store this module sets it when it is unset (a value of the user's wins). The experiment
  is ``MLFLOW_EXPERIMENT_NAME`` or ``axs``.
* **Weights & Biases** (``pip install 'axs-lib[wandb]'``): ``wandb.init(dir=<run>)``, so its files
  go to ``<run>/wandb/``; the mode is wandb's own ``WANDB_MODE`` (``offline`` logs without an
  account or network; ``wandb sync <run>/wandb/offline-run-...`` uploads later); the project is
  ``WANDB_PROJECT`` or ``axs``. wandb's console capture is off: the run's own output stays as it is.

Resume. CSV and TensorBoard drop what a killed run logged after the step the run resumes from, as
``metrics.jsonl`` does. MLflow and W&B cannot take points back, so the run continues the *same*
MLflow run and W&B run (their ids are kept in ``<run>/loggers.json``) and sends only steps they do
not have yet: after an exact resume those steps carry the very values already logged.

Failures. A logger that fails (a tracking server gone, a full disk under ``metrics.csv``) is said
once, as a warning, and switched off for the rest of the run; training, ``metrics.jsonl`` and the
checkpoints go on. An optional logger asked for but not installed is refused up front
(`check_installed`, one line naming the pip extra) before anything is written, except TensorBoard,
which is on by default and only warned about.

The file and folder names belong to `axs_lib.run_dir` (``--overwrite`` removes them). This module
is task-free: a trainer passes its run directory, the step it starts at, the logger names and its
config as params.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import os
import re
import sys
import time
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from axs_lib.errors import UsageError
from axs_lib.run_dir import LOGGERS_JSON, METRICS_CSV, MLRUNS, TENSORBOARD, WANDB

if TYPE_CHECKING:
    import numpy as np  # imported where a picture is written: `axs train --help` stays numpy-free

log = logging.getLogger(__name__)

CSV = "csv"
OPTIONAL = ("tensorboard", "mlflow", "wandb")  # the switches of a config, by these names
# logger -> (module that must be importable, the pip extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
FLAGS = {"tensorboard": "--no-tensorboard", "mlflow": "--mlflow", "wandb": "--wandb"}
LABELS = {CSV: "CSV", "tensorboard": "TensorBoard", "mlflow": "MLflow", "wandb": "W&B"}
DEFAULT_PROJECT = "axs"  # MLflow experiment and W&B project when the environment names none
TENSORBOARD_MISSING = ("tensorboard is not installed: no TensorBoard event files "
                       "(pip install 'axs-lib[tensorboard]', or pass --no-tensorboard to silence this)")
MAX_STATE_BYTES = 1 << 16
KEYS = ("step", "split")


class Logger(Protocol):
    """What `Loggers` fans out to (and what a logger of one's own provides)."""

    def add(self, record: dict) -> None: ...

    def add_image(self, tag: str, image: "np.ndarray", step: int) -> None: ...

    def close(self, status: str = "finished") -> None: ...


def metrics_of(record: dict) -> dict[str, float]:
    """The numbers of a record, without its ``step`` and ``split``."""
    return {k: v for k, v in record.items() if k not in KEYS and isinstance(v, Real)}


# --------------------------------------------------------------------------- which loggers


def requested(settings: Any) -> tuple[str, ...]:
    """The optional loggers a config turns on: its true boolean attributes named in `OPTIONAL`."""
    return tuple(name for name in OPTIONAL if getattr(settings, name, False) is True)


def installed(name: str) -> bool:
    """Whether the library behind an optional logger can be imported (checked without importing it)."""
    return importlib.util.find_spec(PACKAGES[name][0]) is not None


def missing_message(name: str) -> str:
    module, extra = PACKAGES[name]
    return (f"{FLAGS[name]}: {module} is not installed; install it with pip install 'axs-lib[{extra}]' "
            f"or leave {FLAGS[name]} out")


def check_installed(names: Iterable[str]) -> None:
    """A `UsageError` line naming the pip extra when MLflow or W&B was asked for and is not installed.

    Call it before anything is written. TensorBoard is not refused: it is on by default, and its
    absence is a warning when the loggers open."""
    for name in names:
        if name in ("mlflow", "wandb") and not installed(name):
            raise UsageError(missing_message(name))


def local_mlflow_store() -> bool:
    """Whether MLflow would write to the run's own ``mlruns/`` (no ``MLFLOW_TRACKING_URI`` set)."""
    return not os.environ.get("MLFLOW_TRACKING_URI")


def run_files(names: Iterable[str]) -> list[str]:
    """The manifest names (`axs_lib.run_dir.RunDir.record`) the loggers ``names`` will write, CSV's too."""
    names = set(names)
    files = [METRICS_CSV]
    if "tensorboard" in names and installed("tensorboard"):
        files.append(f"{TENSORBOARD}/")
    if "mlflow" in names and local_mlflow_store():
        files.append(f"{MLRUNS}/")
    if "wandb" in names:
        files.append(f"{WANDB}/")
    if names & {"mlflow", "wandb"}:
        files.append(LOGGERS_JSON)
    return files


# --------------------------------------------------------------------------- the fan-out


class Loggers:
    """Every open logger behind one `Logger`; a logger that raises is warned about once and dropped."""

    def __init__(self, loggers: dict[str, Logger] | None = None):
        self.active: dict[str, Logger] = dict(loggers or {})

    @property
    def names(self) -> list[str]:
        return list(self.active)

    def add(self, record: dict) -> None:
        for name, logger in list(self.active.items()):
            self._call(name, "add", logger.add, record)

    def add_image(self, tag: str, image: "np.ndarray", step: int) -> None:
        for name, logger in list(self.active.items()):
            self._call(name, "add_image", logger.add_image, tag, image, step)

    def close(self, status: str | None = None) -> None:
        """Close every logger. ``status`` ``finished``, ``interrupted`` (stopped by a signal, to be
        resumed) or ``failed``; by default ``failed`` while an exception is propagating (a
        ``finally:`` after an error), else ``finished``."""
        if status is None:
            status = "failed" if sys.exc_info()[0] is not None else "finished"
        active, self.active = self.active, {}
        for name, logger in active.items():
            try:
                logger.close(status)
            except Exception as exc:  # noqa: BLE001 - a view of the run; closing it must not fail the run
                log.warning("%s could not be closed (%s)", LABELS.get(name, name), _short(exc))

    def _call(self, name: str, what: str, method, *args) -> None:
        try:
            method(*args)
        except Exception as exc:  # noqa: BLE001 - any library error: the run goes on without this view
            label = LABELS.get(name, name)
            log.warning("%s logging failed (%s: %s); %s is off for the rest of this run, training and "
                        "checkpoints go on", label, what, _short(exc), label)
            logger = self.active.pop(name, None)
            if logger is not None:
                try:
                    logger.close("failed")
                except Exception:  # noqa: BLE001 - already broken
                    pass


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def open_loggers(root: os.PathLike | str, start_step: int, names: Iterable[str] = (), *,
                 params: dict[str, Any] | None = None, run_name: str | None = None,
                 project: str = DEFAULT_PROJECT, quiet: bool = False) -> Loggers:
    """CSV plus the optional loggers ``names`` for the run directory ``root``, starting after ``start_step``.

    ``params`` (the run's config) go to MLflow as params and to W&B as its config; ``run_name``
    (default: the directory's name) names the MLflow and W&B runs; ``quiet`` keeps wandb's own
    lines to the essential ones, as the run's are. MLflow or W&B asked for but not
    installed is a `UsageError` (callers check first: `check_installed`); a logger that fails to
    open is a warning and the run goes on without it.
    """
    root = Path(root)
    names = list(dict.fromkeys(names))
    check_installed(names)
    root.mkdir(parents=True, exist_ok=True)  # a loop of the user's may not have made it yet
    params = dict(params or {})
    run_name = run_name or root.resolve().name
    opened = Loggers()
    openers = {CSV: lambda: CSVLogger(root / METRICS_CSV, start_step)}
    if "tensorboard" in names:
        if installed("tensorboard"):
            openers["tensorboard"] = lambda: TensorBoardLogger(root, start_step)
        else:
            log.warning(TENSORBOARD_MISSING)
    state = RunIds(root / LOGGERS_JSON) if {"mlflow", "wandb"} & set(names) else None
    if "mlflow" in names:
        openers["mlflow"] = lambda: MLflowLogger(root, params, run_name, project, state)
    if "wandb" in names:
        openers["wandb"] = lambda: WandbLogger(root, params, run_name, project, state, quiet)
    for name, opener in openers.items():
        try:
            opened.active[name] = opener()
        except Exception as exc:  # noqa: BLE001 - a view of the run: say why, train without it
            label = LABELS[name]
            log.warning("%s logging could not start (%s); this run goes on without it", label, _short(exc))
    return opened


# --------------------------------------------------------------------------- CSV


class CSVLogger:
    """``metrics.csv``: one row per record; the header grows (one rewrite) when a record brings a new name.

    Opened at ``start_step``, rows of later steps (a killed run's, past its last checkpoint) are
    dropped, as are rows a kill cut short; the columns of the file are kept, so a resumed run
    appends rows of the same width under the same header.
    """

    def __init__(self, path: os.PathLike | str, start_step: int = 0):
        self.path = Path(path)
        self.columns, rows, changed = self._read()
        kept = [row for row in rows if _kept(row.get("step", ""), start_step)]
        if changed or len(kept) != len(rows):
            self._rewrite(kept)

    def _read(self) -> tuple[list[str], list[dict[str, str]], bool]:
        """The header, the complete rows, and whether the file holds anything else (a cut row)."""
        from axs_lib.bounded_read import NO_SUCH_FILE, open_regular
        from axs_lib.errors import InputError

        try:
            with open_regular(self.path, what="a CSV file", follow_symlinks=False) as f:
                text = f.read().decode("utf-8", errors="replace")
        except InputError as exc:
            if exc.problem == NO_SUCH_FILE:
                return list(KEYS), [], False
            raise
        lines = text.splitlines(keepends=True)
        changed = bool(lines) and not lines[-1].endswith("\n")
        if changed:
            lines.pop()  # the row a kill cut short: its last number may be cut too
        table = list(csv.reader(lines))
        if not table or table[0][:2] != list(KEYS):
            return list(KEYS), [], bool(lines)  # empty, or not our table: start it again
        header = table[0]
        rows = [dict(zip(header, row)) for row in table[1:] if len(row) == len(header)]
        return header, rows, changed or len(rows) != len(table) - 1

    def _rewrite(self, rows: list[dict]) -> None:
        from axs_lib.atomic import atomic_write_text

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())

    def add(self, record: dict) -> None:
        row = {"step": record.get("step"), "split": record.get("split"), **metrics_of(record)}
        new = [k for k in row if k not in self.columns]
        if new or not self.path.exists():
            self.columns += new
            rows = self._read()[1]
            self._rewrite([*rows, row])  # rare: the first record, and the first of each new name
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="", lineterminator="\n").writerow(row)

    def add_image(self, tag: str, image: "np.ndarray", step: int) -> None:
        """Pictures have no place in a table (the PNGs are in the run directory)."""

    def close(self, status: str = "finished") -> None:
        """Every row is written when added: nothing is held back."""


def _kept(step: str, start_step: int) -> bool:
    """Whether a row with this ``step`` cell survives a resume at ``start_step`` (as in `MetricsLog.truncate_after`)."""
    if step == "":
        return True  # a row without a step, as a metrics.jsonl record without one, is kept
    try:
        return int(step) <= start_step
    except ValueError:
        return False


# --------------------------------------------------------------------------- TensorBoard


def tensorboard_available() -> bool:
    return installed("tensorboard")


class TensorBoardLogger:
    """TensorBoard event files in ``<run>/tensorboard/``: ``<split>/<name>`` scalars, images by tag.

    On resume the writer purges events past the resumed step, so the curves show no steps twice;
    the point at that step is the checkpoint's own and stays.
    """

    def __init__(self, output_dir: os.PathLike | str, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # imported only when used: it is slow

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD),
                                    purge_step=start_step + 1 if start_step else None)

    def add(self, record: dict) -> None:
        for name, value in metrics_of(record).items():
            self.writer.add_scalar(f"{record['split']}/{name}", value, record["step"])

    def add_image(self, tag: str, image: "np.ndarray", step: int) -> None:
        """An (H, W, 3) uint8 picture, e.g. the rendered samples figure."""
        import numpy as np

        self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self, status: str = "finished") -> None:
        self.writer.close()


# --------------------------------------------------------------------------- run ids kept for a resume


PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # what MLflow and W&B ids look like


class RunIds:
    """``<run>/loggers.json``: the MLflow and W&B run ids of this run directory, so a resume continues them."""

    def __init__(self, path: Path):
        self.path = path
        self.data = self._read()

    def _read(self) -> dict:
        from axs_lib.bounded_read import NO_SUCH_FILE, read_regular
        from axs_lib.errors import InputError

        try:
            data = json.loads(read_regular(self.path, MAX_STATE_BYTES, what="a loggers file", follow_symlinks=False))
        except InputError as exc:
            if exc.problem != NO_SUCH_FILE:
                log.warning("%s; MLflow and W&B start new runs", exc)
            return {}
        except (ValueError, RecursionError):
            log.warning("%s: not valid JSON; MLflow and W&B start new runs", self.path)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, name: str) -> dict:
        entry = self.data.get(name)
        return entry if isinstance(entry, dict) else {}

    def run_id(self, name: str, key: str) -> str | None:
        """The stored id of logger ``name``, when it is a plain id: both libraries build file and
        folder names from it, so ``../x`` or ``/abs`` in an edited file must never reach them."""
        value = self.get(name).get(key)
        if isinstance(value, str) and PLAIN_ID.fullmatch(value):
            return value
        if value is not None:
            log.warning("%s: %s id %r is not a plain id; %s starts a new run", self.path, LABELS[name], value, LABELS[name])
        return None

    def set(self, name: str, entry: dict) -> None:
        from axs_lib.atomic import atomic_write_text

        self.data[name] = entry
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- MLflow


class MLflowLogger:
    """One MLflow run per run directory, through `mlflow.MlflowClient` (no global active run)."""

    def __init__(self, root: Path, params: dict, run_name: str, project: str, ids: RunIds):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(root).resolve() / MLRUNS).as_uri()
        if local_mlflow_store() and not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3: the file store is opt-in; a user's value wins
        self.client = client = MlflowClient(tracking_uri=uri)
        self.run_id = self._continued(ids, uri)
        logged_params: dict[str, str] = {}
        if self.run_id is None:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or project
            experiment = client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(experiment_name)
            self.run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
            ids.set("mlflow", {"tracking_uri": uri, "run_id": self.run_id})
            self.last_step: dict[str, int] = {}
        else:
            run = client.get_run(self.run_id)
            logged_params = dict(run.data.params)
            client.update_run(self.run_id, status="RUNNING")
            # what this MLflow run already holds: a resume sends only later steps
            self.last_step = {key: max((m.step for m in client.get_metric_history(self.run_id, key)), default=-1)
                              for key in run.data.metrics}
        # params cannot change in MLflow: a resume adds the new ones and leaves the rest as first logged
        fresh = [Param(k, _param(v)) for k, v in params.items() if k not in logged_params]
        for i in range(0, len(fresh), 100):  # log_batch takes at most 100 params
            client.log_batch(self.run_id, params=fresh[i:i + 100])

    def _continued(self, ids: RunIds, uri: str) -> str | None:
        entry = ids.get("mlflow")
        run_id = ids.run_id("mlflow", "run_id")
        if run_id is None or entry.get("tracking_uri") != uri:
            return None
        try:
            self.client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - MlflowException: gone or never there
            log.warning("MLflow run %s of this run directory cannot be continued (%s); logging to a new one",
                        run_id, _short(exc))
            return None
        return run_id

    def add(self, record: dict) -> None:
        from mlflow.entities import Metric

        step, now = int(record["step"]), int(time.time() * 1000)
        metrics = []
        for name, value in metrics_of(record).items():
            key = f"{record['split']}/{name}"
            if step > self.last_step.get(key, -1):
                metrics.append(Metric(key, float(value), now, step))
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def add_image(self, tag: str, image: "np.ndarray", step: int) -> None:
        import numpy as np

        if step > self.last_step.get(tag, -1):
            self.client.log_image(self.run_id, np.asarray(image), key=tag, step=step)

    def close(self, status: str = "finished") -> None:
        # a run stopped by a signal is KILLED, MLflow's word for it; its resume sets it RUNNING again
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


MLFLOW_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


def _param(value: Any) -> str:
    return "" if value is None else str(value)


# --------------------------------------------------------------------------- Weights & Biases


class WandbLogger:
    """One W&B run per run directory, files in ``<run>/wandb/``; the mode is ``WANDB_MODE``'s."""

    def __init__(self, root: Path, params: dict, run_name: str, project: str, ids: RunIds, quiet: bool = False):
        import wandb

        run_id = ids.run_id("wandb", "id")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or project, name=run_name, dir=str(root),
                              id=run_id, resume="allow" if run_id else None, config=params,
                              settings=wandb.Settings(console="off", **({"quiet": True} if quiet else {})))
        if run_id is None:
            ids.set("wandb", {"id": self.run.id})

    def _sends(self, step: int) -> bool:
        """W&B keeps steps in order: a step below the run's current one (a resumed run's steps that
        W&B already has) is not sent, rather than refused by wandb with a warning for each."""
        return step >= self.run.step

    def add(self, record: dict) -> None:
        step = int(record["step"])
        if self._sends(step):
            self.run.log({f"{record['split']}/{k}": v for k, v in metrics_of(record).items()}, step=step)

    def add_image(self, tag: str, image: "np.ndarray", step: int) -> None:
        import numpy as np

        if self._sends(step):
            self.run.log({tag: self.wandb.Image(np.asarray(image))}, step=step)

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code=1 if status == "failed" else 0)
