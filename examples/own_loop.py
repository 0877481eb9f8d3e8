"""Your own training loop, bit-exact: a land-cover classifier on the tiles, written the usual way.

A multi-label classifier says which land covers a SAR crop shows (vegetation, water, bare or
built), with labels read off the optical bands of the same crop. The dataset is written as people
write it: random crop, flips and turns and speckle noise drawn from the global generators
(``np.random``, ``random``, ``torch.randn``) in ``__getitem__``; the model has dropout; AdamW and
OneCycleLR train it. Five toolkit lines make it exact (reruns, any ``--num-workers``, a SIGKILL at
any moment and ``--resume auto`` give checkpoints identical to the byte):

* ``SeededDataset(dataset, seed)``: each sample's global-RNG draws come from (seed, epoch, index);
* ``ResumableLoader(...).endless()``: batches whose state counts what the loop consumed;
* ``seed_globals(derive_seed(seed, "step", step))`` at the top of every step: dropout;
* ``TrainingState(...)``: model, optimizer, scheduler, loader and step as one checkpoint dict;
* ``CheckpointManager(output_dir)``: atomic ``checkpoints/checkpoint_step_<N>.pt``, ``latest``,
  resume from the newest valid one, refused when its seed, config or tiles differ from this run's
  (and a fresh start refused over an earlier run's checkpoints);
* ``StopRequest()``: SIGTERM, SIGINT or SIGUSR1 (to the whole process group, as Slurm sends it)
  becomes a flag checked after each step: the loop checkpoints at the step it reached and exits
  143, 130 or 138; ``--resume auto`` continues it exactly. The loader's workers ignore the signal.

    python examples/own_loop.py --data-dir tiles/ --output-dir runs/own --seed 42 --steps 40 \\
        --num-workers 2 --checkpoint-every 10 [--resume auto]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the axs_lib beside this example

from axs_lib.errors import AxsError  # noqa: E402
from axs_lib.fingerprint.data import data_fingerprint  # noqa: E402
from axs_lib.loader import ResumableLoader  # noqa: E402
from axs_lib.reproducibility import derive_seed, seed_globals, set_seed  # noqa: E402
from axs_lib.run_dir import CheckpointManager  # noqa: E402
from axs_lib.samples import SeededDataset  # noqa: E402
from axs_lib.signals import StopRequest, StopRequested  # noqa: E402
from axs_lib.state import TrainingState  # noqa: E402
from axs_lib.tiles import SAR_DB_RANGE, list_tiles, read_tile  # noqa: E402

CLASSES = ("vegetation", "water", "bare_or_built")


# --------------------------------------------------------------------------- the user's dataset


class LandCoverTiles(Dataset):
    """SAR crops (2, crop, crop) and multi-hot land-cover labels read off the optical bands."""

    def __init__(self, refs: list, crop: int):
        self.refs = refs
        self.crop = crop

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index):
        tile = read_tile(self.refs[index])
        sar, optical = tile.sar, tile.optical
        height, width = sar.shape[-2:]
        crop = min(self.crop, height, width)
        top = np.random.randint(0, height - crop + 1)  # global numpy generator
        left = np.random.randint(0, width - crop + 1)
        sar = sar[:, top : top + crop, left : left + crop]
        optical = optical[:, top : top + crop, left : left + crop]
        if np.random.rand() < 0.5:
            sar, optical = sar[..., ::-1], optical[..., ::-1]
        turns = random.randint(0, 3)  # python's global generator
        sar, optical = np.rot90(sar, turns, axes=(1, 2)), np.rot90(optical, turns, axes=(1, 2))
        low, high = SAR_DB_RANGE
        x = torch.from_numpy(np.nan_to_num((np.clip(sar, low, high) - low) / (high - low)).astype(np.float32))
        x = x + 0.01 * torch.randn(x.shape)  # global torch generator
        return x, torch.from_numpy(land_cover_labels(optical))


def land_cover_labels(optical: np.ndarray) -> np.ndarray:
    """Multi-hot (vegetation, water, bare or built) from NDVI and NDWI fractions of the crop."""
    blue, green, red, nir = np.nan_to_num(optical.astype(np.float64))
    ndvi = (nir - red) / np.maximum(nir + red, 1.0)
    ndwi = (green - nir) / np.maximum(green + nir, 1.0)
    vegetation = (ndvi > 0.4).mean() > 0.2
    water = (ndwi > 0.0).mean() > 0.05
    bare = ((ndvi < 0.2) & (ndwi <= 0.0)).mean() > 0.2
    return np.array([vegetation, water, bare], dtype=np.float32)


class Classifier(nn.Module):
    def __init__(self, width: int = 16, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, len(CLASSES)))

    def forward(self, x):
        return self.head(self.features(x))


# --------------------------------------------------------------------------- the loop


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a land-cover classifier of your own, bit-exactly.", allow_abbrev=False)
    p.add_argument("--data-dir", required=True, help="directory of .npz tiles")
    p.add_argument("--output-dir", required=True, help="run directory (checkpoints/ inside)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--resume", choices=["auto"], help="continue from the newest valid checkpoint")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "crop", "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_workers < 0:
        p.error("--num-workers must be >= 0")
    return args


def train(args: argparse.Namespace, log=print) -> int:
    """Train to ``args.steps``; return the final step. A stop signal ends it early with a
    checkpoint at the step reached, by raising `StopRequested` (a SystemExit: exit 143, 130, 138)."""
    refs = list_tiles(args.data_dir)
    config = {"steps": args.steps, "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr, "num_tiles": len(refs)}
    data = data_fingerprint(refs, {"train": sorted(Path(r).name for r in refs)})
    run = CheckpointManager(args.output_dir)
    # Refused (UsageError, one line): a checkpoint of another seed, config or tile set, and a fresh
    # start into a folder that holds checkpoints (it would write over them).
    found = run.resume("auto" if args.resume else None, log=log, seed=args.seed, config=config, data_fingerprint=data)

    set_seed(args.seed)  # determinism flags (and the guide's seed_info)
    seed_globals(derive_seed(args.seed, "init"))
    model = Classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps)
    dataset = SeededDataset(LandCoverTiles(refs, args.crop), args.seed)
    loader = ResumableLoader(dataset, args.batch_size, seed=args.seed, num_workers=args.num_workers)
    state = TrainingState(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, seed=args.seed,
                          extras={"config": config, "data_fingerprint": data})
    if found is not None:
        state.load_state_dict(found[1], source=str(found[0]))
        log(f"resuming from {found[0]} at step {state.step}")

    loss_fn = nn.BCEWithLogitsLoss()
    batches = loader.endless()
    model.train()
    with loader, run, StopRequest() as stop:
        while state.step < args.steps:
            seed_globals(derive_seed(args.seed, "step", state.step))  # dropout: a function of the step
            x, y = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            state.step += 1
            if state.step % args.checkpoint_every == 0 or state.step == args.steps or stop.requested:
                run.save(state.state_dict(), state.step)
                log(f"step {state.step}: loss {loss.item():.4f}, checkpoint written")
            if stop.requested:
                log(f"stopped by {stop.name} at step {state.step}; continue with --resume auto")
                raise StopRequested(stop.signum)  # leaving the with block stops the workers, finishes the write
    return state.step


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except AxsError as exc:
        print(f"own_loop: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
