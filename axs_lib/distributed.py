"""Data-parallel training under ``torchrun`` whose bits do not depend on the number of ranks.

``torchrun --nproc_per_node=N scripts/train_stage1.py ...`` starts N processes; each reads its
rank from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins a process group
(gloo on CPU, NCCL on GPU). Without those variables everything here is a no-op for one process.

The world size only decides who computes what. An optimizer step is a fixed set of ``k``
micro-batches of ``m`` samples (`MicroBatchPlan`): which samples form micro-batch ``j`` and every
random draw in it belong to ``(step, j)``, never to a rank. The ranks split the micro-batch slots
into equal contiguous blocks (so ``W`` must divide ``k``), and `GradientTree` sums the slots'
gradients in ONE fixed binary tree over the slots, whatever ``W``:

* The tree is the dyadic tree over slots ``0 .. k-1``: node ``(level, i)`` covers slots
  ``[i * 2**level, (i + 1) * 2**level)`` cut at ``k``; its value is ``left + right``, or just
  ``left`` when the right child covers no slot. The root is the step's gradient.
* Each rank computes the values of the largest nodes that lie wholly in its block (at most about
  ``2 log2 k`` of them, each by the same recursion), all ranks ``all_gather`` those, and every
  rank evaluates the top of the tree from them, in tree order.

A node's value is the same floating-point expression whoever computes it, so W = 1, 2, 4, 8 give
bit-identical gradients (and a checkpoint resumes exactly on another W). The cost is one
all_gather of at most ``2 log2(k/W) + 2`` flat buffers per rank instead of one all-reduce; with one
micro-batch per rank it is one buffer, the volume of a ring all-reduce (benchmarks/bench_ddp.py).

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


def shutdown(world: World, *, wait_for_all: bool = False) -> None:
    """Leave the process group. ``wait_for_all`` (a run that ended normally): first wait until every
    rank got here. A rank that tears its gloo connections down while another still works (rank 0
    writing the model) can die in gloo's destructor with SIGABRT ("terminate called without an
    active exception") after all its work was done. Not on an error path: a rank that failed
    elsewhere would never arrive, and the others would wait for it forever."""
    if world.distributed and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- micro-batches


@dataclass(frozen=True)
class MicroBatchPlan:
    """An optimizer step as ``micro_batches`` micro-batches of ``micro_batch_size`` samples, split over ranks.

    ``slots`` are the micro-batch indices this rank computes: a contiguous block of
    ``micro_batches // world_size``. The global batch (``micro_batch_size * micro_batches``
    samples, consecutive in the epoch order) and the slot of every sample do not depend on the
    world size. Raises `PlanError` when the world size does not divide the micro-batch count.
    """

    micro_batch_size: int
    micro_batches: int = 1
    world_size: int = 1
    rank: int = 0

    def __post_init__(self):
        for name in ("micro_batch_size", "micro_batches", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise PlanError(f"rank must be in [0, {self.world_size}), got {self.rank!r}")
        if self.micro_batches % self.world_size:
            raise PlanError(
                f"{self.world_size} ranks cannot share {self.micro_batches} micro-batches per step exactly: the world "
                f"size must divide the number of micro-batches (global batch {self.global_batch_size} / micro-batch "
                f"{self.micro_batch_size} = {self.micro_batches}); choose a global batch that is a multiple of "
                f"{self.micro_batch_size * self.world_size}")

    @classmethod
    def from_global(cls, global_batch_size: int, micro_batch_size: int, world_size: int = 1, rank: int = 0) -> "MicroBatchPlan":
        """The plan for a global batch of ``global_batch_size`` samples in micro-batches of ``micro_batch_size``."""
        if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
            raise PlanError(f"global_batch_size must be an integer >= 1, got {global_batch_size!r}")
        if isinstance(micro_batch_size, int) and micro_batch_size >= 1 and global_batch_size % micro_batch_size:
            raise PlanError(f"global batch {global_batch_size} is not a multiple of micro-batch {micro_batch_size}")
        return cls(micro_batch_size, global_batch_size // max(1, micro_batch_size), world_size, rank)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.micro_batches

    @property
    def per_rank(self) -> int:
        return self.micro_batches // self.world_size

    @property
    def slots(self) -> range:
        return range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)


class PlanError(AxsError, ValueError):
    """A micro-batch plan that cannot be exact (bad sizes, or W not dividing the micro-batch count)."""


# --------------------------------------------------------------------------- the fixed tree

Node = tuple[int, int]  # (level, index): slots [index * 2**level, (index + 1) * 2**level), cut at the slot count


def _span(node: Node, count: int) -> tuple[int, int]:
    level, index = node
    return index << level, min((index + 1) << level, count)


def _root(count: int) -> Node:
    return (max(0, (count - 1).bit_length()), 0)


def cover(start: int, stop: int, count: int) -> list[Node]:
    """The largest tree nodes lying wholly in slots ``[start, stop)``, left to right."""
    def walk(node: Node) -> list[Node]:
        lo, hi = _span(node, count)
        if lo >= count or hi <= start or lo >= stop:
            return []
        if start <= lo and hi <= stop:
            return [node]
        level, index = node
        return walk((level - 1, 2 * index)) + walk((level - 1, 2 * index + 1))
    return walk(_root(count))


def tree_value(node: Node, known: dict[Node, torch.Tensor], count: int) -> torch.Tensor | None:
    """The value of ``node`` from the known values of nodes below (or at) it: ``left + right`` up the tree."""
    if node in known:
        return known[node]
    lo, _ = _span(node, count)
    level, index = node
    if lo >= count:
        return None
    if level == 0:
        raise KeyError(f"slot {index} has no value")
    left = tree_value((level - 1, 2 * index), known, count)
    right = tree_value((level - 1, 2 * index + 1), known, count)
    return left if right is None else left + right


class GradientTree:
    """Sums per-micro-batch gradients in the fixed tree over slots, identically for any world size.

    After each micro-batch's ``backward()``, call ``add(loss)``: it takes the parameters' ``.grad``
    as that slot's gradient (and clears it for the next slot), with the micro-batch's loss. After
    this rank's last slot, ``reduce()`` combines every rank's part in tree order, writes the sum
    into each parameter's ``.grad`` and returns the summed loss (a 0-dim tensor, the same on every
    rank). Scale each micro-batch's loss by ``1 / micro_batches`` before backward for a mean.
    Parameters that do not require a gradient are left alone, and one that no micro-batch gave a
    gradient keeps ``.grad`` None (the optimizer skips it, as after a plain backward).

    Memory: this rank's slot gradients are kept until ``reduce`` (one flat buffer per slot of the
    block; the local tree is evaluated once at the end).
    """

    def __init__(self, parameters, plan: MicroBatchPlan, world: World | None = None):
        self.parameters = [p for p in parameters if p.requires_grad]  # frozen ones keep .grad None, as in plain torch
        if not self.parameters:
            raise PlanError("GradientTree needs at least one parameter that requires a gradient")
        dtypes = {p.dtype for p in self.parameters}
        if len(dtypes) > 1:
            raise PlanError(f"GradientTree sums one flat buffer: the parameters must share a dtype, got {sorted(map(str, dtypes))}")
        self.plan = plan
        self.world = world or World(rank=plan.rank, size=plan.world_size)
        if self.world.size != plan.world_size or self.world.rank != plan.rank:
            raise PlanError(f"the plan is for rank {plan.rank} of {plan.world_size}, this process is rank "
                            f"{self.world.rank} of {self.world.size}")
        k, per_rank = plan.micro_batches, plan.per_rank
        self._nodes = [cover(r * per_rank, (r + 1) * per_rank, k) for r in range(plan.world_size)]
        self._leaves: dict[Node, torch.Tensor] = {}
        self._had = [False] * len(self.parameters)  # which parameters a slot of this rank gave a gradient

    def _flat(self, loss: torch.Tensor | None) -> torch.Tensor:
        """One slot's gradients in parameter order, then which parameters had one (1/0), then the loss."""
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.parameters]
        ref = self.parameters[0]
        had = torch.tensor([float(p.grad is not None) for p in self.parameters], dtype=ref.dtype, device=ref.device)
        extra = torch.zeros(1, dtype=ref.dtype, device=ref.device) if loss is None else loss.detach().reshape(1).to(ref.dtype)
        return torch.cat([*parts, had, extra])

    def add(self, loss: torch.Tensor | None = None) -> None:
        """Take the current ``.grad`` of every parameter as the next slot's gradient, then clear it."""
        slots = self.plan.slots
        if len(self._leaves) >= len(slots):
            raise RuntimeError(f"this rank computes {len(slots)} micro-batches per step; add() was called once more")
        slot = slots[len(self._leaves)]
        self._had = [h or p.grad is not None for h, p in zip(self._had, self.parameters)]
        self._leaves[(0, slot)] = self._flat(loss)
        for p in self.parameters:
            p.grad = None

    def reduce(self) -> torch.Tensor:
        """Write the tree sum of all slots' gradients into ``.grad``; return the summed loss."""
        if len(self._leaves) != len(self.plan.slots):
            raise RuntimeError(f"reduce() after {len(self._leaves)} of this rank's {len(self.plan.slots)} micro-batches")
        k = self.plan.micro_batches
        mine = [tree_value(node, self._leaves, k) for node in self._nodes[self.plan.rank]]
        self._leaves = {}
        known = dict(zip(self._nodes[self.plan.rank], mine))
        if self.world.distributed:
            known = self._exchange(mine)
        total = tree_value(_root(k), known, k)
        # Which parameters had a gradient in some slot: known here when every one did in this rank's
        # slots; otherwise read from the summed flags (one small device-to-host copy, on GPU a sync).
        had = [1.0] * len(self.parameters) if all(self._had) else total[-1 - len(self.parameters):-1].tolist()
        self._had = [False] * len(self.parameters)
        offset = 0
        for p, any_slot in zip(self.parameters, had):  # views into the one fresh buffer: no copy (zero_grad drops them)
            n = p.numel()
            # a parameter no slot on any rank gave a gradient stays without one, as after a plain backward
            p.grad = total[offset:offset + n].view_as(p) if any_slot > 0 else None
            offset += n
        return total[-1].clone()  # not a view: the caller may keep the loss after the buffer's grads are dropped

    def reset(self) -> None:
        """Forget the slots added so far (after an exception inside a step, before computing it again)."""
        self._leaves = {}
        self._had = [False] * len(self.parameters)

    def _exchange(self, mine: list[torch.Tensor]) -> dict[Node, torch.Tensor]:
        """Every rank's node values, by one all_gather of equally sized (zero-padded) stacks."""
        width = max(len(nodes) for nodes in self._nodes)
        if width == 1:  # one node per rank (a power-of-two block): gather it as it is, no stacking copy
            stack = mine[0].unsqueeze(0)
        else:
            stack = torch.zeros((width, mine[0].numel()), dtype=mine[0].dtype, device=mine[0].device)
            for i, value in enumerate(mine):
                stack[i] = value
        gathered = [torch.empty_like(stack) for _ in range(self.world.size)]
        dist.all_gather(gathered, stack)
        return {node: gathered[r][i] for r, nodes in enumerate(self._nodes) for i, node in enumerate(nodes)}


def average_gradients(parameters: list[torch.nn.Parameter], world: World) -> None:
    """Average gradients over ranks with one all-reduce of a flat buffer in parameter order.

    The classic fixed-world-size reduction (DDP's arithmetic without its buckets): its result
    depends on W. Kept as the baseline of benchmarks/bench_ddp.py; the trainer uses `GradientTree`.
    """
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
