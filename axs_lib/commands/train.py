"""``axs train stage1`` (also ``python scripts/train_stage1.py``): train the SAR-to-optical model."""

from __future__ import annotations

import argparse
import sys

from axs_lib.stage1.config import (AUTO_EPOCHS, AUTO_MAX_STEPS, AUTO_MIN_STEPS, AUTO_WARMUP_FRACTION, CHECKPOINT_MODES,
                                   BLOCKS, DEFAULT_SPLIT_SEED, ES_METRICS, FIELD_NAMES, HEADS, MAXIMA, ON_NONFINITE, PRECISIONS,
                                   ConfigRequest, config_text, config_warnings, read_config_file)
from axs_lib import argtypes
from axs_lib.cli import add_debug_flag
from axs_lib.portable import DEFAULT_THREADS as PORTABLE_THREADS

EXAMPLES = """examples:
  axs train stage1 --data-dir tiles/ --output-dir runs/exp1/ --seed 42 --steps 100 --max-tiles 10
  axs train stage1 --data-dir tiles/ --output-dir runs/exp1/ --seed 42 --steps 100 --resume auto
  axs train stage1 --config exp.toml --num-workers 2 --early-stopping --patience 3
  axs train stage1 --seed 7 --steps 500 --print-config > exp.yaml   # then: --config exp.yaml
  torchrun --standalone --nproc_per_node=2 scripts/train_stage1.py --data-dir tiles/ --seed 42 --steps 100 --global-batch-size 8 --micro-batch-size 2
  axs train stage1 --data-dir tiles/ --seed 42 --steps 100 --portable   # the same bits on any x86-64 machine

Two runs with the same seed, tiles and config write byte-identical checkpoints, whatever
--num-workers is, however often a run is killed and resumed with --resume auto, and on any number
of torchrun ranks that divides the micro-batches of a step.
"""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The trainer's flags. Defaults are suppressed so that we know which flags were given."""
    S = argparse.SUPPRESS
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=S, help="directory of <stem>.npz tiles (default: tiles)")
    data.add_argument("--max-tiles", type=argtypes.integer, default=S, help="use the first N tiles in name order")
    data.add_argument("--split-source", choices=("auto", "sidecar", "random"), default=S,
                      help="train/val split from tile sidecars or random 0.9/0.1 (default auto: sidecar when complete)")
    data.add_argument("--split-seed", type=argtypes.seed, default=S,
                      help=f"seed of the random train/val split, independent of --seed so a seed sweep uses the same "
                           f"tiles (default {DEFAULT_SPLIT_SEED}; a complete sidecar split wins under --split-source auto)")
    data.add_argument("--val-fraction", type=argtypes.finite_number, default=S, help="validation fraction of a random split (default 0.1)")
    data.add_argument("--no-augment", dest="augment", action="store_false", default=S, help="no flips or rotations")
    data.add_argument("--speckle-std", type=argtypes.finite_number, default=S, help="std of multiplicative SAR speckle (default 0: off)")
    data.add_argument("--keep-flagged", dest="clear_sky", action="store_false", default=S,
                      help="also train on tiles whose sidecar flags cloud/shadow or seasonal snow (default: left out, "
                           "so the model learns clear-sky optical targets)")
    train = p.add_argument_group("training")
    train.add_argument("--seed", type=argtypes.seed, default=S, help="root seed (default 42; pass it explicitly)")
    train.add_argument("--steps", type=argtypes.integer, default=S,
                       help=f"optimizer steps (default: {AUTO_EPOCHS} passes over the training tiles, at least "
                            f"{AUTO_MIN_STEPS} and at most {AUTO_MAX_STEPS}; at most {MAXIMA['steps']})")
    train.add_argument("--batch-size", "--micro-batch-size", dest="batch_size", type=argtypes.integer, default=S,
                       help=f"tiles per micro-batch (default 3, at most {MAXIMA['batch_size']})")
    train.add_argument("--accum-steps", type=argtypes.integer, default=S,
                       help=f"micro-batches per optimizer step (default 1, at most {MAXIMA['accum_steps']})")
    train.add_argument("--global-batch-size", type=argtypes.integer, default=None, metavar="G",
                       help="tiles per optimizer step, in micro-batches of --micro-batch-size: sets --accum-steps to "
                            "G / micro-batch size. Under torchrun the ranks split the micro-batches (the world size must "
                            "divide their number); the bits do not depend on the number of ranks")
    train.add_argument("--lr", type=argtypes.finite_number, default=S, help="peak AdamW learning rate (default 1e-3)")
    train.add_argument("--weight-decay", type=argtypes.finite_number, default=S, help="AdamW weight decay (default 1e-4)")
    train.add_argument("--warmup-steps", type=argtypes.integer, default=S,
                       help=f"linear warm-up before cosine decay (default {round(AUTO_WARMUP_FRACTION * 100)}%% of the "
                            "steps; a warning when >= --steps)")
    train.add_argument("--grad-clip", type=argtypes.finite_number, default=S, help="max gradient norm, 0 for none (default 1.0)")
    train.add_argument("--width", type=argtypes.integer, default=S, help=f"U-Net base channels (default 16, at most {MAXIMA['width']})")
    train.add_argument("--members", type=argtypes.integer, default=S,
                       help="U-Nets trained side by side from their own initial weights, predicting their mean: the "
                            f"mean of several seeds' runs in one run (default 1, at most {MAXIMA['members']})")
    train.add_argument("--head", choices=HEADS, default=S,
                       help="linear: bands standardised by the training targets' mean and std, each band weighing the "
                            "same in the loss (default); sigmoid: the earlier [0, 1] output")
    train.add_argument("--block", choices=BLOCKS, default=S,
                       help="residual: GroupNorm blocks with an unnormalised 1x1 shortcut that keeps each tile's "
                            "backscatter level (default); groupnorm: the earlier blocks without it")
    train.add_argument("--dropout", type=argtypes.finite_number, default=S, help="bottleneck dropout (default 0: off)")
    train.add_argument("--l1-weight", type=argtypes.finite_number, default=S, help="weight of the masked L1 loss (default 1.0)")
    train.add_argument("--ssim-weight", type=argtypes.finite_number, default=S, help="weight of 1 - SSIM in the loss (default 0: off)")
    train.add_argument("--precision", choices=PRECISIONS, default=S,
                       help="32: float32 throughout (default); bf16-mixed: bfloat16 autocast for the forward pass")
    train.add_argument("--on-nonfinite", choices=ON_NONFINITE, default=S,
                       help="when a loss or gradient is inf/NaN: stop the run with an error (default), or skip that step")
    val = p.add_argument_group("validation and early stopping")
    val.add_argument("--val-every", type=argtypes.integer, default=S, help="validate every N steps and at the end (default 50)")
    val.add_argument("--early-stopping", action="store_true", default=S, help="stop when the metric stops improving")
    val.add_argument("--patience", type=argtypes.integer, default=S, help="validations without improvement before stopping (default 5)")
    val.add_argument("--min-delta", type=argtypes.finite_number, default=S, help="smallest change that counts as improvement (default 0)")
    val.add_argument("--es-metric", choices=ES_METRICS, default=S,
                     help="monitored metric (default val_loss); psnr, ssim, sam, mae, rmse as axs evaluate computes them")
    val.add_argument("--es-mode", choices=("min", "max"), default=S,
                     help="min: lower is better; max: higher. Default: the metric's own (max for psnr and ssim, min "
                          "for the others); a mode that contradicts the metric is refused")
    det = p.add_argument_group("determinism and hardware")
    det.add_argument("--no-deterministic", dest="deterministic", action="store_false", default=S,
                     help="allow nondeterministic kernels (faster on GPU, not reproducible)")
    det.add_argument("--benchmark", action="store_true", default=S, help="cuDNN autotuning (not reproducible)")
    det.add_argument("--device", default=S, help="auto (default), cpu, cuda or cuda:N")
    det.add_argument("--portable", action="store_true", default=S,
                     help="the same bits on any core count and any x86-64 CPU with AVX2: fixed thread count, ATen, "
                          "oneDNN and MKL pinned to AVX2 (CPU only; see docs/distributed.md)")
    det.add_argument("--threads", type=argtypes.integer, default=S, metavar="N",
                     help="intra-op threads, recorded in the run (default: torch's, one per core; with --portable "
                          f"{PORTABLE_THREADS}); results depend on it unless --portable fixes it")
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", default=S, help="run directory (default runs/stage1_seed<SEED>)")
    run.add_argument("--num-workers", type=argtypes.integer, default=S, help=f"DataLoader workers; results do not depend on it (default 0, at most {MAXIMA['num_workers']})")
    run.add_argument("--checkpoint-every", type=argtypes.integer, default=S, help="checkpoint every N steps and at the end (default 50)")
    run.add_argument("--keep-last", type=argtypes.integer, default=S, metavar="N",
                     help="keep only the newest N step checkpoints that this run wrote; a file copied in stays (default: keep all)")
    run.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=S,
                     help="keep best.pt, the checkpoint of the best validation score (default: keep it)")
    run.add_argument("--checkpoint-mode", choices=CHECKPOINT_MODES, default=S,
                     help="sync: the step waits for its checkpoint (default); async: written in the background, same files")
    run.add_argument("--log-every", type=argtypes.integer, default=S, help="log training loss every N steps (default 10)")
    run.add_argument("--no-plots", dest="plots", action="store_false", default=S, help="skip loss and sample plots")
    run.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=S,
                     help="no TensorBoard event files (written to <run>/tensorboard when tensorboard is installed)")
    run.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=S,
                     help="log params and metrics to MLflow too (pip install 'axs-lib[mlflow]'): MLFLOW_TRACKING_URI, "
                          "else a local store in <run>/mlruns; a resume continues the same MLflow run (default: off)")
    run.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=S,
                     help="log config and metrics to Weights & Biases too (pip install 'axs-lib[wandb]'), files in "
                          "<run>/wandb; WANDB_MODE=offline needs no account; a resume continues the same W&B run "
                          "(default: off). <run>/metrics.csv is written always")
    run.add_argument("--quiet", action="store_true", default=S, help="no progress bar or progress lines")
    run.add_argument("--config", metavar="FILE", help="JSON, TOML or YAML file of options (as --print-config writes); explicit flags win")
    run.add_argument("--print-config", action="store_true",
                     help="print the effective config as YAML that --config accepts, and exit without training")
    run.add_argument("--resume", nargs="?", const="auto", metavar="PATH|auto",
                     help="continue from the run's newest valid checkpoint (auto) or from PATH")
    run.add_argument("--force-resume", action="store_true",
                     help="resume even if seed, config, tiles or format differ (bits will not match)")
    run.add_argument("--adopt-checkpoint", action="store_true",
                     help="with --resume PATH: continue another run's checkpoint in this --output-dir (a fork)")
    run.add_argument("--allow-world-size-change", action="store_true",
                     help="continue a checkpoint of an earlier version that sharded each step per rank (other bits); "
                          "resuming on another number of ranks needs no flag")
    run.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --output-dir")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model", description="Train a model reproducibly.",
                       epilog="example:\n  axs train stage1 --data-dir tiles/ --output-dir runs/exp1/ --seed 42 --steps 100",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    models = p.add_subparsers(dest="model", metavar="MODEL", required=True)
    stage1 = models.add_parser(
        "stage1",
        help="Sentinel-1 SAR (VV, VH) to Sentinel-2 optical (B2, B3, B4, B8)",
        description="Train the Stage-1 U-Net on NPZ tiles with bit-exact reproducibility.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(stage1)
    add_debug_flag(stage1)
    stage1.set_defaults(func=run)


def _log(quiet: bool):
    def log(line: str) -> None:
        if line.startswith(("warning:", "notice:")):
            print(line, file=sys.stderr, flush=True)
        elif not quiet:
            print(line, flush=True)  # a log file (nohup, Slurm) shows each line while the run is alive
    return log


def run(args: argparse.Namespace) -> int:
    request = ConfigRequest({k: v for k, v in vars(args).items() if k in FIELD_NAMES},
                            read_config_file(args.config) if args.config else {}, args.global_batch_size, bool(args.resume))
    config = request.fresh()
    log = _log(config.quiet)
    if args.print_config:
        for line in config_warnings(config):
            log(line)
        print(config_text(config), end="")
        return 0
    notes = []  # said once every input has been checked, so that bad input stays one line
    if "seed" not in request.given and not args.resume:
        notes.append(f"notice: no --seed given, using the default {config.seed}; pass --seed explicitly so the run "
                     "can be reproduced from its command line")

    from axs_lib.stage1.train import ResumeRequest, train_stage1  # torch and the trainer: only when training

    resume = ResumeRequest(args.resume, args.force_resume, args.allow_world_size_change, args.adopt_checkpoint)
    result = train_stage1(config, resume, overwrite=args.overwrite, log=log, config_for_resume=request.for_resume, notes=notes)
    return result.exit_code
