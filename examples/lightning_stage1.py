#!/usr/bin/env python
"""The Stage-1 U-Net trained by a PyTorch Lightning ``Trainer``, bit-exact across resumes and worker counts.

    python examples/lightning_stage1.py --data-dir tiles/ --output-dir runs/pl1 --seed 42 --steps 20 \\
        --checkpoint-every 5 --num-workers 2
    python examples/lightning_stage1.py ... --resume auto      # continue after a kill

Checkpoints land in ``<output-dir>/checkpoints/checkpoint_step_<N>.pt`` (with ``latest``); two runs
with the same flags write byte-identical files whatever ``--num-workers`` and however often they
were killed and resumed (``axs compare RUN_A RUN_B``). What makes that so is `axs_lib.lightning`:
`ExactResume` (per-step seeding, checkpoints, resume checks), its `AxsCheckpointIO` plugin, and a
`ResumableLoader` as the training dataloader. This file is only the model and the flags.

SIGTERM (to the whole process group, as Slurm sends it), SIGINT or SIGUSR1: a checkpoint at the
step reached, exit 143, 130 or 138; ``--resume auto`` continues exactly.

Augmentation: `TileDataset` draws each sample's flips, turns and speckle from its own generator,
keyed by (epoch, sample index), taking the epoch from the `SampleIndex` the loader hands it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the axs_lib beside this example

import torch  # noqa: E402

from axs_lib import argtypes  # noqa: E402
from axs_lib.cli import OneLineParser, run_handler  # noqa: E402
from axs_lib.errors import UsageError  # noqa: E402
from axs_lib.signals import StopRequested  # noqa: E402


def build_module(args, train_set):
    import lightning.pytorch as pl

    from axs_lib.lightning import resumable_loader
    from axs_lib.stage1.losses import stage1_loss
    from axs_lib.stage1.model import UNet

    class Stage1Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = UNet(width=args.width, dropout=args.dropout)

        def training_step(self, batch, batch_idx):
            pred = self.model(batch["sar"])
            loss = stage1_loss(pred, batch["optical"], batch["mask"])
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=args.lr, weight_decay=1e-4)

        def train_dataloader(self):
            return resumable_loader(train_set, args.batch_size, seed=args.seed, trainer=self.trainer,
                                    num_workers=args.num_workers)

    return Stage1Module()


def train(args) -> int:
    from axs_lib.data import TileDataset
    from axs_lib.reproducibility import derive_seed, seed_globals, set_seed
    from axs_lib.tiles import list_tiles

    try:
        import lightning.pytorch as pl
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from axs_lib.lightning import ExactResume
    except ImportError as exc:
        raise UsageError(str(exc)) from None

    output = Path(args.output_dir)
    config = {"width": args.width, "dropout": args.dropout, "lr": args.lr, "batch_size": args.batch_size,
              "augment": not args.no_augment, "max_tiles": args.max_tiles}
    exact = ExactResume(output, seed=args.seed, config=config, checkpoint_every=args.checkpoint_every)
    # refused (UsageError, one line): a checkpoint of another seed or config, one written in the
    # middle of an accumulated step, and a fresh start over an earlier run's checkpoints
    ckpt_path = exact.resume(args.resume, log=lambda line: print(line, file=sys.stderr))
    paths = list_tiles(args.data_dir, args.max_tiles)
    if args.batch_size > len(paths):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(paths)} tiles in {args.data_dir}")

    set_seed(args.seed)
    train_set = TileDataset(paths, args.seed, augment=not args.no_augment)
    seed_globals(derive_seed(args.seed, "init"))  # the initial weights depend on the seed alone
    module = build_module(args, train_set)
    try:
        trainer = pl.Trainer(
            max_steps=args.steps, max_epochs=-1, accelerator=args.accelerator, devices=1, deterministic=True,
            callbacks=[exact], plugins=[exact.checkpoint_io], enable_checkpointing=False, logger=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            default_root_dir=output,
        )
    except MisconfigurationException as exc:  # e.g. --accelerator gpu on a machine without one
        raise UsageError(f"--accelerator {args.accelerator}: {str(exc).splitlines()[0]}") from None
    if ckpt_path is not None:
        print(f"resuming from {ckpt_path}", file=sys.stderr)
    trainer.fit(module, ckpt_path=ckpt_path)
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
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
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
    try:
        return run_handler(train, args, debug=args.debug)
    except StopRequested as stop:  # SIGTERM, SIGINT or SIGUSR1: ExactResume wrote the checkpoint of the step reached
        return int(stop.code)


if __name__ == "__main__":
    sys.exit(main())
