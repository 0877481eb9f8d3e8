"""A resumable sampler whose every order is a pure function of (seed, epoch).

Epoch ``e``'s order is ``torch.randperm(n)`` drawn from a generator seeded with
``derive_seed(seed, "shuffle", e)`` (the identity when ``shuffle=False``). A sampler's state is
just ``(epoch, position)``: a new sampler given that state continues exactly where the old one
stopped, in O(1), without replaying anything (`epoch_shard` is that rule, as a plain function).

`ResumableSampler` behaves like torch's samplers: finite epochs, ``len``, ``set_epoch``, shuffle,
``drop_last``, rank sharding. It yields `SampleIndex` ints (an ``int`` that also carries its
``epoch`` and ``position``), so it works wherever an int index does (``Subset``, ``random_split``,
``BatchSampler``), and a dataset can take the epoch from the index: `axs_lib.samples.SeededDataset`
seeds each sample from ``(epoch, index)`` and `axs_lib.data.TileDataset` augments from it, whichever
worker loads the sample. `ResumableSampler.stream` is the endless form, epoch after epoch, which
the Stage-1 trainer walks (through `axs_lib.loader.ResumableLoader.endless`); golden values in the
tests pin its order, since a change would reorder every run's data.

Distributed: with ``num_replicas`` W, the epoch's permutation is padded cyclically to a multiple
of W (as ``torch.utils.data.DistributedSampler`` does), or with ``drop_last`` cut to one, and rank
r takes positions r, r + W, r + 2W, ... of it. ``position`` counts within the rank's shard, so
every rank has the same shard length and all ranks roll over to the next epoch together.

What a sampler cannot know is how many of the indices it handed out the training loop has
consumed: a DataLoader pulls indices ahead of the loop (prefetch). `axs_lib.loader.ResumableLoader`
counts consumed batches and keeps them as the sampler's state (it never iterates the sampler, it
asks for a `shard` or a `stream`). Iterated directly, a sampler's `state_dict` counts what it
yielded, which is exact only when nothing reads ahead of the loop.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterator, Sized

import torch
from torch.utils.data import Sampler

from axs_lib.reproducibility import derive_seed


# --------------------------------------------------------------------------- one epoch's shard


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Every sample index of ``epoch`` in the order the samplers visit it (before sharding)."""
    if not shuffle:
        return list(range(num_samples))
    generator = torch.Generator().manual_seed(derive_seed(seed, "shuffle", epoch))
    return torch.randperm(num_samples, generator=generator).tolist()


def shard_size(num_samples: int, world_size: int, drop_last: bool = False) -> int:
    """How many indices each rank visits per epoch (DistributedSampler's ``num_samples``)."""
    return num_samples // world_size if drop_last else math.ceil(num_samples / world_size)


def epoch_shard(num_samples: int, seed: int, epoch: int, *, shuffle: bool = True, rank: int = 0,
                world_size: int = 1, drop_last: bool = False) -> list[int]:
    """The sample indices rank ``rank`` visits in ``epoch``, in order.

    The permutation is padded cyclically to ``shard_size * world_size`` (``drop_last`` False) or
    cut to it (``drop_last`` True), then strided by rank: DistributedSampler's rule.
    """
    order = epoch_order(num_samples, seed, epoch, shuffle)
    total = shard_size(num_samples, world_size, drop_last) * world_size
    if total > num_samples:
        order = (order * math.ceil(total / num_samples))[:total]
    else:
        order = order[:total]
    return order[rank::world_size]


def _check_rank(rank: int, num_replicas: int) -> None:
    # Named as the caller's keywords (``ResumableSampler(..., num_replicas=, rank=)``), not as a flag.
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")


# --------------------------------------------------------------------------- SampleIndex


class SampleIndex(int):
    """An ``int`` sample index that also carries the ``epoch`` and ``position`` it was drawn at.

    It indexes lists, tensors and datasets as the plain int does (``Subset`` and ``random_split``
    look it up as an int, so the epoch reaches only the outermost dataset). It pickles with its
    fields, so it crosses DataLoader worker queues intact.
    """

    epoch: int
    position: int

    def __new__(cls, index: int, epoch: int, position: int = -1):
        self = super().__new__(cls, index)
        self.epoch = int(epoch)
        self.position = int(position)
        return self

    def __reduce__(self):
        return (SampleIndex, (int(self), self.epoch, self.position))

    def __repr__(self) -> str:
        return f"SampleIndex({int(self)}, epoch={self.epoch}, position={self.position})"


# --------------------------------------------------------------------------- ResumableSampler


class ResumableSampler(Sampler[SampleIndex]):
    """A sampler with finite epochs, resumable mid-epoch in O(1); yields `SampleIndex` ints.

    ``iter(sampler)`` yields epoch ``sampler.epoch`` from ``sampler.position`` to its end; the
    state then moves on to the next epoch, so a loop that never calls `set_epoch` still sees a new
    order every epoch. ``set_epoch(e)`` starts epoch ``e`` at position 0, except that setting the
    current epoch keeps the position (a loop that calls ``set_epoch(epoch)`` after
    `load_state_dict` resumes mid-epoch). ``len(sampler)`` is the full epoch's length for this
    rank, as with torch's samplers.

    ``drop_last`` (as in DistributedSampler) drops the tail of the permutation that does not
    divide among the ranks instead of padding with repeats; batch-level ``drop_last`` belongs to
    the loader.
    """

    def __init__(self, data_source_or_length: Sized | int, seed: int, *, shuffle: bool = True,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if isinstance(data_source_or_length, numbers.Integral) and not isinstance(data_source_or_length, bool):
            num_samples = int(data_source_or_length)
        else:
            num_samples = len(data_source_or_length)  # type: ignore[arg-type]
        if num_samples < 1:
            raise ValueError(f"a sampler needs at least one sample, got {num_samples}")
        _check_rank(rank, num_replicas)
        derive_seed(seed)  # checks the seed now rather than at the first epoch
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shard_size = shard_size(num_samples, num_replicas, self.drop_last)
        if self.shard_size < 1:
            raise ValueError(f"drop_last leaves no sample per rank: {num_samples} samples, {num_replicas} ranks")
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.shard_size

    def shard(self, epoch: int) -> list[int]:
        """The sample indices this rank visits in ``epoch``, in order."""
        return epoch_shard(self.num_samples, self.seed, epoch, shuffle=self.shuffle, rank=self.rank,
                           world_size=self.num_replicas, drop_last=self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at position 0 (keep the position when ``epoch`` is the current one)."""
        epoch = _non_negative("epoch", epoch)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self, epoch: int, position: int, count: int) -> tuple[int, int]:
        """The state ``count`` indices after ``(epoch, position)``, across epoch ends."""
        total = position + count
        return epoch + total // self.shard_size, total % self.shard_size

    def __iter__(self) -> Iterator[SampleIndex]:
        epoch, start = self.epoch, self.position
        shard = self.shard(epoch)
        for position in range(start, self.shard_size):
            self.position = position + 1
            yield SampleIndex(shard[position], epoch, position)
        self.epoch, self.position = epoch + 1, 0

    def stream(self, start: tuple[int, int] | None = None) -> Iterator[SampleIndex]:
        """Every index from ``start`` (default: the current state) on, epoch after epoch, forever.

        Does not move the sampler's own state: the caller (the loader) counts what it consumed.
        """
        epoch, position = (self.epoch, self.position) if start is None else self._checked(*start)
        while True:
            shard = self.shard(epoch)
            for pos in range(position, self.shard_size):
                yield SampleIndex(shard[pos], epoch, pos)
            epoch, position = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"epoch", "position"} <= state.keys():
            got = sorted(map(str, state))[:4] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"sampler state must be a dict with 'epoch' and 'position', got {str(got)[:120]}")
        self.epoch, self.position = self._checked(state["epoch"], state["position"])

    def _checked(self, epoch: Any, position: Any) -> tuple[int, int]:
        epoch, position = _non_negative("epoch", epoch), _non_negative("position", position)
        if position > self.shard_size:
            raise ValueError(f"position {position} is past the end of a {self.shard_size}-sample epoch "
                             "(was the dataset's length or the number of ranks changed?)")
        if position == self.shard_size:  # a finished epoch: the next one starts
            return epoch + 1, 0
        return epoch, position


def _non_negative(name: str, value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {repr(value)[:60]}")
    return int(value)
