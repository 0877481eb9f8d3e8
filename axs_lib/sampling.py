"""A resumable, infinite epoch sampler whose every order is a pure function of (seed, epoch).

The trainer counts steps, not epochs, so `EpochSampler` never ends: it walks epoch after epoch.
Epoch ``e``'s order is ``torch.randperm(n)`` drawn from a generator seeded with
``derive_seed(seed, "shuffle", e)`` (the identity when ``shuffle=False``). Its state is just
``(epoch, position)``: a new sampler built with that state continues exactly where the old one
stopped, in O(1), without replaying anything.

Each yielded key is ``(epoch, position, index)``; `axs_lib.data.TileDataset` uses ``epoch`` and
``index`` to derive the sample's augmentation, and the trainer uses the last key of a batch with
`EpochSampler.next_state` to know the state to save.

Distributed: with ``world_size`` W, the epoch's permutation is padded cyclically (as
``torch.utils.data.DistributedSampler`` does) to a multiple of W, and rank r takes positions r,
r + W, r + 2W, ... of it. ``position`` counts within the rank's shard, so every rank has the same
shard length and all ranks roll over to the next epoch at the same step.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler

from axs_lib.reproducibility import derive_seed

Key = tuple[int, int, int]


class EpochSampler(Sampler[Key]):
    """Infinite sampler yielding ``(epoch, position, index)`` from state ``start = (epoch, position)``."""

    def __init__(
        self,
        num_samples: int,
        seed: int,
        *,
        shuffle: bool = True,
        start: tuple[int, int] = (0, 0),
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.shard_size = math.ceil(num_samples / world_size)
        epoch, position = start
        if epoch < 0 or not 0 <= position < self.shard_size:
            raise ValueError(f"start state {start} out of range: need epoch >= 0 and 0 <= position < {self.shard_size}")
        self.start = (int(epoch), int(position))

    def shard(self, epoch: int) -> list[int]:
        """The sample indices this rank visits in ``epoch``, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "shuffle", epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        padded = self.shard_size * self.world_size
        order = (order * math.ceil(padded / self.num_samples))[:padded]
        return order[self.rank :: self.world_size]

    def next_state(self, epoch: int, position: int) -> tuple[int, int]:
        """The state after consuming key ``(epoch, position, _)``: next position, or next epoch at 0."""
        if position + 1 < self.shard_size:
            return epoch, position + 1
        return epoch + 1, 0

    def state_after(self, batch: dict) -> tuple[int, int]:
        """The state after consuming ``batch`` (a collated dict with ``epoch`` and ``position`` tensors)."""
        return self.next_state(int(batch["epoch"][-1]), int(batch["position"][-1]))

    def __iter__(self) -> Iterator[Key]:
        epoch, position = self.start
        while True:
            shard = self.shard(epoch)
            for pos in range(position, self.shard_size):
                yield epoch, pos, shard[pos]
            epoch, position = epoch + 1, 0
