"""The run directory: its layout, its lock, the manifest of what a run wrote, and the checkpoint manager.

This module is the one place that knows file names. Layout::

    <run>/run.json              effective config, seed, fingerprints, paths, times, status, manifest
    <run>/config.yaml           the effective config, in a form ``--config`` accepts
    <run>/environment.json      environment fingerprint plus installed packages
    <run>/split.json            which tiles went to train and val
    <run>/metrics.jsonl         one line per logged step and per validation
    <run>/metrics.csv           the same records as a table, one row each (`axs_lib.loggers`)
    <run>/loggers.json          the MLflow and W&B run ids a resume continues
    <run>/checkpoints/checkpoint_step_<N>.pt, best.pt, latest
    <run>/plots/loss.png, <run>/samples/step_<N>.png, <run>/tensorboard/
    <run>/mlruns/, <run>/wandb/ MLflow's local store and W&B's run files, when those loggers are on
    <run>/.lock                 held (lockf) while a run is live

Two users: the Stage-1 trainer (`RunDir` for the whole directory, `CheckpointManager` for
``checkpoints/``) and any training loop of the user's own (`CheckpointManager` alone, on any
directory).

Rules that protect the user's files:

* A run never starts over someone else's results: a non-empty directory needs ``resume`` or
  ``overwrite``, and the lock stops two live runs sharing a directory.
* ``overwrite`` removes only what an earlier run recorded in its manifest (``run.json``'s
  ``"written"`` list), only in a directory that is a run, and only when the caller has checked every
  input (the trainer calls `RunDir.clear_previous` after its checks). A name is added to the manifest
  *before* the file is written, so a kill can leave the manifest listing a file that is missing,
  never a written file that is unlisted.
* A resume never writes over a checkpoint it could not load: such a file is renamed to
  ``<name>.unloadable`` (bytes kept) before the run continues, and when checkpoints exist but none
  loads, the resume is refused instead of quietly starting from step 0. A forced resume from an
  older step renames the newer checkpoints (and a newer ``best.pt``) to ``<name>.superseded``.
* The parts of a run are its own: a ``checkpoints/``, ``plots/``, ``run.json``, ``latest`` ... that
  is a symbolic link is refused (`refuse_symlinked_parts`) before anything is read or written, since
  through it a run would resume, overwrite or prune another run's files. The run directory itself
  may be a link (``runs -> /scratch/runs``).
* A part the run cannot write (a read-only ``checkpoints/``) is refused by `RunDir.check` before
  anything changes; a write that fails later (a full disk) is one `axs_lib.errors.WriteError` line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Callable, Iterable

from axs_lib.bitdiff import same_value
from axs_lib.errors import CheckpointError, InputError, UsageError, WriteError

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RUN_JSON = "run.json"
CONFIG_FILE = "config.yaml"
ENVIRONMENT_JSON = "environment.json"
SPLIT_JSON = "split.json"
METRICS = "metrics.jsonl"
PLOTS = "plots"
SAMPLES = "samples"
TENSORBOARD = "tensorboard"
METRICS_CSV = "metrics.csv"
LOGGERS_JSON = "loggers.json"
MLRUNS = "mlruns"  # MLflow's file store, when no MLFLOW_TRACKING_URI says otherwise
WANDB = "wandb"  # what wandb.init(dir=<run>) writes
LOCK = ".lock"
BEST = "best.pt"
LATEST = "latest"
UNLOADABLE_SUFFIX = ".unloadable"
SUPERSEDED_SUFFIX = ".superseded"
# What a run writes at its top level; none of them may be a symbolic link (`refuse_symlinked_parts`).
RUN_PARTS = (RUN_JSON, CONFIG_FILE, ENVIRONMENT_JSON, SPLIT_JSON, METRICS, CHECKPOINTS, PLOTS, SAMPLES, TENSORBOARD,
             METRICS_CSV, LOGGERS_JSON, MLRUNS, WANDB)
# Folders whose content a library names (the manifest lists them as ``<folder>/``): the entries at
# their top level that the library writes for a run. ``--overwrite`` removes exactly those, a
# matching directory with everything in it (the library's tree), and keeps any other entry.
LIBRARY_FOLDERS = {
    TENSORBOARD: re.compile(r"^events\.out\.tfevents\..*$"),
    # experiments (numeric ids, with their runs inside), the default experiment and the store's trash
    MLRUNS: re.compile(r"^(\d+|\.trash)$"),
    # one folder per run start (``offline-run-<date>_<time>-<id>``, ``run-...`` online), the links to the latest
    WANDB: re.compile(r"^((offline-)?run-\d{8}_\d{6}-[0-9a-z]+(-\d+)?|latest-run|debug\.log|debug-internal\.log)$"),
}
STEP_FILE = re.compile(r"^checkpoint_step_(\d+)\.pt$")
# A checkpoint-folder temp file of `axs_lib.atomic` (``.<name>.<random>.tmp``) for a name the manager writes
_STALE_TEMP = re.compile(r"^\.(checkpoint_step_\d+\.pt|best\.pt|latest)\.[^/]+\.tmp$")
RUN_MARKER = "axs_run"  # run.json key that says "this directory is a run of ours"
# Names an earlier version's run wrote, for a run.json without a manifest (no directory removed whole).
_LEGACY_FILES = (RUN_JSON, ENVIRONMENT_JSON, SPLIT_JSON, METRICS)
_LEGACY_PATTERNS = {CHECKPOINTS: re.compile(r"^(checkpoint_step_\d+\.pt|best\.pt|latest)$"),
                    PLOTS: re.compile(r"^loss\.png$"), SAMPLES: re.compile(r"^step_\d+\.png$"),
                    TENSORBOARD: LIBRARY_FOLDERS[TENSORBOARD]}
MAX_RUN_JSON_BYTES = 16 * 2**20


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step_{int(step)}.pt"


LOSS_PLOT = f"{PLOTS}/loss.png"  # relative to the run directory, as the manifest lists it


def sample_image(step: int) -> str:
    """The samples figure of ``step``, relative to the run directory (``samples/step_<N>.png``)."""
    return f"{SAMPLES}/step_{int(step)}.png"


def step_of(name: str) -> int | None:
    """The step of a ``checkpoint_step_<N>.pt`` file name, or None for any other name."""
    m = STEP_FILE.match(name)
    return int(m.group(1)) if m else None


def checkpoint_folder(path: os.PathLike | str) -> Path:
    """``<run>/checkpoints`` when ``path`` is a run directory, else ``path`` itself."""
    path = Path(path)
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


def step_checkpoints(path: os.PathLike | str) -> list[tuple[int, Path]]:
    """``(step, file)`` of every ``checkpoint_step_<N>.pt`` of a run (or checkpoint folder), newest first."""
    folder = checkpoint_folder(path)
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            step = step_of(p.name)
            if step is not None and p.is_file():
                found.append((step, p))
    return sorted(found, reverse=True)


def write_json(path: Path, data: Any) -> None:
    from axs_lib.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_run_json(run: os.PathLike | str) -> dict | None:
    """``run.json`` of a run directory as a dict, None when absent; InputError when it is not ours.

    Read bounded and non-blocking, never through a link (`axs_lib.bounded_read`)."""
    from axs_lib.bounded_read import NO_SUCH_FILE, read_regular

    path = Path(run) / RUN_JSON
    try:
        raw = read_regular(path, MAX_RUN_JSON_BYTES, what="a run manifest", follow_symlinks=False)
    except InputError as exc:
        if exc.problem == NO_SUCH_FILE:
            return None
        raise
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(path, f"not a run manifest (not valid JSON: {str(exc)[:80]})") from None
    if not isinstance(data, dict):
        raise InputError(path, "not a run manifest (not a JSON object)")
    return data


def is_run(data: dict | None) -> bool:
    """Whether a parsed ``run.json`` is one a run of ours wrote (this version or an earlier one)."""
    return isinstance(data, dict) and (data.get(RUN_MARKER) is not None or {"config", "seed", "status"} <= set(data))


def _ours(name: str) -> bool:
    """A name the checkpoint manager writes in ``checkpoints/``."""
    return name in (BEST, LATEST) or step_of(name) is not None


def symlinked_parts(root: os.PathLike | str) -> list[Path]:
    """The parts of a run (`RUN_PARTS`, and ``checkpoints/``'s step files, ``best.pt`` and ``latest``)
    that are symbolic links."""
    root = Path(root)
    return [root / name for name in RUN_PARTS if (root / name).is_symlink()] + _linked_entries(root / CHECKPOINTS)


def _linked_entries(folder: Path) -> list[Path]:
    """The step files, ``best.pt`` and ``latest`` of a checkpoint folder that are symbolic links."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    return sorted(p for p in folder.iterdir() if _ours(p.name) and p.is_symlink())


def refuse_symlinked_parts(root: os.PathLike | str) -> None:
    """One `InputError` line when a part of the run at ``root`` is a symbolic link.

    Through a linked ``checkpoints/`` a ``--resume auto`` would continue another run without
    ``--adopt-checkpoint`` and ``--keep-last`` would delete that run's files; through a linked
    ``metrics.jsonl`` or ``plots/`` a run would write into another directory. Refused rather than
    followed: a run directory is a real directory of real files.
    """
    _refuse_links(symlinked_parts(root))


def _refuse_links(links: list[Path]) -> None:
    if links:
        more = f" (and {len(links) - 1} more)" if len(links) > 1 else ""
        raise InputError(links[0], f"is a symbolic link{more}; a run's files must be its own, as through a link this run "
                                   "would read, overwrite or delete another directory's files: replace it with the real "
                                   "file or directory, or use another --output-dir")


def refuse_unwritable(root: os.PathLike | str) -> None:
    """One `InputError` line when the run directory or one of its folders cannot be written (read-only)."""
    root = Path(root)
    for folder in (root, *(root / name for name in (CHECKPOINTS, PLOTS, SAMPLES, *LIBRARY_FOLDERS))):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(folder, "is not writable (read-only directory or filesystem): this run could not save "
                                     "its files there; make it writable or use another --output-dir")


def _changing(path: Path, action: Callable[[], Any]) -> Any:
    """Run a rename or removal in the run directory; an OSError (read-only, gone) becomes one line."""
    try:
        return action()
    except OSError as exc:
        raise WriteError(path, exc) from None


# --------------------------------------------------------------------------- the whole directory


class RunDir:
    """A run's output directory: checks before use, the lock, the manifest, ``--overwrite``.

    Order of use (the trainer's): `check` (read-only, may run before any input is checked),
    `open` (create, lock), `clear_previous` (only after every input passed), then `record` each
    name before writing it and `save_manifest` with ``run.json``.
    """

    def __init__(self, root: os.PathLike | str):
        self.root = Path(root)
        self.checkpoints = self.root / CHECKPOINTS
        self.previous: dict | None = None  # the run.json found here before this run started
        self.written: set[str] = set()
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ checks (read-only)
    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse a directory this run may not use, without creating or changing anything."""
        root = self.root
        if root.is_symlink() and not root.exists():
            raise InputError(root, "output path is a dangling symbolic link")
        if root.exists() and not root.is_dir():
            raise InputError(root, "output path exists and is not a directory")
        if not root.exists():
            return
        lock = root / LOCK
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):
            raise InputError(lock, "is not a regular file (a link or special file where the run's lock belongs)")
        refuse_symlinked_parts(root)
        ckpt = self.checkpoints
        if ckpt.exists() and not ckpt.is_dir():
            raise InputError(ckpt, "exists and is not a directory")
        refuse_unwritable(root)
        self.previous = read_run_json(root)
        used = sorted(p.name for p in root.iterdir() if p.name != LOCK)
        if not used:
            return
        if not resume and not overwrite:
            raise UsageError(
                f"{root}: output directory is not empty ({', '.join(used[:4])}{', ...' if len(used) > 4 else ''}); "
                "pass --resume auto to continue that run or --overwrite to replace it"
            )
        if not is_run(self.previous) and (overwrite or any(n in used for n in (RUN_JSON, METRICS))):
            what = f"its {RUN_JSON} is not a run manifest" if self.previous is not None else f"it has no {RUN_JSON}"
            raise UsageError(f"{root}: not a training run directory ({what}); refusing to "
                             f"{'overwrite' if overwrite else 'resume'} in it: choose an empty or new --output-dir")
        listed = self.previous.get("written") if is_run(self.previous) else None
        if overwrite and not resume and isinstance(listed, list) and ckpt.is_dir() and not ckpt.is_symlink():
            # --overwrite removes only what the earlier run recorded; a step checkpoint it did not record
            # would stay and be written over by this run's step of that number: refuse before training
            foreign = [p.name for _, p in step_checkpoints(ckpt) if f"{CHECKPOINTS}/{p.name}" not in listed]
            if foreign:
                raise UsageError(f"{ckpt}: holds checkpoints the earlier run did not write ({', '.join(foreign[:3])}"
                                 f"{', ...' if len(foreign) > 3 else ''}); --overwrite removes only that run's files and "
                                 "this run would write over these: move them away or choose another --output-dir")

    # ------------------------------------------------------------------ create and lock
    def open(self) -> "RunDir":
        """Create the directory and take its lock (released when the process dies, even by SIGKILL)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(self.root, f"cannot create output directory: {exc.strerror}") from None
        self._lock_fd = _take_lock(self.root)
        if self.previous is not None:
            self.written = set(self.previous.get("written") or []) if isinstance(self.previous.get("written"), list) else set()
        return self

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ --overwrite
    def clear_previous(self) -> list[str]:
        """Remove what the earlier run here wrote (its manifest), keeping every other file; return the names."""
        previous = self.previous
        if not is_run(previous):
            return []
        listed = previous.get("written")
        names = [n for n in listed if isinstance(n, str)] if isinstance(listed, list) else _legacy_outputs(self.root)
        removed = []
        for name in sorted(set(names), key=lambda n: (n.count("/"), n), reverse=True):
            if ".." in Path(name).parts or Path(name).is_absolute():
                continue  # a manifest never names anything outside the run
            if name.endswith("/"):  # a folder whose files a library names (TensorBoard, MLflow, W&B)
                removed += _clear_library_folder(self.root, name.rstrip("/"))
                continue
            target = self.root / name
            if target.is_file() or target.is_symlink():
                _changing(target, target.unlink)
                removed.append(name)
        for folder in (CHECKPOINTS, PLOTS, SAMPLES, *LIBRARY_FOLDERS):
            with contextlib.suppress(OSError):
                (self.root / folder).rmdir()  # only when now empty: a user's own file keeps its folder
        self.written = set()
        self.previous = None
        return removed

    # ------------------------------------------------------------------ manifest
    def record(self, *names: str) -> None:
        """Add names (relative to the run) to the manifest; call `save_manifest` before writing them."""
        self.written.update(names)

    def manifest(self) -> list[str]:
        return sorted(self.written)

    def remove_stale_temp_files(self) -> list[str]:
        """Delete temp files left by a write that was killed (``.<name>.<random>.tmp``)."""
        removed = []
        for folder in (self.root, self.checkpoints, self.root / PLOTS, self.root / SAMPLES):
            if folder.is_dir() and not folder.is_symlink():
                for p in folder.glob(".*.tmp"):
                    if p.is_file() and not p.is_symlink():
                        p.unlink(missing_ok=True)
                        removed.append(p.name)
        return removed


def _free_name(path: Path, suffix: str) -> Path:
    """``<path><suffix>``, or ``<path><suffix>.<n>`` with the first ``n`` not taken."""
    target, n = path.with_name(path.name + suffix), 0
    while os.path.lexists(target):
        n += 1
        target = path.with_name(f"{path.name}{suffix}.{n}")
    return target


def _clear_library_folder(root: Path, folder_name: str) -> list[str]:
    """Remove the entries of a library folder (`LIBRARY_FOLDERS`) that the library writes: a file or
    link by name (never followed), a directory with its tree; every other entry stays."""
    pattern = LIBRARY_FOLDERS.get(folder_name)
    folder = root / folder_name
    if pattern is None or not folder.is_dir() or folder.is_symlink():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if not pattern.match(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            _changing(p, lambda p=p: shutil.rmtree(p))  # rmtree removes links inside, never what they point to
        else:
            _changing(p, p.unlink)
        removed.append(f"{folder_name}/{p.name}")
    return removed


def _legacy_outputs(root: Path) -> list[str]:
    names = [n for n in _LEGACY_FILES if (root / n).is_file()]
    for folder, pattern in _LEGACY_PATTERNS.items():
        if (root / folder).is_dir():
            names += [f"{folder}/{p.name}" for p in (root / folder).iterdir() if pattern.match(p.name)]
    return names


def _take_lock(root: Path) -> int:
    """Open ``<root>/.lock`` (never through a link) and hold a POSIX record lock on it.

    ``lockf``, not ``flock``: forked DataLoader workers do not inherit it, so workers still
    shutting down after their parent was killed do not block the resume.
    """
    path = root / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(path, "is a symbolic link; refusing to use it as the run's lock") from None
        raise InputError(root, f"output directory is not writable (cannot create {LOCK}): {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(path, "is not a regular file")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"{root}: another run (pid {holder}) is using this output directory") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            raise InputError(root, f"output directory is not writable: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def locked(root: os.PathLike | str):
    """Hold ``<root>/.lock`` for the life of the block (a live run's lock, for tools and tests)."""
    fd = _take_lock(Path(root))
    try:
        yield
    finally:
        os.close(fd)


PROC_LOCKS = "/proc/locks"


def lock_holders(run: os.PathLike | str, proc_locks: str = PROC_LOCKS) -> set[int] | None:
    """Process ids holding a record lock on ``<run>/.lock``, from the kernel's lock table.

    Reads ``/proc/locks`` (lines like ``1: POSIX  ADVISORY  WRITE 4242 fe:00:5408308 0 EOF``,
    device in hex and inode) and opens nothing in the run: POSIX record locks belong to a process,
    and opening and closing the lock file from the process that holds it would drop its lock.
    None when the table cannot be read (not Linux).
    """
    try:
        st = os.stat(Path(run) / LOCK, follow_symlinks=False)
    except FileNotFoundError:
        return set()
    except OSError:
        return None
    try:
        table = Path(proc_locks).read_text()
    except OSError:
        return None
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    for line in table.splitlines():
        fields = line.split()
        # Waiting requests are listed too, marked "->"; only granted locks count.
        if len(fields) >= 6 and "->" not in fields and fields[1] in ("POSIX", "OFDLCK") and fields[5] == file_id:
            holders.add(int(fields[4]) if fields[4].lstrip("-").isdigit() else -1)
    return holders


def lock_is_held(run: os.PathLike | str) -> bool:
    """Whether a live process holds ``<run>/.lock``: from `lock_holders` where the kernel's table is
    readable, else by a probe (take the lock and let it go at once; call that from a process that
    is not the run itself)."""
    holders = lock_holders(run)
    if holders is not None:
        return bool(holders)
    try:
        fd = os.open(Path(run) / LOCK, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock, if it got one
    return False


# --------------------------------------------------------------------------- checkpoints


# Config fields that say where a run lives, not how it trained: never a difference between two runs.
LOCATION_FIELDS = ("output_dir", "data_dir")


def config_differences(*configs: dict[str, Any], ignore: Iterable[str] = LOCATION_FIELDS) -> list[str]:
    """The fields, first seen first, whose values are not the same bits in every one of ``configs``
    (`axs_lib.bitdiff.same_value`; a field one config lacks is None there). `axs compare` and `axs
    runs` name how runs differ with it."""
    skip = set(ignore)
    keys = dict.fromkeys(k for config in configs for k in config)
    return [k for k in keys if k not in skip and not all(same_value(configs[0].get(k), c.get(k)) for c in configs[1:])]


def diff_fields(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human lines naming every field whose value differs between two flat dicts."""
    keys = sorted(set(stored) | set(current), key=str)
    return [f"{k}: checkpoint {_short(stored.get(k))}, now {_short(current.get(k))}" for k in keys if not _equal(stored.get(k), current.get(k))]


def _equal(a: Any, b: Any) -> bool:
    """``a == b``, and "they differ" where ``==`` gives no yes or no (a crafted tensor of several values)."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - RuntimeError, ValueError: an ambiguous truth value
        return False


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: a crafted value cannot make a message of megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# The types a checkpoint of the trainer or the toolkit stores under its well-known keys.
_KNOWN_TYPES = {"step": int, "epoch": int, "world_size": int, "seed_info": dict, "config": dict,
                "data_fingerprint": dict, "sampler_state": dict, "metrics": dict, "environment": dict}
_FLAT = ("config", "data_fingerprint", "seed_info")  # compared value by value with this run's: plain values only
_PLAIN = (type(None), bool, int, float, str)
MAX_COUNT = 2**62  # steps, epochs and positions beyond this are not counts a run reaches (int64 holds them)


def check_known_keys(ckpt: dict, path: os.PathLike | str) -> None:
    """`CheckpointError` naming the file when a well-known key holds a value of the wrong type or range.

    A checkpoint with a valid checksum can still be crafted (or written by a bug): a ``step`` that
    is a string, a ``config`` that is a list, a sampler ``position`` of 10**30. Checked before any of
    it is used, so it is one line instead of a traceback from deep inside the resume.
    """
    for key, kind in _KNOWN_TYPES.items():
        if key not in ckpt:
            continue
        value = ckpt[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(path, f"{key} is {_short(value, 40)} ({type(value).__name__}), not "
                                        f"{'an integer' if kind is int else 'a dict'}")
        if kind is int and not (0 <= value < MAX_COUNT) or key == "world_size" and value < 1:
            raise CheckpointError(path, f"{key} is {_short(value, 40)}: not a count from {int(key == 'world_size')} to 2**62")
        if key in _FLAT:
            odd = next((k for k, v in value.items() if type(k) is not str or type(v) not in _PLAIN), None)
            if odd is not None:
                raise CheckpointError(path, f"{key}[{_short(odd, 40)}] is {_short(value[odd], 40)}: {key} holds names and plain values")
    state = ckpt.get("sampler_state")
    if state is not None:
        for key in ("epoch", "position"):
            value = state.get(key)
            if type(value) is not int or not 0 <= value < MAX_COUNT:
                raise CheckpointError(path, f"sampler_state {key} is {_short(value, 40)}: not a count from 0 to 2**62")


def check_resume(ckpt: dict, *, seed: int | None = None, config: dict | None = None, data_fingerprint: dict | None = None,
                 world_size: int = 1, allow_world_size_change: bool = False) -> list[str]:
    """Every reason ``ckpt`` cannot continue this run exactly (empty when it can).

    Compares what is given: the checkpoint format, the seed, a flat dict of result-changing config
    fields, the data fingerprint (``sha256`` of tiles and split) and the number of ranks.
    """
    from axs_lib import checkpoint

    readable = checkpoint.READABLE_FORMATS
    problems = []
    version = ckpt.get(checkpoint.FORMAT_KEY)
    if type(version) is not int or version not in readable:  # a crafted list or tensor is no version either
        problems.append(f"checkpoint format: checkpoint {_short(version)}, this version reads {sorted(readable)}")
    if seed is not None:
        stored = _dict(ckpt.get("seed_info")).get("seed", ckpt.get("seed"))
        if not _equal(stored, seed):
            problems.append(f"seed: checkpoint {_short(stored)}, now {seed!r}")
    if config is not None:
        problems += diff_fields(_dict(ckpt.get("config")), config)
    if data_fingerprint is not None:
        stored_fp = _dict(ckpt.get("data_fingerprint"))
        if not _equal(stored_fp.get("scheme"), data_fingerprint.get("scheme")):
            problems.append(f"data fingerprint scheme: checkpoint {_short(stored_fp.get('scheme', 'file-bytes (v1)'))}, now "
                            f"{data_fingerprint.get('scheme')!r}; the tiles may be the same, but this version cannot tell")
        elif not _equal(stored_fp.get("sha256"), data_fingerprint.get("sha256")):
            problems.append(
                f"tile set: checkpoint {_short(stored_fp.get('num_tiles'), 20)} tiles ({str(stored_fp.get('sha256'))[:12]}), "
                f"now {data_fingerprint.get('num_tiles')} tiles ({str(data_fingerprint.get('sha256'))[:12]})"
            )
    if not _equal(ckpt.get("world_size", 1), world_size) and not allow_world_size_change:
        problems.append(f"world size: checkpoint {_short(ckpt.get('world_size', 1))}, now {world_size} "
                        "(--allow-world-size-change re-shards deterministically, with other bits)")
    return problems


class CheckpointManager:
    """Checkpoints of one run in ``<output_dir>/checkpoints``: save, retention, resume, cleanup.

    ``save(checkpoint, step)`` writes ``checkpoint_step_<step>.pt`` atomically with a checksum (and
    ``best.pt`` as a second name of the same file when ``best=True``), then moves ``latest``. With
    ``checkpoint_mode="async"`` the write runs in a background thread after a host snapshot; at
    most one write is in flight and `close` waits for it. ``keep_last=N`` deletes older step
    checkpoints after each save, never the one ``latest`` or ``best.pt`` names, and, when ``owns`` is
    set (the trainer sets it to its run's manifest), never one the run did not write.

    ``resume("auto")`` returns the newest checkpoint that loads and passes its checksum (``latest``
    first, then step files newest first), logging every file it skips and why; given the run's
    ``seed``/``config``/``data_fingerprint`` it refuses a checkpoint of another run. A run that did
    not resume never writes over step checkpoints already in the folder: its first save refuses
    (and first removes the temp files of a write that was killed half-way).
    """

    def __init__(self, output_dir: os.PathLike | str, *, keep_last: int | None = None, keep_best: bool = True,
                 checkpoint_mode: str = "sync", on_write: Callable[[list[str]], None] | None = None):
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
        if checkpoint_mode not in ("sync", "async"):
            raise ValueError(f"checkpoint_mode must be 'sync' or 'async', got {checkpoint_mode!r}")
        self.root = Path(output_dir)
        self.folder = self.root / CHECKPOINTS
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.checkpoint_mode = checkpoint_mode
        self.on_write = on_write  # told the run-relative names about to be written (the run's manifest)
        self.owns: Callable[[str], bool] | None = None  # which checkpoint names retention may delete (None: all)
        self.best_step: int | None = None
        self.skipped: list[Path] = []  # unloadable checkpoints newer than the resumed one
        self.resumed_from: Path | None = None  # the checkpoint this run continues (set by resume)
        self._started = False  # the first save checks the folder (see _check_start)
        self._writer = None

    # ------------------------------------------------------------------ resume
    def resume(self, target: str | os.PathLike | None = "auto", *, log: Callable[[str], None] | None = None,
               adopt: bool = False, seed: int | None = None, config: dict | None = None,
               data_fingerprint: dict | None = None, force: bool = False) -> tuple[Path, dict] | None:
        """The checkpoint to continue from: ``(path, dict)``, or None for a fresh start.

        ``target``: None (a fresh start: refused when the folder already holds step checkpoints,
        which it would write over), ``"auto"`` (newest valid here) or a checkpoint file. A file
        outside this run's ``checkpoints/`` belongs to another run: refused unless ``adopt``.
        Given ``seed``, ``config`` or ``data_fingerprint``, the checkpoint found must match them
        (`check_resume`): a `UsageError` names every difference, unless ``force``.
        Reads only: unloadable files are set aside later by `set_aside_unloadable`.
        """
        found = self._find(target, log or logger.warning, adopt)
        if found is None:
            if target is None:
                self._check_start()
            return None
        path, ckpt = found
        if seed is not None or config is not None or data_fingerprint is not None:
            problems = check_resume(ckpt, seed=seed, config=config, data_fingerprint=data_fingerprint)
            if problems and not force:
                raise UsageError(f"{path}: cannot resume exactly: " + "; ".join(problems)
                                 + " (a fresh run belongs in another directory)")
        self.resumed_from = path
        return found

    def _find(self, target: str | os.PathLike | None, say: Callable[[str], None], adopt: bool) -> tuple[Path, dict] | None:
        from axs_lib.checkpoint import load_checkpoint

        if target is None:
            return None
        self._refuse_linked_folder(entries=True)
        if target != "auto":
            path = Path(target)
            ckpt = load_checkpoint(path)  # a damaged or unsafe file is named as such first
            if not adopt and path.resolve().parent != self.folder.resolve():
                raise UsageError(f"{path}: checkpoint of another run (not in {self.folder}); continuing it here "
                                 "would mix two runs in one directory: pass --adopt-checkpoint to do it anyway, "
                                 "or resume in that run's own directory")
            return path, ckpt
        skipped: list[Path] = []
        for path in self._candidates(say):
            try:
                found = path, load_checkpoint(path)
            except CheckpointError as exc:
                say(f"warning: skipping {exc}")
                skipped.append(path)
                continue
            self.skipped = [p for p in skipped if (step_of(p.name) or -1) > (step_of(path.name) or 0)]
            return found
        if skipped:
            raise CheckpointError(self.folder, f"none of the {len(skipped)} checkpoints loads ({', '.join(p.name for p in skipped[:3])}"
                                  f"{', ...' if len(skipped) > 3 else ''}); refusing to start again from step 0 over them: "
                                  "move them away or use another --output-dir")
        return None

    def _check_start(self) -> None:
        """Refuse to start a run from step 0 over step checkpoints already in the folder: it would
        write over them, step by step. Continue them (``resume("auto")``) or use another directory."""
        earlier = [p.name for _, p in step_checkpoints(self.folder)]
        if earlier:
            raise UsageError(f"{self.folder}: holds checkpoints of an earlier run ({', '.join(earlier[:3])}"
                             f"{', ...' if len(earlier) > 3 else ''}); a fresh start would write over them: "
                             "continue it (resume \"auto\", --resume auto) or use another output directory")

    def _first_save(self) -> None:
        """Once, before this run's first write: refuse a fresh start over earlier checkpoints, and
        remove the temp files a write killed half-way left here (ours only, by name)."""
        if self.resumed_from is None:
            self._check_start()
        if self.folder.is_dir() and not self.folder.is_symlink():
            for p in self.folder.iterdir():
                if _STALE_TEMP.match(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)
                    logger.info("removed %s, left by a checkpoint write that was interrupted", p)
        self._started = True

    def _candidates(self, say) -> list[Path]:
        from axs_lib.checkpoint import read_latest

        candidates: list[Path] = []
        try:
            latest = read_latest(self.folder) if self.folder.is_dir() else None
        except CheckpointError as exc:
            say(f"warning: {exc}; looking for the newest valid checkpoint")
            latest = None
        if latest is not None and latest.exists():
            candidates.append(latest)
        elif latest is not None:
            say(f"warning: {self.folder / LATEST} names {latest.name}, which does not exist; looking for the newest valid checkpoint")
        candidates += [p for _, p in step_checkpoints(self.folder) if p != latest]
        return candidates

    def set_aside_unloadable(self) -> list[str]:
        """Rename the unloadable step checkpoints newer than the one `resume` chose (bytes kept), so the
        continued run, which writes those steps again, never writes over them. Call it once every
        input has been checked."""
        renamed = []
        for path in self.skipped:
            target = path.with_name(path.name + UNLOADABLE_SUFFIX)
            if path.exists() and not target.exists():
                _changing(path, lambda path=path, target=target: os.replace(path, target))
                renamed.append(f"{path.name} -> {target.name}")
        self.skipped = []
        return renamed

    def set_aside_newer(self, step: int) -> list[str]:
        """Rename the step checkpoints newer than ``step``, and a ``best.pt`` of a later step, to
        ``<name>.superseded`` (``.superseded.1``, ... when taken): bytes kept, names freed.

        For a forced resume from an older step: the continued run writes other bits under those
        names, and the newer files are the only copy of what the run had reached. ``latest`` moves
        back to ``checkpoint_step_<step>.pt`` when that file is here. Call it once every input has
        been checked. Returns ``"<old> -> <new>"`` lines.
        """
        from axs_lib.checkpoint import write_latest

        newer = [p for s, p in step_checkpoints(self.folder) if s > step] if self.folder.is_dir() else []
        best = self.folder / BEST
        if best.is_file():
            best_step = self._step_of_file(best)
            if best_step is None or best_step > step:  # a best.pt that does not say its step may be newer too
                newer.append(best)
        renamed = []
        for path in newer:
            target = _free_name(path, SUPERSEDED_SUFFIX)
            _changing(path, lambda path=path, target=target: os.replace(path, target))
            renamed.append(f"{path.name} -> {target.name}")
        if renamed and (self.folder / checkpoint_name(step)).is_file():
            write_latest(self.folder, checkpoint_name(step))
        return renamed

    def _step_of_file(self, path: Path) -> int | None:
        """The step a checkpoint file holds: its step file's name when it is a second name of one, else its content."""
        from axs_lib.checkpoint import load_checkpoint

        for step, other in step_checkpoints(self.folder):
            with contextlib.suppress(OSError):
                if os.path.samefile(path, other):
                    return step
        try:
            value = load_checkpoint(path, verify=False, mmap=True).get("step")
        except CheckpointError:
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def _refuse_linked_folder(self, entries: bool = False) -> None:
        """``checkpoints/`` must be this run's own directory, not a link to another's; with ``entries``,
        its step files, ``best.pt`` and ``latest`` must not be links either (a resume would load them)."""
        _refuse_links([self.folder] if self.folder.is_symlink() else _linked_entries(self.folder) if entries else [])

    # ------------------------------------------------------------------ save
    def save(self, checkpoint: dict, step: int, *, best: bool = False, write_step: bool = True) -> list[str]:
        """Write the checkpoint of ``step`` (and ``best.pt`` when ``best``); move ``latest`` to the step file.

        ``write_step=False`` with ``best=True`` writes only ``best.pt`` (a validation improvement
        at a step that is not a checkpoint step; ``latest`` does not move). Returns the names written.
        """
        self._refuse_linked_folder()
        names = ([BEST] if best and self.keep_best else []) + ([checkpoint_name(step)] if write_step else [])
        if not names:
            return []
        if not self._started:
            self._first_save()
        latest = names[-1] if write_step else None
        # best.pt first: a resume from this step's checkpoint would not write it again
        written = [f"{CHECKPOINTS}/{n}" for n in names] + ([f"{CHECKPOINTS}/{LATEST}"] if latest else [])
        record = (lambda: self.on_write(written)) if self.on_write is not None else None
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.checkpoint_mode == "async":
            if self._writer is None:
                from axs_lib.checkpoint_writer import AsyncCheckpointWriter

                self._writer = AsyncCheckpointWriter()
            # the manifest update goes to the writer thread too: still before the files, not in the loop
            self._writer.submit(self.folder, names, checkpoint, latest=latest, before=record)
        else:
            if record is not None:
                record()
            from axs_lib.checkpoint import write_checkpoint_files

            write_checkpoint_files(self.folder, names, checkpoint, latest=latest)
        if best:
            self.best_step = step
        if write_step and self.keep_last is not None:
            if self._writer is not None:
                self._writer.wait()  # retention looks at what is durable
            self.prune(step)
        return names

    def prune(self, newest: int) -> list[str]:
        """Delete step checkpoints beyond the ``keep_last`` newest, never the one ``latest`` names nor one
        that ``owns`` says the run did not write (a file copied in is the user's, whatever its name)."""
        from axs_lib.checkpoint import read_latest

        if self.keep_last is None:
            return []
        with contextlib.suppress(CheckpointError):
            latest = read_latest(self.folder)
        protected = {latest.name} if latest is not None else set()
        removed = []
        for i, (step, path) in enumerate(step_checkpoints(self.folder)):
            owned = self.owns is None or self.owns(path.name)
            if i >= self.keep_last and step <= newest and path.name not in protected and owned:
                _changing(path, lambda path=path: path.unlink(missing_ok=True))
                removed.append(path.name)
        return removed

    def wait(self) -> None:
        """Block until a background write in flight is durable (raises its error, if it failed)."""
        if self._writer is not None:
            self._writer.wait()

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    check_resume = staticmethod(check_resume)


class MetricsLog:
    """``metrics.jsonl``: appended line by line; cut back to a step when a run resumes."""

    def __init__(self, path: Path):
        self.path = path

    def _lines(self) -> list[str]:
        """The log's lines; opened non-blocking, never through a link (`axs_lib.bounded_read`)."""
        from axs_lib.bounded_read import NO_SUCH_FILE, open_regular

        try:
            f = open_regular(self.path, what="a metrics log", follow_symlinks=False)
        except InputError as exc:
            if exc.problem == NO_SUCH_FILE:
                return []
            raise
        with f:
            return f.read().decode("utf-8", errors="replace").splitlines()

    @staticmethod
    def _parse(line: str) -> dict | None:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            return None  # a line cut short by a kill, or not ours
        return record if isinstance(record, dict) else None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by the killed run after its last checkpoint)."""
        from axs_lib.atomic import atomic_write_text

        if not self.path.exists():
            return
        kept = []
        for line in self._lines():
            record = self._parse(line)
            if record is None:
                continue
            rstep = record.get("step", 0)
            if isinstance(rstep, int) and not isinstance(rstep, bool) and rstep <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
                f.flush()
        except OSError as exc:  # a full disk: one line (the records already written stay)
            raise WriteError(self.path, exc) from None

    def read(self) -> list[dict[str, Any]]:
        return [r for r in (self._parse(line) for line in self._lines()) if r is not None]
