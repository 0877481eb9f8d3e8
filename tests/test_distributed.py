"""Distributed training under torchrun (gloo on loopback): the bits do not depend on the world size.

A step is 4 micro-batches of one tile; 1, 2 and 4 ranks split them and must write byte-identical
checkpoints at every checkpoint step, and a 2-rank run killed inside a checkpoint write must
resume byte-identically on 1 rank and on 4. The controls: the tree's arithmetic against the flat
all-reduce it replaces (which gives other bits on another world size), and a world size that does
not divide the micro-batches, refused before anything is written.

Every torchrun starts W + 1 processes that import torch, so ``make test`` runs the W=2 reference,
W=4, the kill at W=2 with its two resumes and the user-loop example at W=2 and 4; per-rank worker
counts and the W=3 refusal by torchrun are ``make soak``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from axs_lib.cli import main
from axs_lib.distributed import GradientTree, MicroBatchPlan, PlanError, World, cover, tree_value
from axs_lib.stage1.train import reshard
from conftest import import_file

ROOT = Path(__file__).resolve().parents[1]
STEPS_AT = ("checkpoint_step_2.pt", "checkpoint_step_4.pt", "checkpoint_step_6.pt", "best.pt")


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), "--seed", "42", "--steps", "6", "--micro-batch-size", "1",
            "--global-batch-size", "4", "--width", "8", "--checkpoint-every", "2", "--val-every", "2", "--log-every", "1",
            "--keep-flagged", "--no-plots", "--quiet", *extra]  # all five training tiles: a global batch of 4


def torchrun(script: Path, argv: list[str], ranks: int, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(script), *argv]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def train(argv: list[str], ranks: int, env: dict | None = None) -> subprocess.CompletedProcess:
    return torchrun(ROOT / "scripts" / "train_stage1.py", argv, ranks, env)


def shas(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "checkpoints").glob("*.pt"))}


@pytest.fixture(scope="module")
def one_rank_run(demo_tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp1") / "run"
    assert main(["train", "stage1", *args(demo_tiles, out)]) == 0
    assert sorted(shas(out)) == sorted(STEPS_AT)
    return out


@pytest.fixture(scope="module")
def two_rank_run(demo_tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp2") / "run"
    proc = train(args(demo_tiles, out), 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_one_and_two_ranks_write_byte_identical_checkpoints(one_rank_run, two_rank_run):
    assert shas(two_rank_run) == shas(one_rank_run)  # four ranks: the resume below, and make soak from step 0


@pytest.mark.slow
def test_four_ranks_from_the_start_write_the_same_checkpoints(one_rank_run, demo_tiles, tmp_path):
    four = tmp_path / "dp4"
    proc = train(args(demo_tiles, four), 4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shas(four) == shas(one_rank_run)


def test_validation_metrics_are_the_same_on_every_world_size(one_rank_run, two_rank_run):
    def val_lines(run: Path) -> list[str]:
        return [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert val_lines(two_rank_run) == val_lines(one_rank_run) and len(val_lines(one_rank_run)) == 3


def test_a_two_rank_run_killed_mid_write_resumes_byte_identically_on_one_rank_and_on_four(one_rank_run, demo_tiles, tmp_path):
    killed = tmp_path / "killed"
    proc = train(args(demo_tiles, killed), 2, env={"AXS_FAULT": "kill:checkpoint_step_4.pt"})
    assert proc.returncode != 0
    assert sorted(shas(killed)) == ["best.pt", "checkpoint_step_2.pt"]  # step 4 died in its write
    again = tmp_path / "again"
    shutil.copytree(killed, again)
    assert main(["train", "stage1", *args(demo_tiles, killed, "--resume", "auto")]) == 0  # on one rank
    proc = train(args(demo_tiles, again, "--resume", "auto"), 4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shas(killed) == shas(one_rank_run)
    assert shas(again) == shas(one_rank_run)


def test_checkpoints_hold_no_world_size_and_no_per_rank_state(two_rank_run):
    ckpt = torch.load(two_rank_run / "checkpoints" / "checkpoint_step_6.pt", weights_only=True)
    assert "world_size" not in ckpt and "rank_rng_states" not in ckpt
    assert ckpt["config"]["batch_size"] == 1 and ckpt["config"]["accum_steps"] == 4


def test_a_world_size_that_does_not_divide_the_micro_batches_is_refused_with_the_reason():
    with pytest.raises(PlanError, match="3 ranks cannot share 4 micro-batches per step exactly"):
        MicroBatchPlan(1, 4, world_size=3, rank=0)
    with pytest.raises(PlanError, match="not a multiple of micro-batch 3"):
        MicroBatchPlan.from_global(8, 3)
    assert list(MicroBatchPlan(2, 8, world_size=4, rank=3).slots) == [6, 7]


@pytest.mark.slow
def test_torchrun_on_three_ranks_is_refused_before_anything_is_written(demo_tiles, tmp_path):
    out = tmp_path / "dp3"
    proc = train(args(demo_tiles, out), 3)
    assert proc.returncode != 0
    assert "3 ranks cannot share 4 micro-batches per step exactly" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_per_rank_worker_count_changes_nothing(one_rank_run, demo_tiles, tmp_path):
    out = tmp_path / "workers"
    proc = train(args(demo_tiles, out, "--num-workers", "2"), 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shas(out) == shas(one_rank_run)


# --------------------------------------------------------------------------- the tree's arithmetic


def _slot_values(count: int, size: int = 4096) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(count)
    return [torch.randn(size, generator=g) * 10 ** torch.randint(-3, 4, (size,), generator=g) for _ in range(count)]


def _tree_sum(values: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """What `GradientTree` computes: each rank's maximal nodes, then the top of the tree from all of them."""
    count, per_rank = len(values), len(values) // world_size
    known = {}
    for rank in range(world_size):
        leaves = {(0, s): values[s] for s in range(rank * per_rank, (rank + 1) * per_rank)}
        for node in cover(rank * per_rank, (rank + 1) * per_rank, count):
            known[node] = tree_value(node, leaves, count)
    return tree_value((max(0, (count - 1).bit_length()), 0), known, count)


def _flat_allreduce(values: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """The fixed-world-size scheme: each rank accumulates its slots in order, then one sum over ranks."""
    per_rank = len(values) // world_size
    partials = [sum(values[r * per_rank + 1:(r + 1) * per_rank], values[r * per_rank].clone()) for r in range(world_size)]
    return sum(partials[1:], partials[0].clone())


@pytest.mark.parametrize(("count", "sizes"), [(8, (1, 2, 4, 8)), (6, (1, 2, 3, 6)), (12, (1, 2, 3, 4, 6, 12)), (5, (1, 5))])
def test_the_tree_sum_is_bit_identical_for_every_world_size_where_a_flat_all_reduce_is_not(count, sizes):
    values = _slot_values(count)
    reference = _tree_sum(values, 1)
    for w in sizes:
        assert torch.equal(_tree_sum(values, w), reference), f"world size {w}"
    if len(sizes) > 2:  # the control: accumulate-then-all-reduce gives other bits on another world size
        flat = [_flat_allreduce(values, w) for w in sizes]
        assert any(not torch.equal(f, flat[0]) for f in flat[1:])


def test_cover_splits_a_rank_block_into_whole_tree_nodes():
    assert cover(0, 8, 8) == [(3, 0)]
    assert cover(2, 4, 6) == [(1, 1)]
    assert cover(3, 6, 6) == [(0, 3), (2, 1)]  # slots 4-5 form node (2, 1): its right half lies past slot 5
    for start in range(7):
        for stop in range(start + 1, 8):
            nodes = cover(start, stop, 7)
            slots = [s for level, i in nodes for s in range(i << level, min((i + 1) << level, 7))]
            assert slots == list(range(start, stop))


def test_gradient_tree_writes_the_tree_sum_of_the_slot_gradients_into_grad():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    plan = MicroBatchPlan(2, 3)
    tree = GradientTree(model.parameters(), plan)
    inputs = [torch.randn(2, 5) for _ in range(3)]
    flats = []
    for x in inputs:
        loss = model(x).square().sum() / 3
        loss.backward()
        flats.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()] + [loss.detach().reshape(1)]))
        tree.add(loss)
    total = tree.reduce()
    expected = (flats[0] + flats[1]) + flats[2]
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()] + [total.reshape(1)])
    assert torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="reduce\\(\\) after 0 of this rank's 3"):
        tree.reduce()
    with pytest.raises(PlanError, match="rank 0 of 1, this process is rank 1 of 2"):
        GradientTree(model.parameters(), plan, World(rank=1, size=2))


# --------------------------------------------------------------------------- a user's own loop


USER_LOOP = ROOT / "examples" / "distributed_loop.py"
# 12 micro-batches: 6 per rank on 2 ranks and 3 on 4, so ranks hold several tree nodes (the padded gather)
USER_LOOP_SIZES = ["--global-batch-size", "24", "--micro-batch-size", "2"]


@pytest.fixture(scope="module")
def user_loop_one_rank(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("user_loop") / "w1"
    assert import_file(USER_LOOP, "distributed_loop").main(["--out", str(out), *USER_LOOP_SIZES]) == 0  # no torchrun
    return hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()


def _user_loop_digest(tmp_path: Path, ranks: int) -> str:
    proc = torchrun(USER_LOOP, ["--out", str(tmp_path / f"w{ranks}"), *USER_LOOP_SIZES], ranks)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return hashlib.sha256((tmp_path / f"w{ranks}" / "model.pt").read_bytes()).hexdigest()


def test_a_user_loop_writes_the_same_bytes_on_one_rank_and_under_torchrun_on_two(user_loop_one_rank, tmp_path):
    assert _user_loop_digest(tmp_path, 2) == user_loop_one_rank


@pytest.mark.slow
def test_a_user_loop_writes_the_same_bytes_under_torchrun_on_four(user_loop_one_rank, tmp_path):
    assert _user_loop_digest(tmp_path, 4) == user_loop_one_rank


# --------------------------------------------------------------------------- checkpoints of the earlier sharding


def test_a_checkpoint_of_the_earlier_per_rank_sharding_is_refused_then_continued(one_rank_run, demo_tiles, tmp_path, capsys):
    out = tmp_path / "legacy"
    shutil.copytree(one_rank_run, out)
    path = out / "checkpoints" / "checkpoint_step_2.pt"
    from axs_lib.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(path)
    ckpt["world_size"] = 2
    save_checkpoint(ckpt, path)
    before = shas(out)
    resume = ["--resume", str(path)]
    assert main(["train", "stage1", *args(demo_tiles, out, *resume)]) == 2
    assert "sharded each step over 2 ranks" in capsys.readouterr().err
    assert shas(out) == before
    assert main(["train", "stage1", *args(demo_tiles, out, *resume, "--allow-world-size-change")]) == 0
    assert "notice: a checkpoint sharded over 2 ranks" in capsys.readouterr().err
    # the continued run's steps 4 and 6 are other bits: the earlier files are kept beside them
    superseded = out / "checkpoints" / "checkpoint_step_4.pt.superseded"
    assert hashlib.sha256(superseded.read_bytes()).hexdigest() == before["checkpoint_step_4.pt"]


def test_a_single_process_checkpoint_of_the_earlier_accumulation_is_refused_then_continued_keeping_newer_files(
        one_rank_run, demo_tiles, tmp_path, capsys):
    out = tmp_path / "legacy_accum"
    shutil.copytree(one_rank_run, out)
    path = out / "checkpoints" / "checkpoint_step_2.pt"
    from axs_lib.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(path)
    ckpt["world_size"] = 1  # what the earlier version wrote; its 4 micro-batches shared one seed
    save_checkpoint(ckpt, path)
    before = shas(out)
    assert main(["train", "stage1", *args(demo_tiles, out, "--resume", str(path))]) == 2
    assert "accumulation: the checkpoint was written by an earlier version" in capsys.readouterr().err
    assert shas(out) == before
    assert main(["train", "stage1", *args(demo_tiles, out, "--resume", str(path), "--force-resume")]) == 0
    assert (out / "checkpoints" / "checkpoint_step_6.pt.superseded").read_bytes() == (
        one_rank_run / "checkpoints" / "checkpoint_step_6.pt").read_bytes()


@pytest.mark.parametrize(
    ("position", "old", "new", "shard", "expected"),
    [(0, 2, 1, 5, 0), (1, 2, 1, 5, 2), (2, 1, 2, 3, 1), (4, 1, 4, 2, 1), (2, 2, 1, 3, 2)],
)
def test_reshard_keeps_the_consumed_share_of_the_epoch(position, old, new, shard, expected):
    assert reshard(position, old, new, shard) == expected


def test_gradient_tree_leaves_frozen_and_unused_parameters_without_a_gradient_so_the_optimizer_skips_them():
    torch.manual_seed(0)
    frozen, used, unused = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    frozen.requires_grad_(False)
    params = [*frozen.parameters(), *used.parameters(), *unused.parameters()]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    tree = GradientTree(params, MicroBatchPlan(2, 2))
    for _ in range(2):
        used(frozen(torch.randn(2, 3))).sum().backward()
        tree.add()
    tree.reduce()
    assert all(p.grad is None for p in [*frozen.parameters(), *unused.parameters()])
    assert all(p.grad is not None for p in used.parameters())
    optimizer.step()
    changed = [not torch.equal(p, b) for p, b in zip(params, before)]
    assert changed == [False, False, True, True, False, False]  # weight decay touched only what had a gradient
    with pytest.raises(PlanError, match="share a dtype"):
        GradientTree([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))],
                     MicroBatchPlan(1))
