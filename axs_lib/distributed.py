"""Data-parallel training under ``torchrun`` with results that depend only on the world size.

``torchrun --nproc_per_node=N scripts/train_stage1.py ...`` starts N processes; each reads its
rank from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins a process group
(gloo on CPU, NCCL on GPU). Without those variables everything here is a no-op for one process.

Gradients are averaged with one all-reduce of a single flat buffer laid out in parameter order.
That is the arithmetic of ``DistributedDataParallel`` without its gradient buckets, whose layout
DDP rebuilds after the first iteration (so a resumed run would reduce in another grouping for one
step) and whose chunking decides the summation order on more than two ranks. A fixed layout makes
the reduction order a function of the world size alone.

Every collective here is called by all ranks in the same order; decisions that must agree (stop on
a signal, errors found by rank 0) are shared explicitly, so no rank waits forever on another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from axs_lib.errors import AxsError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes (1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: torch.device) -> World:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(parameters: list[torch.nn.Parameter], world: World) -> None:
    """Average gradients over ranks with one all-reduce of a flat buffer in parameter order."""
    if not world.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    offset = 0
    for p, g in zip(parameters, grads):
        n = g.numel()
        chunk = flat[offset : offset + n].view_as(g)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a signal reached one rank)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def main_first(fn: Callable[[], T], world: World) -> T | None:
    """Run ``fn`` on rank 0 only and make its `AxsError`, if any, the error of every rank.

    Used for work on shared files (preparing and locking the output directory): one rank does it,
    and when it refuses, all ranks exit with the same one-line message instead of hanging.
    """
    result, error = None, None
    if world.is_main:
        try:
            result = fn()
        except AxsError as exc:
            error = (type(exc).__name__, str(exc), exc.exit_code)
    if world.distributed:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise AxsError(error[1], exit_code=error[2])
    return result


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
