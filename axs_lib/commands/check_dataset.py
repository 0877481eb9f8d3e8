"""``axs check-dataset MODULE:FACTORY``: is a dataset's randomness exact? (shell over `axs_lib.check_dataset`)."""

from __future__ import annotations

import argparse

from axs_lib import argtypes
from axs_lib.cli import add_debug_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-dataset",
        help="draw a dataset's samples with 0 and N workers and across a save/restore; compare bit for bit",
        description=(
            "Build the dataset MODULE:FACTORY returns (or names), wrap it in SeededDataset unless it "
            "already is, and draw the same samples four ways: no workers, again from a new dataset, with "
            "--num-workers workers, and across a loader save/restore. Every field of every sample is "
            "compared bit for bit; the first sample (epoch, index) and field that differ are named. "
            "MODULE is a module name (the current directory is on the path) or a .py file. "
            "Exit 0 when exact, 1 when not, 2 on bad input."
        ),
        epilog="example:\n  axs check-dataset mypkg.data:make_train_dataset --num-workers 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="MODULE:FACTORY", help="where the dataset or its factory is, e.g. mypkg.data:make_dataset")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="seed for SeededDataset and the sampler (default 0)")
    p.add_argument("--batches", type=argtypes.positive_int, default=4, help="batches drawn each way (default 4, at least 2)")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=4, help="samples per batch (default 4)")
    p.add_argument("--num-workers", type=argtypes.positive_int, default=2, help="workers of the multi-process draws (default 2)")
    add_debug_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from axs_lib.check_dataset import check_dataset, load_factory
    from axs_lib.errors import EXIT_FAILURE, EXIT_OK

    report = check_dataset(load_factory(args.target), seed=args.seed, batches=args.batches,
                           batch_size=args.batch_size, num_workers=args.num_workers, name=args.target)
    for line in report.lines():
        print(line)
    return EXIT_OK if report.exact else EXIT_FAILURE
