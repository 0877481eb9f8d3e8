"""``axs runs DIR...``: one row per experiment, and a warning when they are not comparable.

The reproducibility guide's "Compare Experiments" example as a command: it collects each
experiment's seed, steps, best metric, data fingerprint and environment from ``run.json`` (or,
for a directory without one or a checkpoint file, from its latest checkpoint) and warns when the
experiments used different seeds or different data, or do not record them.

A run killed with SIGKILL (or by the OOM killer, or a power cut) never gets to rewrite its
``run.json``, which says "running" forever. A live run holds a POSIX record lock on
``<run>/.lock`` and the kernel drops it when the process dies, so a "running" run whose lock
nobody holds is shown as ``killed``, with the step of its newest checkpoint (where ``--resume
auto`` continues). The probe must not disturb a live holder: POSIX record locks belong to a
process and closing *any* descriptor of the file drops them, so a probe that opens the lock file
would release a run's lock if that run lives in the probing process (a notebook, a test). On
Linux the probe therefore reads ``/proc/locks`` and opens nothing in the run; elsewhere it falls
back to `axs_lib.run_dir.lock_is_held` (a non-blocking ``lockf`` from this process).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from axs_lib.cli import add_debug_flag
from axs_lib.errors import EXIT_OK, InputError
from axs_lib.run_dir import LOCK, RUN_JSON, checkpoint_folder, step_checkpoints

EPILOG = """example:
  axs runs experiments/exp1_seed42 experiments/exp2_seed123 experiments/exp3_seed42
  axs runs exp1/model.pt exp2/model.pt --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "runs",
        help="list experiments (seed, steps, best metric, data, environment) and warn when they differ",
        description=(
            "One row per experiment directory (or checkpoint file): seed, status, steps, best metric, "
            "data fingerprint and environment, then a warning when the experiments used different seeds "
            "or different data. Exit 0, or 2 when an experiment cannot be read."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experiments", nargs="+", metavar="DIR", help="run directory (with run.json or checkpoints/) or checkpoint file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust", action="store_true",
                   help="load legacy checkpoint pickles that can run code (only for files you made yourself)")
    add_debug_flag(p)
    p.set_defaults(func=run)


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _from_manifest(run: Path) -> dict:
    from axs_lib.run_dir import read_run_json  # bounded, never through a link: one line for anything else

    manifest = read_run_json(run)
    if manifest is None:
        raise InputError(run / RUN_JSON, "no such file")
    best = _dict(manifest.get("best"))
    return {
        "seed": manifest.get("seed", _dict(manifest.get("config")).get("seed")),
        "status": manifest.get("status"),
        "step": manifest.get("final_step"),
        "best": {k: best.get(k) for k in ("metric", "value", "step")} if best else None,
        "data": _dict(manifest.get("data_fingerprint")).get("sha256"),
        "environment": _dict(manifest.get("environment")),
        "duration_s": _duration(manifest.get("started_at"), manifest.get("ended_at")),
        "config": {k: v for k, v in _dict(manifest.get("config")).items() if isinstance(v, (str, int, float, bool, type(None)))},
        "source": str(run / RUN_JSON),
    }


def _duration(started: Any, ended: Any) -> float | None:
    """Seconds between two ISO times of run.json, or None when either is missing or unreadable."""
    from datetime import datetime

    try:
        return (datetime.fromisoformat(ended) - datetime.fromisoformat(started)).total_seconds()
    except (TypeError, ValueError):
        return None


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def config_differences(rows: list[dict]) -> list[str]:
    """The config fields whose values differ between the rows' runs (the columns `axs runs` adds);
    the seed has a column of its own."""
    from axs_lib.run_dir import LOCATION_FIELDS, config_differences as differing

    return differing(*(r.get("config") or {} for r in rows), ignore=(*LOCATION_FIELDS, "seed"))


# What each field of a row may hold; a hand-edited or damaged file's other values are shown as unreadable.
_FIELD_TYPES = {"seed": int, "status": str, "step": int, "data": str}
_BEST_TYPES = {"metric": str, "value": (int, float), "step": int}


def _checked(row: dict) -> dict:
    """``row`` with every value of an unexpected type replaced by None and named in a note."""
    odd = []

    def keep(name: str, value: Any, kinds) -> Any:
        if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
            return value
        odd.append(name)
        return None

    for name, kinds in _FIELD_TYPES.items():
        row[name] = keep(name, row.get(name), kinds)
    if row.get("best") is not None:
        row["best"] = {k: keep(f"best.{k}", row["best"].get(k), kinds) for k, kinds in _BEST_TYPES.items()}
    env = _dict(row.get("environment"))
    env = _dict(env.get("fingerprint", env))
    torch_version = keep("environment.torch", env.get("torch"), str)
    gpus = env.get("gpus") if isinstance(env.get("gpus"), list) else []
    device = (gpus[0].get("name") if isinstance(gpus[0], dict) else gpus[0]) if gpus else env.get("cpu")
    device = keep("environment.device", device, str)
    row["environment"] = f"torch {torch_version} on {device or '?'}" if torch_version else None
    if odd:
        row["note"] = (f"{row.get('source')}: unreadable fields shown as missing ({', '.join(odd)}): "
                       "hand-edited or damaged")
    return row


def _latest_checkpoint(run_dir: Path) -> Path:
    from axs_lib.checkpoint import read_latest

    latest = read_latest(checkpoint_folder(run_dir))
    if latest is not None:
        return latest
    steps = step_checkpoints(run_dir)  # newest first
    if steps:
        return steps[0][1]
    raise InputError(run_dir, "no run.json and no checkpoints: not an experiment directory")


def _from_checkpoint(path: Path, trust: bool) -> dict:
    from axs_lib.checkpoint import load_noting_trust  # torch: only for runs without run.json

    ckpt, _ = load_noting_trust(path, trust=trust)
    ckpt = _dict(ckpt)
    return {
        "seed": _dict(ckpt.get("seed_info")).get("seed"),
        "status": None,
        "step": ckpt.get("step", ckpt.get("epoch")),
        "best": None,
        "data": _dict(ckpt.get("data_fingerprint")).get("sha256"),
        "environment": _dict(ckpt.get("environment")),
        "source": str(path),
    }


def run_is_live(run: Path) -> bool:
    """Whether a live process holds the run's lock (`axs_lib.run_dir.lock_is_held`)."""
    from axs_lib.run_dir import lock_is_held

    return lock_is_held(run)


def _mark_killed(row: dict, run: Path) -> None:
    """A manifest that says "running" for a run nobody runs: show it as killed, at its newest checkpoint."""
    try:
        steps = dict(step_checkpoints(run))
    except OSError:
        steps = {}
    row["status"] = "killed"
    row["step"] = max(steps) if steps else row["step"]
    killed = (f"run.json says running, but no process holds {run / LOCK}: the run was killed "
              f"or crashed; its newest checkpoint is step {row['step'] if steps else 'none'} "
              "(train again with --resume auto to continue)")
    row["note"] = f"{row['note']}; {killed}" if row.get("note") else killed


def describe_experiment(path: Path, *, trust: bool = False) -> dict:
    """The row ``axs runs`` shows for one experiment directory or checkpoint file."""
    if not path.exists():
        raise InputError(path, "no such file or directory")
    if path.is_dir() and os.path.lexists(path / RUN_JSON):
        row = _checked(_from_manifest(path))
        if row["status"] == "running" and not run_is_live(path):
            _mark_killed(row, path)
    else:
        row = _checked(_from_checkpoint(_latest_checkpoint(path) if path.is_dir() else path, trust))
    return {"experiment": str(path), **row}


def consistency_warnings(rows: list[dict]) -> list[str]:
    """Warnings when experiments used different seeds or data, or do not record them."""
    warnings = [f"{r['experiment']}: no seed info" for r in rows if r["seed"] is None]
    warnings += [f"{r['experiment']}: no data fingerprint" for r in rows if r["data"] is None]
    seeds = {r["seed"] for r in rows if r["seed"] is not None}
    data = {r["data"] for r in rows if r["data"] is not None}
    if len(seeds) > 1:
        warnings.append(f"different seeds used: {', '.join(map(str, sorted(seeds)))}")
    if len(data) > 1:
        warnings.append(f"different data used: {', '.join(sorted(d[:12] for d in data))}")
    return warnings


def _fmt_best(best: dict | None) -> str:
    if not best or best.get("value") is None:
        return "-"
    value = best["value"]
    value = f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
    return f"{best.get('metric') or 'best'}={value}@{best.get('step', '?')}"


def run(args: argparse.Namespace) -> int:
    from axs_lib.report import format_table

    rows = [describe_experiment(Path(p), trust=args.trust) for p in args.experiments]
    warnings = consistency_warnings(rows) if len(rows) > 1 else []
    if args.json:
        print(json.dumps({"experiments": rows, "config_differences": config_differences(rows), "warnings": warnings}, indent=2))
        return EXIT_OK
    differing = config_differences(rows) if len(rows) > 1 else []
    table = [
        (r["experiment"], str(r["seed"]), r["status"] or "-", str(r["step"]), _fmt_best(r["best"]),
         _fmt_duration(r.get("duration_s")), *(str((r.get("config") or {}).get(k, "-")) for k in differing),
         (r["data"] or "-")[:12], r["environment"] or "-")
        for r in rows
    ]
    header = ("experiment", "seed", "status", "step", "best", "duration", *differing, "data", "environment")
    print("\n".join(format_table(header, table)))
    for r in rows:
        if r.get("note"):
            print(f"note: {r['experiment']}: {r['note']}")
    for w in warnings:
        print(f"warning: {w}")
    seeds = {r["seed"] for r in rows}
    if len(rows) > 1 and not warnings:
        print(f"all experiments use seed {seeds.pop()} and the same data")
    return EXIT_OK
