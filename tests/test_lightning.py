"""The Lightning integration: a ``Trainer`` with `ExactResume` is as exact as our own trainer.

The Stage-1 example (``examples/lightning_stage1.py``) runs in-process on eight synthetic 32 x 32
tiles (seven train, one validates), width 4, 12 steps, a checkpoint every 4, with Lightning's CSV
logger, progress bar and validation every 2 steps on; only the SIGKILL and SIGTERM tests (the signal is the point) and the runs on two devices
(Lightning starts the second rank as a copy of the command) start a subprocess. A tiny model on random vectors shows, side by side and in a few seconds, that plain
Lightning differs after a mid-epoch resume and that the same module with `ExactResume` does not.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from axs_lib.cli import main as axs_main  # noqa: E402
from axs_lib.errors import UsageError  # noqa: E402
from axs_lib.ingest import write_synthetic_tiles  # noqa: E402
from axs_lib.lightning import RUN_MARK, AxsCheckpointIO, ExactResume, expand, portable, resumable_loader  # noqa: E402
from conftest import import_file  # noqa: E402
from doc_blocks import parse_blocks, run_shell  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "lightning_stage1.py"
STEPS, EVERY = 12, 4


def _example():
    return import_file(EXAMPLE, "lightning_stage1_example")


def _args(tiles: Path, out: Path, workers: int, *extra: str) -> list[str]:
    return ["--data-dir", str(tiles), "--output-dir", str(out), "--seed", "7", "--steps", str(STEPS),
            "--checkpoint-every", str(EVERY), "--num-workers", str(workers), "--width", "4", "--batch-size", "3",
            "--accelerator", "cpu", "--val-every", "2", "--log-every", "2", *extra]


def _digests(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "checkpoints").glob("*.pt"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiles, and two uninterrupted runs of the example: 0 and 2 workers."""
    root = tmp_path_factory.mktemp("lightning")
    tiles = root / "tiles"
    write_synthetic_tiles(tiles, 8, 32, seed=3)
    example = _example()
    for name, workers in (("a", 0), ("b", 2)):
        assert example.main(_args(tiles, root / name, workers)) == 0
    return root, tiles, example


# --------------------------------------------------------------------------- the Stage-1 example


def test_runs_with_0_and_2_workers_write_byte_identical_checkpoints(runs, capsys):
    root, _, _ = runs
    a, b = _digests(root / "a"), _digests(root / "b")
    assert sorted(a) == [f"checkpoint_step_{s}.pt" for s in (12, 4, 8)]
    assert a == b
    assert (root / "a" / "checkpoints" / "latest").read_text().strip() == "checkpoint_step_12.pt"
    capsys.readouterr()
    assert axs_main(["compare", str(root / "a"), str(root / "b")]) == 0
    assert "identical bytes" in capsys.readouterr().out


def test_rerun_into_another_directory_is_byte_identical_and_a_resume_with_nothing_to_resume_says_so(runs, capsys):
    root, tiles, example = runs
    capsys.readouterr()
    assert example.main(_args(tiles, root / "rerun", 0, "--steps", str(EVERY), "--resume", "auto")) == 0
    assert f"no checkpoint in {root / 'rerun' / 'checkpoints'}: starting from step 0" in capsys.readouterr().err
    assert _digests(root / "rerun")["checkpoint_step_4.pt"] == _digests(root / "a")["checkpoint_step_4.pt"]


def test_logger_progress_bar_and_validation_do_not_change_the_bytes(runs):
    """Runs a and b logged to CSV, showed the progress bar and validated every 2 steps (after the
    checkpoints of steps 4, 8 and 12 too); a run with none of them writes the same bytes."""
    root, tiles, example = runs
    with open(root / "a" / "lightning_logs" / "version_0" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["step"] for r in rows if r.get("val_loss")] == ["1", "3", "5", "7", "9", "11"]  # Lightning counts from 0
    assert len([r for r in rows if r.get("train_loss")]) == STEPS // 2
    assert example.main(_args(tiles, root / "quiet", 0, "--no-validation", "--no-logger", "--no-progress-bar")) == 0
    assert not (root / "quiet" / "lightning_logs").exists()
    assert _digests(root / "quiet") == _digests(root / "a")


def test_a_tile_held_out_for_test_is_never_read(runs, tmp_path, capsys):
    """A ninth tile whose sidecar says ``test`` and whose data is not a tile at all: reading it would
    fail. The run trains on the other eight's split, so its checkpoint is run a's."""
    root, tiles, example = runs
    mixed = tmp_path / "tiles"
    shutil.copytree(tiles, mixed)
    sidecar = json.loads((mixed / "synth_00000.json").read_text())
    (mixed / "synth_99999.json").write_text(json.dumps({**sidecar, "split": "test"}))
    (mixed / "synth_99999.npz").write_bytes(b"not a tile")
    capsys.readouterr()
    assert example.main(_args(mixed, tmp_path / "run", 0, "--steps", str(EVERY), "--no-progress-bar")) == 0
    assert "7 train / 1 val tiles; 1 tile held out for test" in capsys.readouterr().err
    assert _digests(tmp_path / "run")["checkpoint_step_4.pt"] == _digests(root / "a")["checkpoint_step_4.pt"]


def test_every_checkpoint_loads_weights_only_and_holds_no_path_of_the_run(runs):
    root, tiles, _ = runs
    for path in sorted((root / "a" / "checkpoints").glob("*.pt")):
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["step"] == int(path.stem.rsplit("_", 1)[1])
        assert checkpoint["seed_info"]["seed"] == 7 and checkpoint["world_size"] == 1
        strings = []
        _strings(checkpoint, strings)
        assert not [s for s in strings if str(root) in s or str(tiles) in s], path


def _strings(obj, found: list) -> None:
    if isinstance(obj, str):
        found.append(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _strings(key, found)
            _strings(value, found)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _strings(value, found)


# A kill at a random moment is the soak's (make soak); inside a checkpoint write is the harder case.
@pytest.mark.parametrize("moment", [pytest.param("random", marks=pytest.mark.slow), "during_a_checkpoint_write"])
def test_sigkill_with_workers_then_resume_with_other_worker_count_is_byte_identical(runs, tmp_path, moment):
    """Killed with 2 workers (the whole process group) and resumed with 0.

    ``random``: a random moment after the first checkpoint; the last checkpoint's write is held
    back (``AXS_FAULT=stop``), so however fast the machine the kill lands before the run is done.
    ``during_a_checkpoint_write``: the process kills itself with step 8's temp file half written.
    """
    root, tiles, example = runs
    out = tmp_path / "killed"
    delay = random.Random().uniform(0.0, 1.0)
    fault = "stop:checkpoint_step_12.pt" if moment == "random" else "kill:checkpoint_step_8.pt"
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), *_args(tiles, out, 2)], cwd=REPO, start_new_session=True,
                            env={**os.environ, "AXS_FAULT": fault}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "checkpoint_step_4.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if moment == "random":
        time.sleep(delay)
    else:
        proc.wait(timeout=300)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its workers
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert first.exists() and not (out / "checkpoints" / "checkpoint_step_12.pt").exists(), err.decode()[-2000:]
    assert example.main(_args(tiles, out, 0, "--resume", "auto")) == 0
    assert _digests(out) == _digests(root / "a"), f"{moment} kill, {delay:.2f} s after the first checkpoint"


def test_resume_from_the_middle_of_an_epoch_with_one_worker_is_byte_identical(runs, tmp_path):
    root, tiles, example = runs
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(root / "a" / "checkpoints" / "checkpoint_step_4.pt", out / "checkpoints")  # 4 x 3 of 8 tiles: mid-epoch
    (out / "checkpoints" / "latest").write_text("checkpoint_step_4.pt\n")
    assert example.main(_args(tiles, out, 1, "--resume", "auto")) == 0
    assert _digests(out) == _digests(root / "a")


def test_resume_with_another_seed_or_config_is_refused_naming_the_difference(runs, tmp_path, capsys):
    root, tiles, example = runs
    out = tmp_path / "other"
    shutil.copytree(root / "a", out)
    before = _digests(out)
    capsys.readouterr()
    argv = _args(tiles, out, 0, "--resume", "auto")
    assert example.main([*argv[:4], "--seed", "8", *argv[6:]]) == 2
    assert "cannot resume exactly: seed: checkpoint 7, now 8" in capsys.readouterr().err
    assert example.main([*argv, "--lr", "0.01"]) == 2
    assert "lr: checkpoint 0.001, now 0.01" in capsys.readouterr().err
    assert _digests(out) == before


def test_a_second_run_into_a_directory_with_checkpoints_is_refused(runs, capsys):
    root, tiles, example = runs
    before = _digests(root / "a")
    assert example.main(_args(tiles, root / "a", 0)) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert _digests(root / "a") == before


def test_bad_flags_and_a_missing_tile_folder_are_one_line_exit_2_and_create_nothing(runs, tmp_path, capsys):
    _, tiles, example = runs
    out = tmp_path / "new"
    capsys.readouterr()
    assert example.main(_args(tmp_path / "no-tiles", out, 0)) == 2
    err = capsys.readouterr().err
    assert "no-tiles" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert example.main(_args(tiles, out, -1)) == 2
    assert "--num-workers must be >= 0" in capsys.readouterr().err
    assert example.main([*_args(tiles, out, 0), "--val-fraction", "1"]) == 2
    assert "--val-fraction must be between 0 and 1 (exclusive), got 1.0" in capsys.readouterr().err
    assert example.main([*_args(tiles, out, 0), "--resume", "latest"]) == 2
    assert not out.exists()


@pytest.mark.slow
def test_the_docs_kill_and_resume_waits_for_the_first_checkpoint_and_resumes_to_the_same_bytes(tmp_path):
    """docs/lightning.md's two shell blocks of the example, as written, on eight synthetic tiles: the
    SIGKILL lands after the first checkpoint and before the run's end (a fixed wait could land
    before the first checkpoint, or after the end), and the resumed run matches the others."""
    blocks = [b for b in parse_blocks(REPO / "docs" / "lightning.md") if b.is_shell and "runs/pl" in b.code]
    assert len(blocks) == 2 and "--resume auto" in blocks[1].code
    write_synthetic_tiles(tmp_path / "tiles", 8, 32, seed=3)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    proc = run_shell("set -e -o pipefail\n" + blocks[0].code + blocks[1].code, tmp_path, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from runs/pl3/checkpoints/checkpoint_step_" in out and "the run had already finished" not in out
    assert out.count("done: 20 steps") == 3, out[-3000:]  # pl1, pl2 and the resumed pl3; the killed one never ended
    assert out.count("verdict: IDENTICAL BYTES") == 2, out[-3000:]


@pytest.mark.slow
def test_the_docs_global_batch_block_writes_the_same_bytes_on_one_and_two_devices(tmp_path):
    """docs/lightning.md's global-batch block, as written, on eight synthetic tiles."""
    blocks = [b for b in parse_blocks(REPO / "docs" / "lightning.md") if b.is_shell and "--global-batch-size" in b.code]
    assert len(blocks) == 1 and "--devices 2" in blocks[0].code
    write_synthetic_tiles(tmp_path / "tiles", 8, 32, seed=3)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    proc = run_shell("set -e -o pipefail\n" + blocks[0].code, tmp_path, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("done: 20 steps") == 2 and "verdict: IDENTICAL BYTES" in out, out[-3000:]


# --------------------------------------------------------------------------- plain Lightning vs ExactResume


class _Tiny(pl.LightningModule):
    """Linear -> dropout -> linear on ten random vectors, batch 3: dropout and shuffling both matter."""

    def __init__(self, exact: bool):
        super().__init__()
        self.exact = exact
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        self.data = list(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)))

    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        if self.exact:
            return resumable_loader(self.data, 3, seed=5, trainer=self.trainer, num_workers=self.workers)
        return torch.utils.data.DataLoader(self.data, batch_size=3, shuffle=True, num_workers=self.workers)


def _tiny_fit(out: Path, exact: bool, workers: int, steps: int, ckpt_path: str | None = None, every: int = 5) -> dict:
    pl.seed_everything(0, workers=True, verbose=False)
    module = _Tiny(exact)
    module.workers = workers
    common = dict(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, deterministic=True, logger=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    if exact:
        callback = ExactResume(out, seed=5, checkpoint_every=every, environment=False)
        trainer = pl.Trainer(callbacks=[callback], plugins=[callback.checkpoint_io], enable_checkpointing=False, **common)
    else:
        saver = pl.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=5, save_top_k=-1,
                                             filename="step{step}", auto_insert_metric_name=False)
        trainer = pl.Trainer(callbacks=[saver], **common)
    trainer.fit(module, ckpt_path=ckpt_path)
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_plain_lightning_differs_after_a_mid_epoch_resume_and_exact_resume_does_not(tmp_path):
    plain_full = _tiny_fit(tmp_path / "plain", exact=False, workers=0, steps=10)
    plain_resumed = _tiny_fit(tmp_path / "plain2", exact=False, workers=0, steps=10,
                              ckpt_path=str(tmp_path / "plain" / "checkpoints" / "step5.ckpt"))
    assert not _same(plain_full, plain_resumed)

    exact_full = _tiny_fit(tmp_path / "exact", exact=True, workers=0, steps=10)
    resumed_dir = tmp_path / "exact2"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "exact" / "checkpoints" / "checkpoint_step_5.pt", resumed_dir / "checkpoints")
    exact_resumed = _tiny_fit(resumed_dir, exact=True, workers=2, steps=10,
                              ckpt_path=str(resumed_dir / "checkpoints" / "checkpoint_step_5.pt"))
    assert _same(exact_full, exact_resumed)
    assert _digests(resumed_dir)["checkpoint_step_10.pt"] == _digests(tmp_path / "exact")["checkpoint_step_10.pt"]


def test_exact_resume_from_an_epoch_boundary_with_workers_is_byte_identical(tmp_path):
    full = _tiny_fit(tmp_path / "exact", exact=True, workers=0, steps=10, every=4)  # 4 batches per epoch
    resumed_dir = tmp_path / "exact2"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "exact" / "checkpoints" / "checkpoint_step_4.pt", resumed_dir / "checkpoints")
    resumed = _tiny_fit(resumed_dir, exact=True, workers=2, steps=10, every=4,
                        ckpt_path=str(resumed_dir / "checkpoints" / "checkpoint_step_4.pt"))
    assert _same(full, resumed)
    assert _digests(resumed_dir) == _digests(tmp_path / "exact")


def test_plain_lightning_checkpoints_hold_the_absolute_directory(tmp_path):
    _tiny_fit(tmp_path / "plain", exact=False, workers=0, steps=5)
    raw = (tmp_path / "plain" / "checkpoints" / "step5.ckpt").read_bytes()
    assert str(tmp_path).encode() in raw  # ModelCheckpoint's dirpath: why two directories never match


def test_a_fit_with_workers_leaves_no_worker_process_behind(tmp_path):
    """Lightning's trainer holds the loader in reference cycles; ExactResume stops the workers at
    teardown, so the cycle collector never meets live workers (each would cost a 5 s join timeout
    and then ignore the SIGTERM that follows)."""
    before = set(multiprocessing.active_children())
    _tiny_fit(tmp_path / "exact", exact=True, workers=2, steps=4, every=4)
    assert [child for child in multiprocessing.active_children() if child not in before] == []


def test_a_hand_passed_checkpoint_of_another_seed_is_refused(tmp_path):
    _tiny_fit(tmp_path / "exact", exact=True, workers=0, steps=5)
    pl.seed_everything(0, verbose=False)
    module = _Tiny(exact=True)
    module.workers = 0
    callback = ExactResume(tmp_path / "other", seed=6, environment=False)
    trainer = pl.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[callback],
                         plugins=[callback.checkpoint_io])
    with pytest.raises(UsageError, match="cannot resume exactly: seed: checkpoint 5, now 6"):
        trainer.fit(module, ckpt_path=str(tmp_path / "exact" / "checkpoints" / "checkpoint_step_5.pt"))


def test_training_with_a_plain_dataloader_or_without_the_plugin_is_refused(tmp_path):
    module = _Tiny(exact=False)
    module.workers = 0
    callback = ExactResume(tmp_path, seed=5, environment=False)
    common = dict(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, callbacks=[callback])
    with pytest.raises(UsageError, match="ResumableLoader"):
        pl.Trainer(plugins=[callback.checkpoint_io], **common).fit(module)
    module.exact = True
    with pytest.raises(UsageError, match="plugins=\\[exact.checkpoint_io\\]"):
        pl.Trainer(**common).fit(module)
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------- the plugin and portable content


def test_checkpoint_io_writes_the_same_bytes_from_two_directories_and_restores_their_paths(tmp_path):
    from lightning.fabric.utilities.data import AttributeDict

    files = []
    for name in ("one", "two"):
        run = tmp_path / name
        content = {"hyper_parameters": AttributeDict(width=4), "dirpath": str(run / "lightning"),
                   "best_k_models": {str(run / "x.ckpt"): torch.tensor(1.0)}, "other": "/elsewhere/x", "w": torch.ones(3)}
        io = AxsCheckpointIO(run)
        io.save_checkpoint(content, run / "checkpoints" / "checkpoint_step_3.pt")
        io.save_checkpoint(content, run / "lightning" / "epoch=0.ckpt")  # a name of ModelCheckpoint's
        files.append(run / "checkpoints" / "checkpoint_step_3.pt")
        loaded = io.load_checkpoint(run / "lightning" / "epoch=0.ckpt")
        assert loaded["dirpath"] == str(run / "lightning") and str(run / "x.ckpt") in loaded["best_k_models"]
        assert loaded["other"] == "/elsewhere/x" and type(loaded["hyper_parameters"]) is dict
        assert (run / "checkpoints" / "latest").read_text().strip() == "checkpoint_step_3.pt"
    assert files[0].read_bytes() == files[1].read_bytes()
    stored = torch.load(files[0], weights_only=True)
    assert stored["dirpath"] == f"{RUN_MARK}{os.sep}lightning"


def test_portable_leaves_paths_that_only_share_a_prefix_with_the_run(tmp_path):
    run = tmp_path / "run"
    assert portable({"a": str(tmp_path / "run2" / "f"), "b": str(run)}, run) == {"a": str(tmp_path / "run2" / "f"), "b": RUN_MARK}
    assert expand({"b": RUN_MARK, "c": RUN_MARK + "x"}, run) == {"b": str(run), "c": RUN_MARK + "x"}


def test_without_lightning_the_module_names_the_extra_and_the_package_still_imports():
    code = (
        "import sys, importlib, pkgutil\n"
        "for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning'):\n"
        "    sys.modules[name] = None\n"
        "import axs_lib\n"
        "for info in pkgutil.walk_packages(axs_lib.__path__, 'axs_lib.'):\n"
        "    if info.name != 'axs_lib.lightning':\n"
        "        importlib.import_module(info.name)\n"
        "try:\n"
        "    import axs_lib.lightning\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pip install 'axs-lib[lightning]'" in proc.stdout


# --------------------------------------------------------------------------- stop signals, refusals, hostile state


def _stop_with_sigterm(args: list[str], env: dict | None = None) -> tuple[int, str]:
    """Start the example, SIGTERM its process group once checkpoint_step_4.pt exists (step 8's write
    held 3 s, so the signal lands before the run ends); (stopped step, stderr)."""
    out = Path(args[args.index("--output-dir") + 1])
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), *args], cwd=REPO, start_new_session=True,
                            env={**(env or os.environ), "AXS_FAULT": "slow:checkpoint_step_8.pt"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = out / "checkpoints" / "checkpoint_step_4.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)  # no hang at exit: the workers ignore SIGTERM, ExactResume stops them
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-2000:]
    steps = {int(part.split(":")[0]) for part in err.split("stopped by SIGTERM at step ")[1:]}
    assert len(steps) == 1 and 4 <= min(steps) <= 8, err[-2000:]  # one step for every rank
    stopped = steps.pop()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"checkpoint_step_{stopped}.pt"
    return stopped, err


def test_sigterm_to_the_process_group_checkpoints_the_step_reached_exits_143_and_resumes_exactly(runs, tmp_path):
    """As Slurm stops a job: SIGTERM to the trainer and its 2 workers, wherever it lands in steps 5-8."""
    root, tiles, example = runs
    out = tmp_path / "stopped"
    _stop_with_sigterm(_args(tiles, out, 2))
    assert example.main(_args(tiles, out, 0, "--resume", "auto")) == 0
    reference = _digests(root / "a")
    assert {k: v for k, v in _digests(out).items() if k in reference} == reference


# --------------------------------------------------------------------------- several devices (DDP, gloo on CPU)
# The example on 2 devices: Lightning starts rank 1 as a copy of the command, so these runs are
# subprocesses, with one intra-op thread each (Lightning would give each of 2 ranks half the cores,
# and the thread count is part of the result). Without DataLoader workers: on Python <= 3.11 a
# worker forked in a rank whose gloo threads run can hang at start (docs/lightning.md).

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run_example(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=ONE_THREAD)


@pytest.fixture(scope="module")
def two_devices(runs):
    """An uninterrupted run of the example on 2 devices (Lightning's DDP: each rank its own shard)."""
    root, tiles, _ = runs
    out = root / "dev2"
    proc = _run_example(_args(tiles, out, 0, "--devices", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_two_devices_train_other_weights_than_one_device_and_rank_0_speaks_for_both(runs, two_devices, tmp_path):
    _, tiles, _ = runs
    out, first = two_devices
    assert sorted(_digests(out)) == [f"checkpoint_step_{s}.pt" for s in (12, 4, 8)]
    two = torch.load(out / "checkpoints" / "checkpoint_step_12.pt", weights_only=True)
    assert two["world_size"] == 2
    # one device, the same flags and thread count: other weights (each rank draws its own batches
    # and seeds, and DDP averages two gradients where one device computes one): the reason for
    # global batches, and the control that the global-batch test below can fail
    assert _run_example(_args(tiles, tmp_path / "one", 0)).returncode == 0
    one = torch.load(tmp_path / "one" / "checkpoints" / "checkpoint_step_12.pt", weights_only=True)
    assert not all(torch.equal(one["state_dict"][k], two["state_dict"][k]) for k in two["state_dict"])
    assert first.stdout.count("done: 12 steps") == 1 and first.stderr.count("train / 1 val tiles") == 1


@pytest.mark.slow  # the global-batch test below stops a 2-device run by SIGTERM in every `make test`
def test_sigterm_to_the_process_group_of_a_two_device_run_stops_both_ranks_at_one_step_and_resumes_exactly(
        runs, two_devices, tmp_path):
    """Slurm's stop for a 2-rank job: both ranks stop at one step, rank 0 writes its checkpoint,
    exit 143; a resume on 2 devices ends in the uninterrupted run's bytes."""
    _, tiles, _ = runs
    out = tmp_path / "stopped"
    _stop_with_sigterm(_args(tiles, out, 0, "--devices", "2"), ONE_THREAD)
    resumed = _run_example(_args(tiles, out, 0, "--devices", "2", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = _digests(two_devices[0])
    assert {k: v for k, v in _digests(out).items() if k in reference} == reference


def test_a_two_device_checkpoint_on_one_device_is_refused_in_one_line_before_anything_is_written(runs, two_devices, tmp_path):
    _, tiles, _ = runs
    out = tmp_path / "moved"
    shutil.copytree(two_devices[0] / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "checkpoint_step_12.pt").unlink()
    (out / "checkpoints" / "latest").unlink()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = _run_example(_args(tiles, out, 0, "--resume", "auto"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint_step_8.pt: cannot resume exactly: world size: checkpoint 2, now 1" in lines[0], proc.stderr
    assert "--allow-world-size-change" in lines[0]  # a flag the example has
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.slow
def test_allow_world_size_change_continues_a_two_device_checkpoint_on_one_device_to_the_end(runs, two_devices, tmp_path):
    _, tiles, example = runs
    out = tmp_path / "moved"
    shutil.copytree(two_devices[0] / "checkpoints", out / "checkpoints")
    for name in ("checkpoint_step_12.pt", "latest"):
        (out / "checkpoints" / name).unlink()
    assert example.main(_args(tiles, out, 2, "--resume", "auto", "--allow-world-size-change")) == 0
    resumed = torch.load(out / "checkpoints" / "checkpoint_step_12.pt", weights_only=True)
    assert resumed["step"] == 12 and resumed["world_size"] == 1


def test_a_batch_larger_than_each_ranks_share_of_the_tiles_is_one_line_exit_2(runs, tmp_path, capsys):
    _, tiles, example = runs
    args = _args(tiles, tmp_path / "big", 0, "--devices", "2")
    args[args.index("--batch-size") + 1] = "5"  # 7 training tiles: 4 per rank
    assert example.main(args) == 2
    assert "--batch-size 5 is larger than the 4 training tiles each of the 2 ranks gets of the 7" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


# Global batches (--global-batch-size): 2 tiles per step in micro-batches of 1, summed in one tree;
# 7 training tiles make 3 steps an epoch, so a stop at step 4-8 is mostly in the middle of one.


def _global_args(tiles: Path, out: Path, *extra: str) -> list[str]:
    args = _args(tiles, out, 0, "--global-batch-size", "2", *extra)
    args[args.index("--batch-size") + 1] = "1"
    return args


@pytest.fixture(scope="module")
def global_batch_runs(runs):
    """Uninterrupted runs with a global batch of 2 in micro-batches of 1: on one device and on two."""
    root, tiles, _ = runs
    for name, devices in (("g1", "1"), ("g2", "2")):
        proc = _run_example(_global_args(tiles, root / name, "--devices", devices))
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "g1", root / "g2"


def test_a_global_batch_writes_the_same_bytes_on_one_and_on_two_devices(global_batch_runs):
    one, two = global_batch_runs
    reference = _digests(one)
    assert sorted(reference) == [f"checkpoint_step_{s}.pt" for s in (12, 4, 8)]
    assert _digests(two) == reference
    checkpoint = torch.load(two / "checkpoints" / "checkpoint_step_12.pt", weights_only=True)
    assert checkpoint["global_batch_size"] == 2 and checkpoint["micro_batch_size"] == 1 and "world_size" not in checkpoint


def test_a_global_batch_run_stopped_on_two_devices_resumes_on_one_device_to_the_same_bytes(runs, global_batch_runs, tmp_path):
    """The run moves: SIGTERM to a 2-device job's process group, then `--resume auto` on one device."""
    _, tiles, _ = runs
    out = tmp_path / "moved"
    _stop_with_sigterm(_global_args(tiles, out, "--devices", "2"), ONE_THREAD)
    resumed = _run_example(_global_args(tiles, out, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = _digests(global_batch_runs[0])
    assert {k: v for k, v in _digests(out).items() if k in reference} == reference


def test_a_global_batch_the_devices_cannot_share_or_a_checkpoint_without_one_is_one_line_exit_2(
        runs, global_batch_runs, tmp_path, capsys):
    _, tiles, example = runs
    args = _global_args(tiles, tmp_path / "three", "--devices", "2")
    args[args.index("--global-batch-size") + 1] = "3"
    assert example.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 ranks cannot share 3 micro-batches per step exactly" in err[0], err
    assert not (tmp_path / "three").exists()
    out = tmp_path / "sharded"
    shutil.copytree(global_batch_runs[1] / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "checkpoint_step_12.pt").unlink()
    (out / "checkpoints" / "latest").unlink()
    assert example.main(_args(tiles, out, 0, "--resume", "auto")) == 2
    assert "global batch: checkpoint 2, now none (steps sharded by rank)" in capsys.readouterr().err


class _TinyTree(_Tiny):
    """`_Tiny` with global batches of 4 in micro-batches of 2, stepped through `ExactResume.backward`."""

    def __init__(self, exact_resume: ExactResume, sharded_loader: bool = False):
        super().__init__(exact=True)
        self.exact_resume, self.sharded_loader = exact_resume, sharded_loader
        self.automatic_optimization = False
        self.workers = 0

    def training_step(self, batch, batch_idx):
        loss = self.exact_resume.backward(self, batch, lambda micro: self.net(micro).pow(2).mean())
        self.optimizers().step()
        return loss

    def train_dataloader(self):
        if self.sharded_loader:
            return resumable_loader(self.data, 2, seed=5, trainer=self.trainer)
        return resumable_loader(self.data, 2, seed=5, trainer=self.trainer, global_batch_size=4, num_workers=self.workers)


def _tree_fit(out: Path, steps: int, ckpt_path: str | None = None, global_batch_size: int | None = 4, workers: int = 0,
              module_cls: type = _TinyTree, **module_kwargs) -> dict:
    """Fit ``module_cls`` (a `_TinyTree`) with global batches; the trained state dict."""
    exact = ExactResume(out, seed=5, checkpoint_every=3, environment=False, global_batch_size=global_batch_size)
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, deterministic=True, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[exact], plugins=[exact.checkpoint_io])
    torch.manual_seed(0)  # the initial weights
    module = module_cls(exact, **module_kwargs)
    module.workers = workers
    trainer.fit(module, ckpt_path=ckpt_path)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_a_step_loader_hands_out_each_step_as_this_ranks_micro_batches_and_counts_whole_steps():
    data = list(range(10))
    one = resumable_loader(data, 2, seed=5, global_batch_size=4)
    steps = list(one)
    assert len(one) == len(steps) == 2  # 10 samples: two whole steps of 4 per epoch
    assert all(len(step) == 2 and all(len(micro) == 2 for micro in step) for step in steps)
    assert one.state_dict()["epoch"] == 1 and one.state_dict()["position"] == 0
    # two ranks: each gets one of the two micro-batches of the same global batch
    ranks = [resumable_loader(data, 2, seed=5, global_batch_size=4, trainer=_FakeTrainer(rank, 2)) for rank in (0, 1)]
    halves = [list(loader) for loader in ranks]
    assert [[m.tolist() for m in (*a, *b)] for a, b in zip(*halves)] == [[m.tolist() for m in step] for step in steps]
    assert all(loader.state_dict() == one.state_dict() for loader in ranks)


class _FakeTrainer:
    def __init__(self, rank: int, world: int):
        self.global_rank, self.world_size = rank, world


def test_global_batch_steps_resume_exactly_from_a_checkpoint_and_differ_from_other_micro_batches(tmp_path):
    full = _tree_fit(tmp_path / "full", 6)
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint_step_3.pt"
    assert torch.load(checkpoint, weights_only=True)["global_batch_size"] == 4
    assert "world_size" not in torch.load(checkpoint, weights_only=True)  # nothing about the ranks
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "resumed" / "checkpoints")
    resumed = _tree_fit(tmp_path / "resumed", 6, ckpt_path=str(tmp_path / "resumed" / "checkpoints" / "checkpoint_step_3.pt"),
                        workers=2)
    assert _same(full, resumed)
    assert (tmp_path / "full" / "checkpoints" / "checkpoint_step_6.pt").read_bytes() == \
        (tmp_path / "resumed" / "checkpoints" / "checkpoint_step_6.pt").read_bytes()
    # the control: the same samples per step in one micro-batch of 4 sum in another order (and draw
    # dropout per micro-batch), so the comparison above can fail
    class _OneMicroBatch(_TinyTree):
        def train_dataloader(self):
            return resumable_loader(self.data, 4, seed=5, trainer=self.trainer, global_batch_size=4)
    assert not _same(full, _tree_fit(tmp_path / "one", 6, module_cls=_OneMicroBatch))


def test_global_batches_refuse_batchnorm_another_micro_batch_on_resume_and_steps_not_from_backward(tmp_path):
    class _Normed(_TinyTree):
        def __init__(self, exact_resume):
            super().__init__(exact_resume)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))

    class _PlainBackward(_TinyTree):
        def training_step(self, batch, batch_idx):
            loss = torch.stack([self.net(micro).pow(2).mean() for micro in batch]).mean()
            self.manual_backward(loss)
            self.optimizers().step()

    class _Micro1(_TinyTree):
        def train_dataloader(self):
            return resumable_loader(self.data, 1, seed=5, trainer=self.trainer, global_batch_size=4)

    def fit(cls, out, ckpt_path=None):
        _tree_fit(out, 6, ckpt_path, module_cls=cls)

    with pytest.raises(UsageError, match=r"net\.1 keeps running statistics of the micro-batches each device sees"):
        fit(_Normed, tmp_path / "bn")
    with pytest.raises(UsageError, match=r"step 1: its gradients did not come from ExactResume\.backward"):
        fit(_PlainBackward, tmp_path / "plain")
    for name in ("bn", "plain"):
        assert not (tmp_path / name / "checkpoints").exists() or not any((tmp_path / name / "checkpoints").iterdir())
    _tree_fit(tmp_path / "micro2", 3)  # micro-batches of 2
    with pytest.raises(UsageError, match="checkpoint_step_3.pt: cannot resume exactly: micro-batch size: checkpoint 2, now 1"):
        fit(_Micro1, tmp_path / "micro2", ckpt_path=str(tmp_path / "micro2" / "checkpoints" / "checkpoint_step_3.pt"))
    assert sorted(p.name for p in (tmp_path / "micro2" / "checkpoints").iterdir()) == ["checkpoint_step_3.pt", "latest"]


RANKS_AGREE = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from axs_lib.errors import UsageError
from axs_lib.lightning import _check_ranks_agree
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
_check_ranks_agree(model, 4)  # the same on both ranks: nothing to say
if dist.get_rank() == 1:
    model[1].running_mean += 1  # a buffer updated on this rank only
try:
    _check_ranks_agree(model, 5)
except UsageError as exc:
    print(f"rank {dist.get_rank()}: {exc}")
dist.destroy_process_group()
"""


def test_a_save_with_global_batches_is_refused_on_every_rank_when_the_ranks_models_differ(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_AGREE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                           str(REPO)], capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank}: step 5: rank 1 holds another 1.running_mean than rank 0" in proc.stdout, proc.stdout


def test_a_layer_unfrozen_during_a_global_batch_run_gets_the_summed_gradient_from_then_on(tmp_path):
    """Frozen for step 1, trainable after: as if trainable throughout with a zero gradient in step 1
    (plain SGD leaves it unchanged either way). The gradient tree is rebuilt with the layer in it;
    left out, its .grad would pile up across steps."""
    class _Unfreeze(_TinyTree):
        def __init__(self, exact_resume, frozen: bool):
            super().__init__(exact_resume)
            self.frozen = frozen

        def training_step(self, batch, batch_idx):
            first = self.trainer.global_step == 0
            self.net[0].requires_grad_(not (self.frozen and first))
            loss = self.exact_resume.backward(self, batch, lambda micro: self.net(micro).pow(2).mean())
            if first and not self.frozen:
                for p in self.net[0].parameters():
                    p.grad.zero_()
            self.optimizers().step()
            return loss

    frozen, trainable = (_tree_fit(tmp_path / str(f), 4, module_cls=_Unfreeze, frozen=f) for f in (True, False))
    torch.manual_seed(0)
    assert not torch.equal(frozen["net.0.weight"], _TinyTree(None).net[0].weight)  # it trained after step 1
    assert _same(frozen, trainable)


def test_gradient_tree_strategy_without_a_global_batch_and_a_loader_planned_for_another_rank_are_refused(tmp_path):
    from axs_lib.lightning import GradientTreeStrategy

    class _Trainer:
        world_size, global_rank = 2, 1
        strategy = GradientTreeStrategy()

    exact = ExactResume(tmp_path, seed=5, environment=False)
    exact._loaders = []
    with pytest.raises(UsageError, match="GradientTreeStrategy leaves the sum of the ranks' gradients to ExactResume.backward"):
        exact._check_steps(_Trainer(), _TinyTree(exact))
    exact = ExactResume(tmp_path, seed=5, environment=False, global_batch_size=4)
    exact._loaders = [resumable_loader(list(range(8)), 2, seed=5, global_batch_size=4)]  # planned without trainer=
    with pytest.raises(UsageError, match="planned for rank 0 of 1, this is rank 1 of 2: pass trainer=self.trainer"):
        exact._check_steps(_Trainer(), _TinyTree(exact))


def test_global_batches_are_refused_in_one_line_without_manual_optimization_their_loader_or_their_checkpoint(tmp_path):
    class _Automatic(_TinyTree):
        def __init__(self, exact_resume):
            super().__init__(exact_resume)
            self.automatic_optimization = True

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

    with pytest.raises(UsageError, match="set automatic_optimization = False"):
        _tree_fit(tmp_path / "auto", 2, module_cls=_Automatic)
    with pytest.raises(UsageError, match=r"needs one training loader from resumable_loader\(\.\.\., global_batch_size=4\), "
                                         r"got ResumableLoader \(no global batch\)"):
        _tree_fit(tmp_path / "sharded", 2, sharded_loader=True)
    with pytest.raises(UsageError, match="pass the same global_batch_size to ExactResume"):
        _tree_fit(tmp_path / "no_g", 2, global_batch_size=None)
    _tree_fit(tmp_path / "tree", 3)
    for g, message in ((None, "checkpoint_step_3.pt: cannot resume exactly: global batch: checkpoint 4, now none (steps "
                              "sharded by rank)"),
                       (8, "checkpoint_step_3.pt: cannot resume exactly: global batch: checkpoint 4, now 8")):
        with pytest.raises(UsageError, match=re.escape(message)):
            ExactResume(tmp_path / "tree", seed=5, environment=False, global_batch_size=g).resume("auto")
    assert sorted(p.name for p in (tmp_path / "tree" / "checkpoints").iterdir()) == ["checkpoint_step_3.pt", "latest"]
    with pytest.raises(ValueError, match="global_batch_size must be a positive int"):
        ExactResume(tmp_path, seed=5, global_batch_size=0)


class _TinyValidated(_Tiny):
    """`_Tiny` with a validation step, on a plain DataLoader (whose every ``iter`` draws from the global generator)."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.net(batch).pow(2).mean(), batch_size=len(batch))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.data[:4], batch_size=2)


def _tiny_trainer(out: Path, steps: int, every: int = 5, accumulate: int = 1, callbacks=(), val_every: int = 0) -> tuple:
    exact = ExactResume(out, seed=5, checkpoint_every=every, environment=False)
    validation = dict(val_check_interval=val_every, check_val_every_n_epoch=None) if val_every else {}
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, deterministic=True, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accumulate_grad_batches=accumulate, callbacks=[exact, *callbacks], plugins=[exact.checkpoint_io],
                         **validation)
    torch.manual_seed(0)  # the initial weights
    module = (_TinyValidated if val_every else _Tiny)(exact=True)
    module.workers = 0
    return exact, trainer, module


def test_validation_changes_no_byte_also_after_a_resume_from_an_epoch_end_where_validation_was_due(tmp_path):
    """Four batches an epoch, validation every 2 steps: the step-4 checkpoint ends an epoch, and the
    validation of step 4 runs after it. Resumed from there, Lightning skips that validation and
    counts its batches into the next epoch's validation progress, which the uninterrupted run had
    reset; ExactResume writes that progress zeroed in its step checkpoints."""
    for name, val_every in (("plain", 0), ("validated", 2)):
        exact, trainer, module = _tiny_trainer(tmp_path / name, steps=8, every=4, val_every=val_every)
        trainer.fit(module)
    reference = _digests(tmp_path / "plain")
    assert sorted(reference) == ["checkpoint_step_4.pt", "checkpoint_step_8.pt"]
    assert _digests(tmp_path / "validated") == reference
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "validated" / "checkpoints" / "checkpoint_step_4.pt", resumed / "checkpoints")
    exact, trainer, module = _tiny_trainer(resumed, steps=8, every=4, val_every=2)
    trainer.fit(module, ckpt_path=exact.resume("auto"))
    assert _digests(resumed) == reference


def test_resume_auto_that_finds_no_checkpoint_says_so_in_one_line(tmp_path):
    lines: list[str] = []
    exact = ExactResume(tmp_path / "run", seed=5, environment=False)
    assert exact.resume("auto", log=lines.append) is None
    assert lines == [f"no checkpoint in {tmp_path / 'run' / 'checkpoints'}: starting from step 0"]
    assert exact.resume(None, log=lines.append) is None and len(lines) == 1  # a fresh start, as asked: nothing to say


@pytest.mark.filterwarnings("ignore:.*there is no last checkpoint available")  # Lightning's own, before our refusal
def test_a_fresh_fit_over_checkpoints_is_refused_also_with_ckpt_path_last_and_writes_nothing(tmp_path):
    _tiny_fit(tmp_path / "run", exact=True, workers=0, steps=5)
    before = _digests(tmp_path / "run")
    exact, trainer, module = _tiny_trainer(tmp_path / "run", steps=10)
    with pytest.raises(UsageError, match="holds checkpoints of an earlier run"):
        exact.resume(None)
    for ckpt_path in (None, "last"):  # "last" with no last file: Lightning would start from step 0
        exact, trainer, module = _tiny_trainer(tmp_path / "run", steps=10)
        with pytest.raises(UsageError, match="holds checkpoints of an earlier run"):
            trainer.fit(module, ckpt_path=ckpt_path)
    assert _digests(tmp_path / "run") == before


def test_no_weights_only_line_at_any_save(tmp_path, caplog):
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        _tiny_fit(tmp_path / "run", exact=True, workers=0, steps=4, every=2)
    assert len(_digests(tmp_path / "run")) == 2
    assert not [r for r in caplog.records if "weights_only" in r.getMessage()]


def test_remove_checkpoint_deletes_only_the_runs_own_files_in_its_checkpoint_folder(tmp_path):
    run = tmp_path / "run"
    io = AxsCheckpointIO(run)
    victim = tmp_path / "precious.txt"
    victim.write_text("not the run's")
    io.save_checkpoint({"w": torch.ones(2)}, run / "checkpoints" / "checkpoint_step_2.pt")
    io.save_checkpoint({"w": torch.ones(2)}, run / "checkpoints" / "epoch=0.ckpt")
    planted = run / "checkpoints" / "planted.ckpt"
    planted.write_text("not a checkpoint")
    crafted = expand({"best_model_path": f"{RUN_MARK}/checkpoints/x/../../../precious.txt"}, run)["best_model_path"]
    for path in (crafted, str(victim), run / "checkpoints" / "checkpoint_step_2.pt", run / "checkpoints" / "latest", planted):
        io.remove_checkpoint(path)
    assert victim.read_text() == "not the run's" and planted.exists()
    assert (run / "checkpoints" / "checkpoint_step_2.pt").exists() and (run / "checkpoints" / "latest").exists()
    io.remove_checkpoint(run / "checkpoints" / "epoch=0.ckpt")  # its own: ModelCheckpoint's rotation works
    assert not (run / "checkpoints" / "epoch=0.ckpt").exists()
    other = AxsCheckpointIO(run)  # after a resume: a file of ours written by the earlier process
    io.save_checkpoint({"w": torch.ones(2)}, run / "checkpoints" / "epoch=1.ckpt")
    other.remove_checkpoint(run / "checkpoints" / "epoch=1.ckpt")
    assert not (run / "checkpoints" / "epoch=1.ckpt").exists()


class _SaveMidAccumulation(pl.Callback):
    """Saves a file as ModelCheckpoint may: at a batch end between the micro-batches of one step."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 2 and not self.path.exists():  # micro-batch 0 of step 2 (accumulate 2)
            trainer.save_checkpoint(self.path, weights_only=False)


def test_gradient_accumulation_resumes_exactly_and_a_file_saved_mid_accumulation_is_refused(tmp_path):
    mid = tmp_path / "run" / "checkpoints" / "mid.ckpt"
    exact, trainer, module = _tiny_trainer(tmp_path / "run", steps=6, every=3, accumulate=2,
                                           callbacks=[_SaveMidAccumulation(mid)])
    trainer.fit(module)
    full = _digests(tmp_path / "run")
    assert sorted(full) == ["checkpoint_step_3.pt", "checkpoint_step_6.pt"] and mid.exists()
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "checkpoints" / "checkpoint_step_3.pt", resumed / "checkpoints")
    exact, trainer, module = _tiny_trainer(resumed, steps=6, every=3, accumulate=2)
    trainer.fit(module, ckpt_path=exact.resume("auto"))
    assert _digests(resumed)["checkpoint_step_6.pt"] == full["checkpoint_step_6.pt"]
    exact, trainer, module = _tiny_trainer(tmp_path / "other", steps=6, every=3, accumulate=2)
    with pytest.raises(UsageError, match="middle of an accumulated step"):
        trainer.fit(module, ckpt_path=str(mid))


def test_an_error_in_the_fit_leaves_no_worker_behind_and_state_of_the_wrong_type_is_one_line(tmp_path):
    class Failing(_Tiny):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise ValueError("the module failed")
            return super().training_step(batch, batch_idx)

    before = set(multiprocessing.active_children())
    exact = ExactResume(tmp_path / "run", seed=5, checkpoint_every=10, environment=False)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[exact], plugins=[exact.checkpoint_io])
    module = Failing(exact=True)
    module.workers = 2
    with pytest.raises(ValueError, match="the module failed"):
        trainer.fit(module)
    assert [child for child in multiprocessing.active_children() if child not in before] == []  # closed by on_exception
    for state in ([1, 2], {"seed": 5}):
        with pytest.raises(UsageError) as caught:
            exact.load_state_dict(state)
        assert len(str(caught.value).splitlines()) == 1
