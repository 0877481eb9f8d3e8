"""The reproducibility probe behind ``axs verify`` and `verify_reproducibility`.

A check that reseeds and draws three numbers cannot fail. This one trains: a small conv net with
dropout, random flips per sample, a shuffled DataLoader with worker processes, AdamW, a few
epochs; it repeats that ``num_iterations`` times and compares every tensor of the final model and
optimizer state bit for bit. It then trains half-way, saves a checkpoint, restores it into a
fresh model and optimizer in a fresh loop and finishes: the result must match too. Randomness
follows the trainer's scheme (see `axs_lib.reproducibility.derive_seed`), so the probe tests the
mechanism training depends on, at a size that runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from axs_lib import bitdiff
from axs_lib.checkpoint import iter_leaves, load_checkpoint, save_checkpoint, tensor_bytes
from axs_lib.errors import UsageError
from axs_lib.reproducibility import (
    create_reproducible_generator,
    derive_seed,
    seed_globals,
    seed_worker,
    set_seed,
)

SAMPLES = 48
BATCH = 8
EPOCHS = 2
SIZE = 16
MAX_WORKERS = 256  # as the trainer's --num-workers: more would only cost start-up time


def _augment(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips, drawn from the sample's own generator."""
    flips = torch.randint(0, 2, (2,), generator=generator)
    dims = [d for d, f in zip((-1, -2), flips.tolist()) if f]
    return image.flip(dims) if dims else image


class _ProbeData(Dataset):
    """Synthetic image pairs made from the seed; keys are ``(epoch, index)``."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(derive_seed(seed, "verify", "data"))
        self.x = torch.randn(SAMPLES, 2, SIZE, SIZE, generator=g)
        self.y = torch.tanh(self.x.sum(1, keepdim=True)) + 0.1 * torch.randn(SAMPLES, 1, SIZE, SIZE, generator=g)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(derive_seed(self.seed, "augment", self.epoch, index))
        pair = _augment(torch.cat([self.x[index], self.y[index]]), g)
        return pair[:2], pair[2:]


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(8, 1, 3, padding=1),
    )


def _fresh(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    seed_globals(derive_seed(seed, "init"))
    model = _model()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model, optimizer, data: _ProbeData, seed: int, epochs: range, num_workers: int) -> None:
    steps_per_epoch = SAMPLES // BATCH
    for epoch in epochs:
        data.epoch = epoch
        loader = DataLoader(
            data, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=num_workers,
            worker_init_fn=seed_worker, generator=create_reproducible_generator(derive_seed(seed, "shuffle", epoch) & 0xFFFFFFFF),
        )
        model.train()
        for i, (x, y) in enumerate(loader):
            seed_globals(derive_seed(seed, "step", epoch * steps_per_epoch + i, 0))
            loss = nn.functional.l1_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def _state(model, optimizer) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def first_difference(a: dict, b: dict) -> str | None:
    """Describe the first leaf where two nested states differ, or None when every bit agrees.

    The walk is `axs_lib.bitdiff`'s (a NaN equals the same NaN, ``-0.0`` is not ``0.0``); a tensor
    that differs is described by how many elements differ and the largest absolute difference.
    """
    found = bitdiff.first_difference(a, b)
    if found is None:
        return None
    where = f"{found.dotted}: " if found.dotted else ""
    if found.count is not None and isinstance(found.a, torch.Tensor):
        return f"{where}{found.count} of {found.total} elements differ, max abs diff {_max_abs_diff(found.a, found.b)}"
    return f"{where}{found.detail}"


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    """The largest ``|a - b|`` of two tensors of one shape (``nan`` when a NaN is involved)."""
    if a.is_complex():
        return "n/a (complex)"
    return f"{(a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item():.3e}"


@dataclass
class VerifyResult:
    """Outcome of `run_verification`: ``ok`` only when every iteration and the resumed run agree."""

    ok: bool
    iterations: int
    mismatches: list[str] = field(default_factory=list)
    resume_mismatch: str | None = None
    state: dict | None = None


def run_verification(
    num_iterations: int = 10,
    seed: int = 42,
    deterministic: bool = True,
    num_workers: int = 2,
    log: Callable[[str], None] = lambda line: None,
) -> VerifyResult:
    """Train the probe ``num_iterations`` times plus one stop-save-restore run and compare bits."""
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 1:
        raise UsageError(f"iterations must be a positive integer, got {num_iterations!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or not 0 <= num_workers <= MAX_WORKERS:
        raise UsageError(f"--num-workers must be an integer from 0 to {MAX_WORKERS}, got {num_workers!r}")
    log("Testing reproducibility...")
    log(f"  Running {num_iterations} iterations...")
    reference = None
    mismatches = []
    for iteration in range(num_iterations):
        set_seed(seed, deterministic=deterministic, benchmark=False)
        model, optimizer = _fresh(seed)
        _train(model, optimizer, _ProbeData(seed), seed, range(EPOCHS), num_workers)
        state = _state(model, optimizer)
        if reference is None:
            reference = state
        elif (where := first_difference(reference, state)) is not None:
            mismatches.append(f"iteration {iteration + 1} differs from iteration 1: {where}")
    if mismatches:
        log(f"  ✗ {len(mismatches)} of {num_iterations - 1} repeat iterations differ from the first")
        for line in mismatches:
            log(f"    {line}")
    else:
        log("  ✓ All iterations produced identical results")

    set_seed(seed, deterministic=deterministic, benchmark=False)
    model, optimizer = _fresh(seed)
    data = _ProbeData(seed)
    half = EPOCHS // 2
    _train(model, optimizer, data, seed, range(half), num_workers)
    with tempfile.TemporaryDirectory(prefix="axs-verify-") as tmp:
        path = Path(tmp) / "half.pt"
        save_checkpoint(_state(model, optimizer), path)
        saved = load_checkpoint(path)
    model, optimizer = _fresh(seed + 1 if seed < 2**32 - 1 else 0)  # fresh objects, other init
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    _train(model, optimizer, _ProbeData(seed), seed, range(half, EPOCHS), num_workers)
    resume_mismatch = first_difference(reference, _state(model, optimizer))
    if resume_mismatch:
        log(f"  ✗ Stopped, saved, restored and continued run differs: {resume_mismatch}")
    else:
        log("  ✓ Stopped, saved, restored and continued run matches")

    ok = not mismatches and resume_mismatch is None
    log("  ✓ Reproducibility verified!" if ok else "  ✗ Reproducibility NOT verified")
    return VerifyResult(ok, num_iterations, mismatches, resume_mismatch, reference)


def describe_state(state: dict) -> list[str]:
    """One line per tensor of a state: name, shape, dtype and a short content hash."""
    lines = []
    for name, leaf in iter_leaves(state):
        if isinstance(leaf, torch.Tensor):
            digest = hashlib.sha256(tensor_bytes(leaf)).hexdigest()[:16]
            lines.append(f"{name:<40} {str(tuple(leaf.shape)):<16} {str(leaf.dtype):<14} {digest}")
    return lines
