"""Hostile and wrong input: one table, one line per case (invariants 4 and 7).

For every case: the expected exit status (2 for usage and input errors), exactly one line on
stderr that names the file or flag and the problem, no traceback, no code from a pickle run, and
no file that existed before (in the case's directory, the demo tiles or the shared run) deleted or
changed. Adding a case is adding a row to CASES.

Cases run in-process through ``axs_lib.cli.main`` (fast); the only helper process is the one that
holds a live run's lock, since POSIX record locks are per process.

"Unwritable output directory": we run as root, so permission bits and ``os.access`` say yes to
everything. The real ways used here are a path on a read-only filesystem (``/sys`` is sysfs,
mounted read-only: mkdir gives EPERM, opening a file EACCES, even for root) and a regular file in
the way of a parent directory (ENOTDIR).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from axs_lib.checkpoint import CHECKSUM_KEY, FORMAT_KEY, content_digest, load_checkpoint
from axs_lib.cli import main
from axs_lib.ingest import encode_tile
from axs_lib.tiles import S1_KEYS, S2_KEYS
from conftest import build_once, train_in_process

MARKER = "PWNED"  # the malicious pickles write this file if their payload ever runs


# --------------------------------------------------------------------------- the shared good run


@pytest.fixture(scope="module")
def base_run(demo_tiles, tmp_path_factory):
    """A finished 2-step run on the demo tiles (seed 42), copied by the cases that need one."""
    return build_once(tmp_path_factory, "bad_inputs_base", lambda out: train_in_process([
        "--data-dir", str(demo_tiles), "--output-dir", str(out), "--seed", "42", "--steps", "2", "--width", "8",
        "--batch-size", "2", "--checkpoint-every", "2", "--val-every", "2", "--no-plots", "--quiet", "--num-workers", "0"]))


@dataclass
class Ctx:
    tmp: Path
    tiles: Path
    base: Path
    cleanup: list

    def run(self) -> Path:
        """A copy of the finished run, at {tmp}/run."""
        shutil.copytree(self.base, self.tmp / "run", symlinks=True)
        return self.tmp / "run"


# --------------------------------------------------------------------------- setups


def good_arrays(size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {k: rng.uniform(-25, -5, (size, size)).astype(np.float32) for k in S1_KEYS}
    arrays |= {k: rng.integers(100, 5000, (size, size)).astype(np.uint16) for k in S2_KEYS}
    return arrays


def tile_set(*, raw: Callable[[], bytes] | None = None, change: dict | None = None, sidecar: str | None = None, n: int = 3):
    """Setup: {tmp}/bad holding ``n`` tiles t0.npz... that all carry one defect (so the first batch reads it)."""
    def setup(ctx: Ctx) -> None:
        d = ctx.tmp / "bad"
        d.mkdir()
        for i in range(n):
            arrays = good_arrays(seed=i)
            for key, value in (change or {}).items():
                if value is None:
                    del arrays[key]
                else:
                    arrays[key] = value
            (d / f"t{i}.npz").write_bytes(raw() if raw else encode_tile(arrays))
            if sidecar is not None:
                (d / f"t{i}.json").write_text(sidecar)
    return setup


def truncated() -> bytes:
    return encode_tile(good_arrays())[:700]


def nan_band():
    return np.full((16, 16), np.nan, np.float32)


def inf_band():
    band = good_arrays()["s1_vh"].copy()
    band[3, 4] = -np.inf
    return band


def object_array_tile(ctx: Ctx) -> None:
    tile_set()(ctx)
    arrays = good_arrays()
    arrays["s1_vv"] = np.array([{"x": 1}] * 4, dtype=object)
    with open(ctx.tmp / "bad" / "t0.npz", "wb") as f:
        np.savez(f, **arrays)
    for i in (1, 2):  # every tile bad, so the first batch reads one
        shutil.copy(ctx.tmp / "bad" / "t0.npz", ctx.tmp / "bad" / f"t{i}.npz")


def entries(**made: str):
    """Setup: {tmp}/bad with the named entries: 'dir', 'loop:<other>', 'link:<target>', 'good', or text."""
    def setup(ctx: Ctx) -> None:
        d = ctx.tmp / "bad"
        d.mkdir()
        for name, what in made.items():
            name = name.replace("__", ".")
            if what == "dir":
                (d / name).mkdir()
            elif what.startswith("link:"):
                os.symlink(what[5:], d / name)
            elif what == "good":
                (d / name).write_bytes(encode_tile(good_arrays()))
            else:
                (d / name).write_text(what)
    return setup


def nothing(ctx: Ctx) -> None:
    pass


def a_file(name: str, text: str = "not a directory\n"):
    def setup(ctx: Ctx) -> None:
        (ctx.tmp / name).write_text(text)
    return setup


def copy_run(ctx: Ctx) -> None:
    ctx.run()


def run_with_format(version: int):
    def setup(ctx: Ctx) -> None:
        run = ctx.run()
        path = run / "checkpoints" / "checkpoint_step_2.pt"
        ckpt = load_checkpoint(path)
        ckpt[FORMAT_KEY] = version
        ckpt[CHECKSUM_KEY] = content_digest({k: v for k, v in ckpt.items() if k != CHECKSUM_KEY})
        torch.save(ckpt, path)
    return setup


def damaged_checkpoint(how: str):
    def setup(ctx: Ctx) -> None:
        run = ctx.run()
        data = (run / "checkpoints" / "checkpoint_step_2.pt").read_bytes()
        target = ctx.tmp / "damaged.pt"
        if how == "truncated":
            target.write_bytes(data[: len(data) // 2])
        elif how == "flipped":  # a byte inside tensor data: the zip container does not notice, the checksum does
            ckpt = load_checkpoint(run / "checkpoints" / "checkpoint_step_2.pt")
            raw = bytearray(data)
            weight = next(v for v in ckpt["model_state_dict"].values() if v.numel() > 16)
            needle = weight.reshape(-1)[:4].numpy().tobytes()
            at = bytes(raw).index(needle)
            raw[at] ^= 0x40
            target.write_bytes(bytes(raw))
        elif how == "empty":
            target.write_bytes(b"")
    return setup


class Evil:
    """Unpickling this runs exec(), which writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def evil(zip_format: bool = True, *, also_good: bool = False, in_run: bool = False):
    """Setup: {tmp}/evil.pt, a checkpoint whose unpickling would run code; optionally {tmp}/good.pt too."""
    def setup(ctx: Ctx) -> None:
        if also_good or in_run:
            run = ctx.run()
            shutil.copy(run / "checkpoints" / "checkpoint_step_2.pt", ctx.tmp / "good.pt")
        obj = {"model_state_dict": {"w": torch.ones(2)}, "step": 2, "payload": Evil(ctx.tmp / MARKER)}
        torch.save(obj, ctx.tmp / "evil.pt", _use_new_zipfile_serialization=zip_format)
        if in_run:  # a second run directory whose step-2 checkpoint is the evil file
            shutil.copytree(ctx.tmp / "run", ctx.tmp / "run_evil", symlinks=True)
            shutil.copy(ctx.tmp / "evil.pt", ctx.tmp / "run_evil" / "checkpoints" / "checkpoint_step_2.pt")
    return setup


def live_lock(ctx: Ctx) -> None:
    """A copy of the run whose lock is held by another live process."""
    run = ctx.run()
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
            "os.ftruncate(fd, 0); os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0)\n"
            "print('locked', flush=True)\n"
            "time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    ctx.cleanup.append(holder)
    assert holder.stdout.readline().strip() == "locked"


def config_file(name: str, text: str):
    return a_file(name, text)


def run_and_config(text: str):
    """Setup: the copied run and a config file {tmp}/c.json."""
    def setup(ctx: Ctx) -> None:
        ctx.run()
        (ctx.tmp / "c.json").write_text(text)
    return setup


# --------------------------------------------------------------------------- argv helpers

TRAIN = ["train", "stage1", "--seed", "42", "--steps", "1", "--width", "8", "--batch-size", "2", "--no-plots",
         "--quiet", "--num-workers", "0"]


def T(*extra: str, data: str = "{tiles}", out: str = "{tmp}/out") -> list[str]:
    """A small training command on the demo tiles into {tmp}/out, with ``extra`` flags (later ones win)."""
    return [*TRAIN, "--data-dir", data, "--output-dir", out, *extra]


def TB(*extra: str) -> list[str]:
    """Training on the defective tile set {tmp}/bad."""
    return T(*extra, data="{tmp}/bad")


def R(*extra: str) -> list[str]:
    """Resume the copied run: only the flags given differ from what the checkpoint stores."""
    return ["train", "stage1", "--data-dir", "{tiles}", "--output-dir", "{tmp}/run", "--resume", "auto",
            "--no-plots", "--quiet", "--num-workers", "0", *extra]


BAD = "{tmp}/bad"
T0 = "{tmp}/bad/t0.npz"

# --------------------------------------------------------------------------- the corpus
# (id, setup, argv, exit status, what the line must name (file or flag), what it must say is wrong)
CASES = [
    # ---- pickles that would run code: refused, payload never runs (invariant 4)
    ("pickle-inspect-zip", evil(True), ["inspect", "{tmp}/evil.pt"], 2, "{tmp}/evil.pt", "can run code"),
    ("pickle-inspect-legacy", evil(False), ["inspect", "{tmp}/evil.pt"], 2, "{tmp}/evil.pt", "can run code"),
    ("pickle-inspect-json", evil(True), ["inspect", "{tmp}/evil.pt", "--json"], 2, "{tmp}/evil.pt", "--trust"),
    ("pickle-compare-first", evil(True, also_good=True), ["compare", "{tmp}/evil.pt", "{tmp}/good.pt"], 2, "{tmp}/evil.pt", "can run code"),
    ("pickle-compare-second", evil(False, also_good=True), ["compare", "{tmp}/good.pt", "{tmp}/evil.pt"], 2, "{tmp}/evil.pt", "can run code"),
    ("pickle-compare-runs", evil(True, in_run=True), ["compare", "{tmp}/run", "{tmp}/run_evil"], 2, "checkpoint_step_2.pt", "can run code"),
    ("pickle-resume-path", evil(True), T("--resume", "{tmp}/evil.pt"), 2, "{tmp}/evil.pt", "can run code"),
    ("pickle-resume-legacy", evil(False), T("--resume", "{tmp}/evil.pt"), 2, "{tmp}/evil.pt", "can run code"),
    # ---- damaged checkpoints
    ("ckpt-truncated-inspect", damaged_checkpoint("truncated"), ["inspect", "{tmp}/damaged.pt"], 2, "{tmp}/damaged.pt", "truncated"),
    ("ckpt-flipped-inspect", damaged_checkpoint("flipped"), ["inspect", "{tmp}/damaged.pt"], 2, "{tmp}/damaged.pt", "checksum mismatch"),
    ("ckpt-flipped-resume", damaged_checkpoint("flipped"), T("--resume", "{tmp}/damaged.pt"), 2, "{tmp}/damaged.pt", "checksum mismatch"),
    ("ckpt-empty-compare", damaged_checkpoint("empty"), ["compare", "{tmp}/damaged.pt", "{tmp}/run/checkpoints/checkpoint_step_2.pt"], 2, "{tmp}/damaged.pt", "empty file"),
    ("ckpt-missing-resume", nothing, T("--resume", "{tmp}/nope.pt"), 2, "{tmp}/nope.pt", "no such file"),
    ("ckpt-dir-inspect", entries(), ["inspect", "{tmp}/bad"], 2, "{tmp}/bad", "is a directory"),
    # ---- tiles (every tile in the set carries the defect, so the first batch reads one)
    ("tile-truncated", tile_set(raw=truncated), TB(), 2, "{tmp}/bad/t", "truncated"),
    ("tile-not-a-zip", tile_set(raw=lambda: b"GIF89a not a tile"), TB(), 2, "{tmp}/bad/t", "not an .npz"),
    ("tile-empty-file", tile_set(raw=lambda: b""), TB(), 2, "{tmp}/bad/t", "empty file"),
    ("tile-missing-band", tile_set(change={"s2_b8": None}), TB(), 2, "{tmp}/bad/t", "missing array 's2_b8'"),
    ("tile-wrong-shape", tile_set(change={"s2_b4": np.ones((8, 8), np.uint16)}), TB(), 2, "{tmp}/bad/t", "differ in shape"),
    ("tile-not-2d", tile_set(change={"s1_vv": np.zeros((2, 16, 16), np.float32)}), TB(), 2, "{tmp}/bad/t", "s1_vv is 3-D"),
    ("tile-sar-dtype", tile_set(change={"s1_vh": np.zeros((16, 16), np.float64)}), TB(), 2, "{tmp}/bad/t", "s1_vh has dtype float64"),
    ("tile-optical-dtype", tile_set(change={"s2_b2": np.zeros((16, 16), np.int32)}), TB(), 2, "{tmp}/bad/t", "s2_b2 has dtype int32"),
    ("tile-all-nan", tile_set(change={"s1_vv": nan_band()}), TB(), 2, "{tmp}/bad/t", "s1_vv is all NaN"),
    ("tile-inf", tile_set(change={"s1_vh": inf_band()}), TB(), 2, "{tmp}/bad/t", "infinite"),
    ("tile-object-array", object_array_tile, TB(), 2, "{tmp}/bad/t", "pickled object arrays"),
    ("tile-bad-in-worker", tile_set(raw=truncated), TB("--num-workers", "2"), 2, "{tmp}/bad/t", "truncated"),
    ("sidecar-bad-json", tile_set(sidecar='{"split": "train",'), TB(), 2, "{tmp}/bad/t", "invalid JSON in sidecar"),
    ("sidecar-not-object", tile_set(sidecar="[1, 2]"), TB(), 2, "{tmp}/bad/t", "JSON object"),
    ("sidecar-bad-split", tile_set(sidecar='{"split": "training"}'), TB(), 2, "{tmp}/bad/t", "'split' is \"training\""),
    ("sidecar-field-type", tile_set(sidecar='{"labels": "Pastures"}'), TB(), 2, "{tmp}/bad/t", "'labels' must be a list"),
    ("tiles-empty-dir", entries(), TB(), 2, BAD, "no .npz tiles found"),
    ("tiles-other-files", entries(readme__txt="hi", scene__tif="II*", arr__npy="x"), TB(), 2, BAD, "no .npz tiles found"),
    ("tiles-symlink-loop", entries(a__npz="link:b.npz", b__npz="link:a.npz", c__npz="good"), TB(), 2, "{tmp}/bad/a.npz", "symlink loop"),
    ("tiles-broken-symlink", entries(a__npz="link:gone.npz", b__npz="good", c__npz="good"), TB(), 2, "{tmp}/bad/a.npz", "broken symlink"),
    ("tiles-dir-named-npz", entries(a__npz="dir", b__npz="good", c__npz="good"), TB(), 2, "{tmp}/bad/a.npz", "not a regular file"),
    ("tiles-names-collide", entries(Tile__npz="good", tile__npz="good", x__npz="good"), TB(), 2, BAD, "differ only in letter case"),
    ("tiles-dir-missing", nothing, T(data="{tmp}/nowhere"), 2, "{tmp}/nowhere", "no such directory"),
    ("tiles-dir-is-file", a_file("tiles.txt"), T(data="{tmp}/tiles.txt"), 2, "{tmp}/tiles.txt", "not a directory"),
    ("tiles-validate-empty", entries(), ["tiles", "validate", BAD], 2, BAD, "no .npz tiles found"),
    # ---- arguments
    ("steps-zero", nothing, T("--steps", "0"), 2, "--steps", "positive integer, got 0"),
    ("abbreviated-flag", nothing, T("--no-plot"), 2, "--no-plot", "unrecognized arguments"),
    ("steps-negative", nothing, T("--steps", "-5"), 2, "--steps", "positive integer, got -5"),
    ("steps-not-a-number", nothing, T("--steps", "ten"), 2, "--steps", "not an integer: 'ten'"),
    ("seed-too-large", nothing, T("--seed", str(2**32)), 2, "--seed", "seed must be in [0, 4294967295]"),
    ("seed-negative", nothing, T("--seed", "-1"), 2, "--seed", "seed must be in"),
    ("seed-not-numeric", nothing, T("--seed", "forty-two"), 2, "--seed", "not an integer: 'forty-two'"),
    ("seed-float", nothing, T("--seed", "4.2"), 2, "--seed", "not an integer: '4.2'"),
    ("batch-zero", nothing, T("--batch-size", "0"), 2, "--batch-size", "positive integer, got 0"),
    ("batch-larger-than-data", nothing, T("--batch-size", "64"), 2, "--batch-size 64", "larger than the 3 training tiles"),
    ("max-tiles-zero", nothing, T("--max-tiles", "0"), 2, "--max-tiles", "positive integer, got 0"),
    ("width-negative", nothing, T("--width", "-8"), 2, "--width", "positive integer, got -8"),
    ("lr-nan", nothing, T("--lr", "nan"), 2, "--lr", "must be a finite number"),
    ("workers-negative", nothing, T("--num-workers", "-1"), 2, "--num-workers", "must be >= 0, got -1"),
    ("val-fraction-one", nothing, T("--val-fraction", "1"), 2, "--val-fraction", "between 0 and 1"),
    ("dropout-one", nothing, T("--dropout", "1.0"), 2, "--dropout", "[0, 1)"),
    ("device-unknown", nothing, T("--device", "tpu"), 2, "--device", "got 'tpu'"),
    ("es-metric-unknown", nothing, T("--es-metric", "accuracy"), 2, "--es-metric", "invalid choice: 'accuracy'"),
    ("flag-unknown", nothing, T("--learning-rate", "0.1"), 2, "--learning-rate", "unrecognized arguments"),
    ("compare-atol-negative", nothing, ["compare", "a.pt", "b.pt", "--atol", "-1"], 2, "--atol", "finite number >= 0"),
    ("output-is-a-file", a_file("out"), T(), 2, "{tmp}/out", "exists and is not a directory"),
    ("output-parent-is-a-file", a_file("afile"), T(out="{tmp}/afile/run"), 2, "{tmp}/afile/run", "cannot create output directory: Not a directory"),
    ("output-on-readonly-fs", nothing, T(out="/sys/axs-bad-inputs-run"), 2, "/sys/axs-bad-inputs-run", "cannot create output directory"),
    ("output-existing-readonly", nothing, T("--resume", "auto", out="/sys/kernel"), 2, "/sys/kernel", "not writable"),
    ("config-not-json", config_file("c.json", "{steps: 3"), T("--config", "{tmp}/c.json"), 2, "{tmp}/c.json", "does not parse"),
    ("config-not-toml", config_file("c.toml", "steps = = 3"), T("--config", "{tmp}/c.toml"), 2, "{tmp}/c.toml", "does not parse"),
    ("config-unknown-keys", config_file("c.json", '{"stepz": 3, "lr": 0.1}'), T("--config", "{tmp}/c.json"), 2, "{tmp}/c.json", "unknown config keys: stepz"),
    ("config-wrong-type", config_file("c.toml", 'steps = "ten"'), T("--config", "{tmp}/c.toml"), 2, "{tmp}/c.toml", "'steps' has the wrong type"),
    ("config-not-a-mapping", config_file("c.json", "[1, 2]"), T("--config", "{tmp}/c.json"), 2, "{tmp}/c.json", "mapping"),
    ("config-missing", nothing, T("--config", "{tmp}/none.toml"), 2, "{tmp}/none.toml", "not found"),
    ("config-bad-value", config_file("c.json", '{"accum_steps": 0}'), T("--config", "{tmp}/c.json"), 2, "--accum-steps", "positive integer, got 0"),
    # ---- runs
    ("used-dir-no-resume", copy_run, T(out="{tmp}/run"), 2, "{tmp}/run", "not empty"),
    ("live-lock", live_lock, R(), 2, "{tmp}/run", "another run (pid"),
    ("resume-other-seed", copy_run, R("--seed", "43"), 2, "checkpoint_step_2.pt", "seed: checkpoint 42, now 43"),
    ("resume-other-tiles", copy_run, R("--max-tiles", "5"), 2, "checkpoint_step_2.pt", "tile set: checkpoint 6 tiles"),
    ("resume-other-config", copy_run, R("--lr", "0.01"), 2, "checkpoint_step_2.pt", "lr: checkpoint 0.001, now 0.01"),
    ("resume-other-format", run_with_format(99), R(), 2, "checkpoint_step_2.pt", "checkpoint format: checkpoint 99"),
    ("resume-other-config-file", run_and_config('{"width": 16}'), R("--config", "{tmp}/c.json"), 2, "checkpoint_step_2.pt", "width: checkpoint 8, now 16"),
]


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (symlinks by their target, never followed); ``.lock`` left out:
    it is the lock, and a run that takes it writes its pid there."""
    seen = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
                path = os.path.join(folder, name)
                if name == ".lock":
                    continue
                if os.path.islink(path):
                    seen[path] = "symlink:" + os.readlink(path)
                else:
                    with open(path, "rb") as f:
                        seen[path] = hashlib.sha256(f.read()).hexdigest()
    return seen


def _fill(text: str, ctx: Ctx) -> str:
    return text.replace("{tmp}", str(ctx.tmp)).replace("{tiles}", str(ctx.tiles)).replace("{base}", str(ctx.base))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, demo_tiles, base_run, capsys, monkeypatch):
    case_id, setup, argv, code, names, problem = case
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp_path, demo_tiles, base_run, [])
    try:
        setup(ctx)
        before = snapshot(tmp_path, demo_tiles, base_run)
        capsys.readouterr()
        status = main([_fill(a, ctx) for a in argv])
        out, err = capsys.readouterr()
        after = snapshot(tmp_path, demo_tiles, base_run)
    finally:
        for proc in ctx.cleanup:
            proc.kill()
            proc.wait()
    assert status == code, f"{case_id}: exit {status}, stderr: {err}"
    assert "Traceback" not in err + out
    assert err.endswith("\n") and err.count("\n") == 1, f"{case_id}: not exactly one line on stderr: {err!r}"
    assert _fill(names, ctx) in err and problem in err, f"{case_id}: {err!r}"
    assert not (tmp_path / MARKER).exists(), f"{case_id}: the pickle's payload ran"
    lost = {p: "deleted" if p not in after else "changed" for p in before if after.get(p) != before[p]}
    assert not lost, f"{case_id}: pre-existing files touched: {lost}"


def test_the_corpus_is_large_and_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


def test_trust_is_the_only_way_in_and_the_payload_is_real(tmp_path, capsys):
    """The negative proof above means something only if the payload does run once trusted."""
    evil(True)(Ctx(tmp_path, tmp_path, tmp_path, []))
    assert main(["inspect", str(tmp_path / "evil.pt"), "--trust"]) == 0
    assert (tmp_path / MARKER).read_text() == "pwned"
    out = capsys.readouterr().out
    assert "NO: only with --trust" in out and "loading with trust: unpickling may run code" in out
