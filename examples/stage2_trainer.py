"""A second trainer on the session layer: land cover from SAR, in the shape a Stage-2 trainer takes.

`axs_lib.training.Trainer` owns the session (input checks before anything is written, the run
directory and its manifest, checkpoints and resume, logging, validation, early stopping, stop
signals, the non-finite guard, micro-batches summed the same on any number of ranks). A task
writes only what is its own, and this file is all of it for a multi-label classifier (vegetation,
water, bare or built, read off the optical bands of each tile):

* a config dataclass with the fields the session reads (`axs_lib.training.SessionConfig`) and a
  split of them into result fields (they change the bits; a resume compares them) and the rest;
* ``check_data``: list the tiles, split them, fingerprint them, plan the micro-batches;
* ``__init__``: datasets, model, optimizer, scheduler, early stopping, the `TrainingState`;
* ``micro_batch_loss`` and ``validate``.

What it inherits is exact as the Stage-1 trainer is: a rerun, 0 or 2 workers, and a stop at any
step followed by ``--resume auto`` give identical checkpoints (tests/test_training.py)::

    python examples/stage2_trainer.py --data-dir tiles/ --output-dir runs/landcover --steps 40 [--resume auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the axs_lib beside this example

from axs_lib.errors import AxsError, UsageError  # noqa: E402
from axs_lib.fingerprint.data import data_fingerprint  # noqa: E402
from axs_lib.loader import ResumableLoader  # noqa: E402
from axs_lib.reproducibility import derive_seed, seed_globals  # noqa: E402
from axs_lib.samples import SeededDataset  # noqa: E402
from axs_lib.early_stopping import EarlyStopping  # noqa: E402
from axs_lib.state import TrainingState  # noqa: E402
from axs_lib.tiles import SAR_DB_RANGE, list_tiles, read_tile  # noqa: E402
from axs_lib.training import DataCheck, ResumeRequest, Trainer, lr_factor, micro_batch_plan, run_training  # noqa: E402

CLASSES = ("vegetation", "water", "bare_or_built")


@dataclass
class LandCoverConfig:
    """What the session reads, plus the task's own fields. ``RESULT`` names the fields that change
    the bits: a checkpoint stores them and a resume with other values is refused."""

    data_dir: str
    output_dir: str
    seed: int = 42
    steps: int = 40
    batch_size: int = 4
    accum_steps: int = 1
    lr: float = 3e-3
    width: int = 8
    val_every: int = 10
    log_every: int = 10
    checkpoint_every: int = 10
    num_workers: int = 0
    patience: int = 5
    min_delta: float = 0.0
    es_metric: str = "val_loss"
    early_stopping: bool = True
    keep_last: int | None = None  # every step checkpoint kept
    keep_best: bool = True
    checkpoint_mode: str = "sync"
    on_nonfinite: str = "stop"
    grad_clip: float | None = 1.0
    device: str = "cpu"
    deterministic: bool = True
    benchmark: bool = False
    portable: bool = False
    threads: int | None = None
    quiet: bool = True

    RESULT = ("seed", "steps", "batch_size", "accum_steps", "lr", "width", "patience", "min_delta", "es_metric",
              "early_stopping", "grad_clip", "deterministic", "portable", "threads")

    def result_fields(self) -> dict:
        return {name: getattr(self, name) for name in self.RESULT}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class LandCover(Dataset):
    """SAR tiles (2, H, W) scaled to [0, 1], a random flip, and multi-hot labels from NDVI and NDWI."""

    def __init__(self, paths: list[Path], augment: bool):
        self.paths, self.augment = paths, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        tile = read_tile(self.paths[index])
        low, high = SAR_DB_RANGE
        x = torch.from_numpy(np.nan_to_num((np.clip(tile.sar, low, high) - low) / (high - low)).astype(np.float32))
        if self.augment and torch.rand(()) < 0.5:  # the global generator: SeededDataset seeds it per sample
            x = x.flip(-1)
        blue, green, red, nir = np.nan_to_num(tile.optical.astype(np.float64))
        ndvi, ndwi = (nir - red) / np.maximum(nir + red, 1.0), (green - nir) / np.maximum(green + nir, 1.0)
        labels = [(ndvi > 0.4).mean() > 0.2, (ndwi > 0.0).mean() > 0.05, ((ndvi < 0.2) & (ndwi <= 0.0)).mean() > 0.2]
        return x, torch.tensor(labels, dtype=torch.float32)


class LandCoverTrainer(Trainer):
    """The task's part of the run; everything else is `Trainer`'s."""

    name = "landcover"

    @classmethod
    def check_data(cls, config: LandCoverConfig, world, verify: bool) -> DataCheck:
        paths = list_tiles(config.data_dir)
        cut = max(1, len(paths) // 5)  # the last fifth validates: fixed by the sorted tile names
        train, val = paths[:-cut], paths[-cut:]
        plan = micro_batch_plan(config, world)
        if plan.global_batch_size > len(train):
            raise UsageError(f"{config.data_dir}: a batch of {plan.global_batch_size} tiles is larger than the "
                             f"{len(train)} training tiles")
        split = {"train": [p.name for p in train], "val": [p.name for p in val]}
        return DataCheck(config, plan, data_fingerprint(paths, split, verify=verify), (train, val))

    def __init__(self, setup, device, world, say):
        super().__init__(setup, device, world, say)
        config, (train, val) = self.config, setup.data
        seed_globals(derive_seed(config.seed, "init"))
        self.model = nn.Sequential(nn.Conv2d(2, config.width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten(), nn.Linear(config.width, len(CLASSES))).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr)
        schedule = functools.partial(lr_factor, warmup=max(1, config.steps // 10), total=config.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.stopper = EarlyStopping(config.patience, config.min_delta, "min", config.es_metric)
        loader = ResumableLoader(SeededDataset(LandCover(train, augment=True), config.seed), config.batch_size,
                                 seed=config.seed, plan=self.plan, num_workers=config.num_workers)
        self.state = TrainingState(seed=config.seed, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                   early_stopping=self.stopper, loader=loader)
        if setup.ckpt is not None:  # the loader's position is part of the state: restored with it
            self.state.load_state_dict(setup.ckpt, source=str(setup.ckpt_path))
        self.attach_data(loader, DataLoader(LandCover(val, augment=False), batch_size=config.batch_size))

    def micro_batch_loss(self, batch) -> torch.Tensor:
        x, labels = (t.to(self.device) for t in batch)
        return nn.functional.binary_cross_entropy_with_logits(self.model(x), labels)

    def validate(self) -> dict[str, float]:
        self.model.eval()
        losses, right, count = [], 0, 0
        with torch.no_grad():
            for x, labels in self.val_loader:
                logits = self.model(x.to(self.device))
                losses.append(nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum").item())
                right += int(((logits > 0).float() == labels).sum())
                count += labels.numel()
        self.model.train()
        return {"val_loss": sum(losses) / count, "accuracy": right / count}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train a land-cover classifier on the axs session layer.", allow_abbrev=False)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--resume", choices=["auto"])
    args = p.parse_args(argv)
    config = LandCoverConfig(args.data_dir, args.output_dir, seed=args.seed, steps=args.steps, num_workers=args.num_workers)
    try:
        return run_training(LandCoverTrainer, config, ResumeRequest(args.resume), log=print).exit_code
    except AxsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
