"""A DataLoader whose state is what the training loop consumed, resumable with any worker count.

A DataLoader reads ahead: with workers it has asked its sampler for several batches the loop has
not seen yet, so the sampler's own count (and any state taken from it) runs ahead of training.
`ResumableLoader` counts the batches it has handed to the loop instead. Its state is the sampler's
``(epoch, position)`` after the last batch handed out, so `state_dict` is exact at any moment,
whatever ``num_workers`` and prefetch do. `load_state_dict` sets that state and the next
iteration asks the sampler for exactly the indices from there: O(1), nothing replayed, and a
resume may use another worker count (the batches are the same because each batch is a list of
indices fixed by the state, and `axs_lib.samples.SeededDataset` makes each sample a function of
its index and epoch).

Two ways to iterate:

* ``for batch in loader``: the rest of the current epoch; after its last batch the state is the
  next epoch at position 0 (the usual epoch loop, resumable mid-epoch).
* ``loader.endless()``: batches forever, running on across epoch ends (a batch may hold the end
  of epoch ``e`` and the start of ``e + 1``), as `axs_lib.sampling.ResumableSampler.stream`
  walks the data; for loops that count steps, not epochs (the Stage-1 trainer's).

A batch counts as consumed once it is handed to the loop: a checkpoint written while processing
it resumes with the next one. One iteration runs at a time; starting another ends the first.

Micro-batches across ranks (``plan=`` a `axs_lib.distributed.MicroBatchPlan`): an optimizer step
takes the next ``plan.global_batch_size`` samples of the (unsharded) epoch order, cut into
``plan.micro_batches`` micro-batches; this rank gets only its ``plan.slots``. The state is then
counted in whole steps: it moves past a step when the rank's last micro-batch of that step is
handed out, and is the same on every rank and for every world size, so a checkpoint taken at a
step boundary resumes on any number of ranks. Finite iteration yields the epoch's whole steps
(the tail that fills no step is left to the epoch order of the next epoch's reshuffle, as
``drop_last`` would).

Workers are seeded with `seed_worker` (then the user's ``worker_init_fn``) and the DataLoader's
generator comes from `create_reproducible_generator(seed)`, as in `axs_lib.data.validation_loader`.
Neither is what makes samples exact (`SeededDataset` is); they keep anything else a worker draws
fixed for a given run.

Workers ignore SIGINT, SIGTERM and SIGUSR1 (`axs_lib.workers`): a scheduler signals the whole
process group, and the stop is the main process's to act on (`axs_lib.signals.StopRequest`: save,
then leave; `close` or the end of the ``with`` block shuts the workers down through their queues).
They are forked with those signals held, so one that lands while a worker starts is discarded,
and any worker still alive when the interpreter exits is SIGKILLed (it would ignore the SIGTERM
that multiprocessing sends), so a forgotten loader cannot hang the exit.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from axs_lib.reproducibility import create_reproducible_generator
from axs_lib.sampling import ResumableSampler, SampleIndex
from axs_lib.workers import init_worker, reap_workers_at_exit, shutdown_workers, stop_signals_held

_OWNED_ARGS = ("shuffle", "sampler", "batch_sampler", "generator", "batch_size", "in_order")


class _BatchPlan:
    """The DataLoader's batch sampler: index lists from the loader's consumed state, read when an
    iteration starts (finite: the rest of the epoch; endless: on and on)."""

    def __init__(self, owner: "ResumableLoader"):
        # A weak reference: a cycle loader -> DataLoader -> plan -> loader would leave the worker
        # processes to the cycle collector, which may finalise their queues before telling them
        # to exit (each then waits out DataLoader's 5 s join timeout).
        self._owner = weakref.ref(owner)
        self.endless = False

    def __iter__(self) -> Iterator[list[SampleIndex]]:
        owner = self._owner()
        if owner is None:
            return iter(())
        # Read the state now; the generators below keep no reference to the loader (see above).
        if owner.plan is not None:
            if self.endless:
                return _endless_steps(owner.sampler.stream((owner.epoch, owner.position)), owner.plan)
            return _epoch_steps(owner.sampler.shard(owner.epoch), owner.epoch, owner.position, owner.plan)
        if self.endless:
            return _endless_batches(owner.sampler.stream((owner.epoch, owner.position)), owner.batch_size)
        return _epoch_batches(owner.sampler.shard(owner.epoch), owner.epoch, owner.position, owner.batch_size, owner.drop_last)


def _endless_batches(stream: Iterator[SampleIndex], size: int) -> Iterator[list[SampleIndex]]:
    while True:
        yield [next(stream) for _ in range(size)]


def _epoch_batches(shard: list[int], epoch: int, position: int, size: int, drop_last: bool) -> Iterator[list[SampleIndex]]:
    for start in range(position, len(shard), size):
        positions = range(start, min(start + size, len(shard)))
        if drop_last and len(positions) < size:
            return
        yield [SampleIndex(shard[p], epoch, p) for p in positions]


def _rank_part(block: list[SampleIndex], plan) -> Iterator[list[SampleIndex]]:
    """This rank's micro-batches of one step's ``block`` of samples."""
    m = plan.micro_batch_size
    for slot in plan.slots:
        yield block[slot * m:(slot + 1) * m]


def _endless_steps(stream: Iterator[SampleIndex], plan) -> Iterator[list[SampleIndex]]:
    while True:
        yield from _rank_part([next(stream) for _ in range(plan.global_batch_size)], plan)


def _epoch_steps(shard: list[int], epoch: int, position: int, plan) -> Iterator[list[SampleIndex]]:
    size = plan.global_batch_size
    for start in range(position, len(shard) - size + 1, size):
        yield from _rank_part([SampleIndex(shard[p], epoch, p) for p in range(start, start + size)], plan)


class ResumableLoader:
    """A DataLoader over ``dataset`` with an exact ``state_dict`` and O(1) resume.

    ``sampler`` is a `ResumableSampler` (pass one to shard across ranks or to keep its
    ``drop_last`` padding rule); by default ``ResumableSampler(dataset, seed, shuffle=shuffle)``.
    ``drop_last`` drops an epoch's last partial batch (finite iteration only: endless batches are
    always full). Other keyword arguments go to ``DataLoader`` (``prefetch_factor``, ``timeout``,
    ``multiprocessing_context``...). ``persistent_workers`` defaults to ``num_workers > 0``.

    ``len(loader)`` is the number of batches of a whole epoch, as for a DataLoader.

    ``plan`` (a `axs_lib.distributed.MicroBatchPlan`, ``batch_size`` its micro-batch size, the
    sampler unsharded) yields this rank's micro-batches of each step; see the module docstring.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        sampler: ResumableSampler | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        collate_fn: Callable[[list], Any] | None = None,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        worker_init_fn: Callable[[int], None] | None = None,
        plan: Any = None,
        **dataloader_kwargs: Any,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        clash = sorted(set(dataloader_kwargs) & set(_OWNED_ARGS))
        if clash:
            raise TypeError(f"ResumableLoader sets {', '.join(clash)} itself (give a ResumableSampler as sampler= instead)")
        if sampler is None:
            sampler = ResumableSampler(dataset, seed, shuffle=shuffle)  # type: ignore[arg-type]
        elif not isinstance(sampler, ResumableSampler):
            raise TypeError(f"sampler must be a ResumableSampler (its state is what resumes), got {type(sampler).__name__}")
        if hasattr(dataset, "__len__") and sampler.num_samples != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"the sampler covers {sampler.num_samples} samples but the dataset has {len(dataset)}")  # type: ignore[arg-type]
        if drop_last and len(sampler) < batch_size:
            raise ValueError(f"drop_last with batch_size {batch_size} > {len(sampler)} samples per epoch leaves no batch")
        if plan is not None:
            if plan.micro_batch_size != batch_size:
                raise ValueError(f"batch_size {batch_size} differs from the plan's micro_batch_size {plan.micro_batch_size}")
            if sampler.num_replicas != 1:
                raise ValueError("with a micro-batch plan the sampler must not be sharded (num_replicas=1): the plan "
                                 "gives each rank its micro-batches of every step")
            if plan.global_batch_size > len(sampler):
                raise ValueError(f"a global batch of {plan.global_batch_size} samples is larger than the "
                                 f"{len(sampler)} samples of an epoch")
        self.plan = plan
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.sampler = sampler
        self.drop_last = bool(drop_last)
        self.num_workers = num_workers
        self._plan = _BatchPlan(self)
        self._active: object | None = None
        self._streams: weakref.WeakSet = weakref.WeakSet()  # the iterators handed out, closed by close()
        self._loader = DataLoader(
            dataset,
            batch_sampler=self._plan,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory and torch.cuda.is_available(),
            worker_init_fn=functools.partial(init_worker, user_init=worker_init_fn),
            generator=create_reproducible_generator(seed),
            persistent_workers=num_workers > 0 if persistent_workers is None else persistent_workers,
            **dataloader_kwargs,
        )

    # ------------------------------------------------------------------ iteration

    # The consumed state lives in the sampler (one home): the DataLoader never iterates the sampler
    # itself (the plan asks it for a shard or a stream, which move nothing), so the sampler's
    # ``(epoch, position)`` is exactly what the loop consumed, and its own state_dict says so too.
    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def position(self) -> int:
        return self.sampler.position

    def _move_to(self, epoch: int, position: int) -> None:
        self.sampler.epoch, self.sampler.position = epoch, position

    def __len__(self) -> int:
        if self.plan is not None:
            return len(self.sampler) // self.plan.global_batch_size * self.plan.per_rank
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch; the state then moves to the next epoch at position 0."""
        if self.drop_last and len(self.sampler) - self.position < self.batch_size:
            self._move_to(self.epoch + 1, 0)  # what is left of this epoch makes no full batch
        if self.plan is not None and len(self.sampler) - self.position < self.plan.global_batch_size:
            self._move_to(self.epoch + 1, 0)  # what is left of this epoch makes no full step
        return self._hand_out(self._run(endless=False))

    def endless(self) -> Iterator[Any]:
        """Batches from the current state on, forever, across epoch ends (never a partial batch)."""
        return self._hand_out(self._run(endless=True))

    def _hand_out(self, stream: Iterator[Any]) -> Iterator[Any]:
        self._streams.add(stream)
        return stream

    def _run(self, endless: bool) -> Iterator[Any]:
        token = self._active = object()
        self._plan.endless = endless
        shard = len(self.sampler)
        if self.num_workers > 0:
            reap_workers_at_exit()  # they ignore multiprocessing's SIGTERM at exit (see axs_lib.workers)
        with stop_signals_held():  # workers may be forked here
            batches = iter(self._loader)  # the plan reads the state here, at the start
        if self.plan is not None:
            yield from self._run_steps(batches, token, endless, shard)
            return
        for batch in batches:
            if self._active is not token:
                raise RuntimeError("this iteration of the ResumableLoader has ended: another one started, or the loader was closed")
            position = self.position + self.batch_size
            if endless:
                self._move_to(*self.sampler.advance(self.epoch, self.position, self.batch_size))
            elif position >= shard or (self.drop_last and shard - position < self.batch_size):
                self._move_to(self.epoch + 1, 0)
            else:
                self._move_to(self.epoch, position)
            yield batch

    def _run_steps(self, batches: Iterator[Any], token: object, endless: bool, shard: int) -> Iterator[Any]:
        """Micro-batches of a plan: the state moves one whole step when the rank's last one is handed out."""
        size, per_rank = self.plan.global_batch_size, self.plan.per_rank
        for count, batch in enumerate(batches, 1):
            if self._active is not token:
                raise RuntimeError("this iteration of the ResumableLoader has ended: another one started, or the loader was closed")
            if count % per_rank == 0:
                if endless:
                    self._move_to(*self.sampler.advance(self.epoch, self.position, size))
                elif shard - (self.position + size) < size:
                    self._move_to(self.epoch + 1, 0)
                else:
                    self._move_to(self.epoch, self.position + size)
            yield batch

    # ------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at position 0 (keep the position when ``epoch`` is the current one)."""
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position", "num_samples"}`` after the last batch handed to the loop."""
        return {"epoch": self.epoch, "position": self.position, "num_samples": self.sampler.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next iteration; refuses a state of a dataset of another length."""
        if not isinstance(state, dict):
            raise ValueError(f"loader state must be a dict, got {type(state).__name__}")
        saved = state.get("num_samples", self.sampler.num_samples)
        if isinstance(saved, bool) or not isinstance(saved, int):
            raise ValueError(f"loader state: num_samples is {repr(saved)[:60]}, not a count")
        if saved != self.sampler.num_samples:
            raise ValueError(f"loader state is for {saved} samples but this dataset has {self.sampler.num_samples}: "
                             "the epoch orders would differ")
        self.sampler.load_state_dict(state)
        self._active = None  # an iteration in progress must not move the new state

    def close(self) -> None:
        """End every iterator this loader handed out (``next`` on one then stops) and stop persistent
        worker processes now.

        They also stop when the loader is freed, promptly when by reference counting. A loader held
        in a reference cycle (a framework's trainer, say) is freed by the cycle collector, which may
        close the workers' queues before DataLoader tells them to stop: each worker then costs
        DataLoader's 5 s join timeout. Call ``close()`` (or use the loader in a ``with`` block)
        when its owner is such an object; `axs_lib.lightning.ExactResume` does.
        """
        self._active = None
        try:
            for stream in list(self._streams):  # each lets go of its DataLoader iterator (and its worker queues)
                try:
                    stream.close()
                except ValueError:  # running right now (another thread, or close() from inside it): the
                    pass            # token check refuses its next batch instead
        finally:
            shutdown_workers(self._loader)

    def __enter__(self) -> "ResumableLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
