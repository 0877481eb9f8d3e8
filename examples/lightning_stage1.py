#!/usr/bin/env python
"""The Stage-1 U-Net trained by a PyTorch Lightning ``Trainer``, bit-exact across resumes and worker counts.

    python examples/lightning_stage1.py --data-dir tiles/ --output-dir runs/pl1 --seed 42 --steps 20 \\
        --checkpoint-every 5 --num-workers 2
    python examples/lightning_stage1.py ... --resume auto      # continue after a kill
    python examples/lightning_stage1.py ... --devices 2        # DDP, one process per device
    python examples/lightning_stage1.py ... --batch-size 1 --global-batch-size 4 --devices 2
                                                   # the same bits as on one device (docs/lightning.md)

Checkpoints land in ``<output-dir>/checkpoints/checkpoint_step_<N>.pt`` (with ``latest``); two runs
with the same flags write byte-identical files whatever ``--num-workers`` and however often they
were killed and resumed (``axs compare RUN_A RUN_B``). What makes that so is `axs_lib.lightning`:
`ExactResume` (per-step seeding, checkpoints, resume checks), its `AxsCheckpointIO` plugin, and a
`ResumableLoader` as the training dataloader. This file is only the model, the data and the flags.

Everything a Lightning user keeps on stays on: the CSV logger (``<output-dir>/lightning_logs/
version_<N>/metrics.csv``, one version per process), the progress bar, and validation every
``--val-every`` steps. None of them changes a checkpoint's bytes: validation runs in eval mode,
draws nothing from the global generators (its loader has its own generator, and `ExactResume`
re-seeds them before every training batch anyway), and Lightning counts its batches in the
``loops`` state the same way whether the run was interrupted or not.

Tiles are split as the Stage-1 trainer splits them (`axs_lib.split.make_split`, ``auto``: the
sidecars' ``split`` field when every tile has one, otherwise a seeded random split; tiles whose
sidecar says ``test`` never train nor validate), and the tiles flagged cloudy or snowy are left out
of both (`axs_lib.split.leave_out_flagged`).

SIGTERM (to the whole process group, as Slurm sends it), SIGINT or SIGUSR1: a checkpoint at the
step reached, exit 143, 130 or 138; ``--resume auto`` continues exactly (and says so when there is
no checkpoint to continue).

Augmentation: `TileDataset` draws each sample's flips, turns and speckle from its own generator,
keyed by (epoch, sample index), taking the epoch from the `SampleIndex` the loader hands it.
Validation tiles are read with plain int keys, never augmented.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the axs_lib beside this example

import torch  # noqa: E402

from axs_lib import argtypes  # noqa: E402
from axs_lib.cli import OneLineParser, run_handler  # noqa: E402
from axs_lib.errors import UsageError  # noqa: E402
from axs_lib.signals import StopRequested  # noqa: E402


def build_module(args, train_set, val_set, exact):
    import lightning.pytorch as pl

    from axs_lib.data import validation_loader
    from axs_lib.lightning import resumable_loader
    from axs_lib.stage1.losses import stage1_loss
    from axs_lib.stage1.metrics import QualityMetrics, flat
    from axs_lib.stage1.model import UNet

    class Stage1Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = UNet(width=args.width, dropout=args.dropout)
            self.quality = QualityMetrics()
            # --global-batch-size: each batch is a step's micro-batches, whose gradients
            # ExactResume.backward sums in one fixed tree (the same bits on any number of devices)
            self.automatic_optimization = args.global_batch_size is None

        def loss(self, batch):
            return stage1_loss(self.model(batch["sar"]), batch["optical"], batch["mask"])

        def training_step(self, batch, batch_idx):
            if self.automatic_optimization:
                loss, size = self.loss(batch), batch["sar"].shape[0]
            else:
                loss, size = exact.backward(self, batch, self.loss), args.global_batch_size
                self.optimizers().step()
            self.log("train_loss", loss, prog_bar=True, batch_size=size)
            return loss

        def on_validation_epoch_start(self):
            self.quality = QualityMetrics()

        def validation_step(self, batch, batch_idx):
            pred = self.model(batch["sar"])
            loss = stage1_loss(pred, batch["optical"], batch["mask"])
            self.quality.update(pred, batch["optical"], batch["mask"])
            self.log("val_loss", loss, prog_bar=True, batch_size=batch["sar"].shape[0])

        def on_validation_epoch_end(self):
            # pooled over the validation tiles, as the Stage-1 trainer's val metrics (MAE, RMSE in reflectance x 10000)
            self.log_dict({f"val_{name}": value for name, value in flat(self.quality.result()).items()})

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=args.lr, weight_decay=1e-4)

        def train_dataloader(self):
            return resumable_loader(train_set, args.batch_size, seed=args.seed, trainer=self.trainer,
                                    num_workers=args.num_workers, global_batch_size=args.global_batch_size)

        def val_dataloader(self):
            # index order, plain int keys (no augmentation), its own seeded generator, workers that
            # ignore the stop signals: the Stage-1 trainer's validation loader
            return validation_loader(val_set, args.batch_size, args.num_workers, args.seed)

    return Stage1Module()


def split_tiles(args):
    """Train and validation tiles: the Stage-1 trainer's split (a ``test`` tile never trains)."""
    from axs_lib.sampling import shard_size
    from axs_lib.split import leave_out_flagged, make_split
    from axs_lib.stage1.config import DEFAULT_SPLIT_SEED
    from axs_lib.tiles import list_tiles

    split = leave_out_flagged(make_split(list_tiles(args.data_dir, args.max_tiles), DEFAULT_SPLIT_SEED, args.val_fraction))
    if not split.train:
        raise UsageError(f"no training tile left in {args.data_dir} (every tile is held out for test or flagged)")
    if args.global_batch_size is not None:
        if args.global_batch_size > len(split.train):
            raise UsageError(f"--global-batch-size {args.global_batch_size} is larger than the {len(split.train)} "
                             f"training tiles in {args.data_dir}")
        return split
    per_rank = shard_size(len(split.train), args.devices)  # each rank's share of an epoch (ResumableSampler)
    if args.batch_size > per_rank:
        share = "" if args.devices == 1 else f" each of the {args.devices} ranks gets of the {len(split.train)}"
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {per_rank} training tiles{share} in {args.data_dir}")
    return split


def _tiles(paths) -> str:
    return f"{len(paths)} tile" + ("" if len(paths) == 1 else "s")


def train(args) -> int:
    from axs_lib.data import TileDataset
    from axs_lib.distributed import MicroBatchPlan
    from axs_lib.reproducibility import derive_seed, seed_globals, set_seed

    try:
        import lightning.pytorch as pl
        from lightning.fabric.utilities.exceptions import MisconfigurationException
        from lightning.pytorch.loggers import CSVLogger
        from lightning.pytorch.utilities import rank_zero_only

        from axs_lib.lightning import ExactResume, GradientTreeStrategy
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    if args.global_batch_size is not None:  # the sizes checked before any process starts (PlanError: one line)
        MicroBatchPlan.from_global(args.global_batch_size, args.batch_size, args.devices)

    # Lightning warns when an epoch has fewer batches than --log-every; with max_epochs=-1 it counts
    # the interval across epochs (_LoggerConnector.should_update_logs), so the losses are logged anyway
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
    output = Path(args.output_dir)
    config = {"width": args.width, "dropout": args.dropout, "lr": args.lr, "batch_size": args.batch_size,
              "augment": not args.no_augment, "max_tiles": args.max_tiles, "val_fraction": args.val_fraction}
    exact = ExactResume(output, seed=args.seed, config=config, checkpoint_every=args.checkpoint_every,
                        allow_world_size_change=args.allow_world_size_change, global_batch_size=args.global_batch_size)
    # refused (UsageError, one line): a checkpoint of another seed or config, one written in the
    # middle of an accumulated step, and a fresh start over an earlier run's checkpoints
    # every rank runs this script; rank 0 speaks for them (Lightning sets the rank of the copies
    # it starts in their environment, read by rank_zero_only at import)
    say = lambda line: print(line, file=sys.stderr) if rank_zero_only.rank == 0 else None  # noqa: E731
    # every rank runs this (Lightning's DDP launcher starts the other ranks as copies of this
    # command); the checkpoint's world size is checked against --devices before anything starts
    ckpt_path = exact.resume(args.resume, world_size=args.devices, log=say)
    split = split_tiles(args)
    say(f"{len(split.train)} train / {len(split.val)} val tiles"
        + (f"; {_tiles(split.excluded)} held out for test" if split.excluded else "")
        + (f"; {_tiles(split.flagged)} cloudy or snowy left out" if split.flagged else ""))

    set_seed(args.seed)
    train_set = TileDataset(split.train, args.seed, augment=not args.no_augment)
    val_set = TileDataset(split.val, args.seed, augment=False) if split.val else None
    seed_globals(derive_seed(args.seed, "init"))  # the initial weights depend on the seed alone
    module = build_module(args, train_set, val_set, exact)
    validate = val_set is not None and not args.no_validation
    try:
        trainer = pl.Trainer(
            max_steps=args.steps, max_epochs=-1, accelerator=args.accelerator, devices=args.devices, deterministic=True,
            # several devices: one process per device, the others started as copies of this command
            # (not ddp_spawn, which would have to pickle the module's closures)
            strategy="auto" if args.devices == 1 else "ddp" if args.global_batch_size is None else GradientTreeStrategy(),
            callbacks=[exact], plugins=[exact.checkpoint_io], enable_checkpointing=False,
            logger=CSVLogger(output) if not args.no_logger else False, log_every_n_steps=args.log_every,
            enable_progress_bar=not args.no_progress_bar, enable_model_summary=False,
            # validation every --val-every optimizer steps, counted across epochs
            val_check_interval=args.val_every, check_val_every_n_epoch=None,
            limit_val_batches=None if validate else 0, num_sanity_val_steps=None if validate else 0,
            default_root_dir=output,
        )
    except MisconfigurationException as exc:  # e.g. --accelerator gpu on a machine without one
        raise UsageError(f"--accelerator {args.accelerator}: {str(exc).splitlines()[0]}") from None
    if ckpt_path is not None:
        say(f"resuming from {ckpt_path}")
    trainer.fit(module, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        print(f"done: {trainer.global_step} steps, checkpoints in {exact.manager.folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lightning_stage1.py", description="Stage-1 U-Net under PyTorch Lightning, bit-exact.",
                           epilog="example:\n  python examples/lightning_stage1.py --data-dir tiles/ --output-dir runs/pl1 "
                                  "--seed 42 --steps 20 --checkpoint-every 5",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder of tiles (axs tiles demo / synth)")
    parser.add_argument("--output-dir", required=True, help="run folder; checkpoints go to <output-dir>/checkpoints")
    parser.add_argument("--seed", type=argtypes.seed, default=42)
    parser.add_argument("--steps", type=argtypes.positive_int, default=20, help="optimizer steps in all")
    parser.add_argument("--num-workers", type=argtypes.integer, default=0, help="DataLoader workers (the bits do not change)")
    parser.add_argument("--checkpoint-every", type=argtypes.positive_int, default=None,
                        help="write a checkpoint every N steps (and always at the last step)")
    parser.add_argument("--resume", choices=["auto"], default=None, help="continue from the newest valid checkpoint")
    parser.add_argument("--batch-size", type=argtypes.positive_int, default=4)
    parser.add_argument("--width", type=argtypes.positive_int, default=16, help="U-Net base channels")
    parser.add_argument("--dropout", type=argtypes.non_negative_number, default=0.1)
    parser.add_argument("--lr", type=argtypes.finite_number, default=1e-3)
    parser.add_argument("--max-tiles", type=argtypes.positive_int, default=None)
    parser.add_argument("--no-augment", action="store_true", help="no flips, turns or speckle")
    parser.add_argument("--val-fraction", type=argtypes.finite_number, default=0.1,
                        help="share of the tiles that validate (a sidecar split wins; see axs_lib.split)")
    parser.add_argument("--val-every", type=argtypes.positive_int, default=10, help="validate every N steps")
    parser.add_argument("--log-every", type=argtypes.positive_int, default=10, help="log the training loss every N steps")
    parser.add_argument("--no-validation", action="store_true", help="skip validation (the bits do not change)")
    parser.add_argument("--no-logger", action="store_true", help="no CSV log in <output-dir>/lightning_logs (the bits do not change)")
    parser.add_argument("--no-progress-bar", action="store_true", help="no progress bar (the bits do not change)")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
    parser.add_argument("--devices", type=argtypes.positive_int, default=1,
                        help="processes (CPU) or GPUs, one rank each (DDP); --batch-size is per rank")
    parser.add_argument("--global-batch-size", type=argtypes.positive_int, default=None,
                        help="tiles per optimizer step, in micro-batches of --batch-size summed in one fixed tree: the "
                             "same bits on any --devices that divides the micro-batches (default: --batch-size per rank, "
                             "Lightning's DDP)")
    parser.add_argument("--allow-world-size-change", action="store_true",
                        help="resume a checkpoint of another --devices (re-sharded deterministically, with other bits)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.num_workers < 0:
        print(f"{parser.prog}: error: --num-workers must be >= 0, got {args.num_workers}", file=sys.stderr)
        return 2
    if not 0 < args.val_fraction < 1:
        print(f"{parser.prog}: error: --val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}",
              file=sys.stderr)
        return 2
    try:
        return run_handler(train, args, debug=args.debug)
    except StopRequested as stop:  # SIGTERM, SIGINT or SIGUSR1: ExactResume wrote the checkpoint of the step reached
        return int(stop.code)


if __name__ == "__main__":
    sys.exit(main())
