"""World-size-invariant gradient sum vs the flat all-reduce it replaced, side by side.

``W`` CPU ranks (gloo on loopback, one process each) train the Stage-1 U-Net on synthetic
micro-batches; each rank computes ``per_rank`` micro-batches per step, then the step's gradients
are combined either by

* ``tree``: `axs_lib.distributed.GradientTree` (each rank's subtree sums, one ``all_gather``, the
  top of the fixed tree on every rank): the same bits for every world size;
* ``flat``: gradients accumulated in ``.grad`` and one ``all_reduce`` of a flat buffer
  (`axs_lib.distributed.average_gradients`, DDP's arithmetic): bits that depend on W.

The two alternate in rounds inside the same processes; reported per W: median steps/s of each and
their ratio (target >= 0.9 at W=2), and the bytes each rank sends per step under the usual ring
algorithms (all_reduce: 2(W-1)/W buffers; all_gather: W-1 stacks of the rank's node count).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from axs_lib.distributed import GradientTree, MicroBatchPlan, World, average_gradients, cover
from axs_lib.stage1.losses import stage1_loss
from axs_lib.stage1.model import UNet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(model, optimizer, batches, plan: MicroBatchPlan, world: World, tree: GradientTree | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    for sar, target, mask in batches:
        loss = stage1_loss(model(sar), target, mask, 1.0, 0.5) / plan.micro_batches
        loss.backward()
        if tree is not None:
            tree.add(loss)
    if tree is not None:
        tree.reduce()
    else:
        average_gradients(list(model.parameters()), world)
    optimizer.step()


def _rank(rank: int, world_size: int, port: int, args: argparse.Namespace, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    world = World(rank=rank, size=world_size)
    plan = MicroBatchPlan(args.micro_batch, args.per_rank * world_size, world_size, rank)
    torch.manual_seed(0)
    model = UNet(width=args.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.rand(args.micro_batch, 2, args.size, args.size, generator=g),
                torch.rand(args.micro_batch, 4, args.size, args.size, generator=g),
                torch.ones(args.micro_batch, 1, args.size, args.size)) for _ in plan.slots]
    tree = GradientTree(model.parameters(), plan, world)
    times = {"tree": [], "flat": []}
    for mode in ("tree", "flat"):  # warm-up
        _step(model, optimizer, batches, plan, world, tree if mode == "tree" else None)
    for round_ in range(args.rounds):
        for mode in (("tree", "flat") if round_ % 2 == 0 else ("flat", "tree")):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                _step(model, optimizer, batches, plan, world, tree if mode == "tree" else None)
            dist.barrier()
            times[mode].append(args.steps / (time.perf_counter() - start))
    if rank == 0:
        # the tree's buffer also carries one had-a-gradient flag per parameter tensor and the loss
        params = sum(p.numel() for p in model.parameters()) + len(list(model.parameters())) + 1
        nodes = max(len(cover(r * plan.per_rank, (r + 1) * plan.per_rank, plan.micro_batches)) for r in range(world_size))
        out.put({"tree": statistics.median(times["tree"]), "flat": statistics.median(times["flat"]),
                 "bytes_flat": int(2 * (world_size - 1) / world_size * sum(p.numel() for p in model.parameters()) * 4),
                 "bytes_tree": (world_size - 1) * nodes * params * 4})
    dist.destroy_process_group()


def measure(world_size: int, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world_size, port, args, out)) for r in range(world_size)]
    for p in procs:
        p.start()
    result = out.get(timeout=900)
    for p in procs:
        p.join(timeout=60)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ddp", description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="tile side in pixels")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--per-rank", type=int, default=1, help="micro-batches per rank per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="width 4, 32 px, 2 steps, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.size, args.steps, args.rounds = 4, 32, 2, 2
    results = {}
    print(f"  {'W':>2}  {'tree steps/s':>12}  {'flat steps/s':>12}  {'ratio':>6}  {'bytes/step tree':>15}  {'flat':>12}")
    for w in args.world_sizes:
        r = measure(w, args)
        r["ratio"] = r["tree"] / r["flat"]
        results[f"w{w}"] = r
        print(f"  {w:>2}  {r['tree']:>12.2f}  {r['flat']:>12.2f}  {r['ratio']:>6.3f}  {r['bytes_tree']:>15,}  {r['bytes_flat']:>12,}",
              flush=True)
    return results


if __name__ == "__main__":
    main()
