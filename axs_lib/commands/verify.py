"""``axs verify`` (also ``python axs_lib/reproducibility.py --verify``): prove bit-reproducibility here."""

from __future__ import annotations

import argparse

from axs_lib import argtypes
from axs_lib.cli import add_debug_flag
from axs_lib.errors import EXIT_FAILURE, EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="train a small probe repeatedly and check every bit agrees",
        description=(
            "Train a small conv net (dropout, random flips, a shuffled DataLoader with workers) "
            "several times with one seed and compare every tensor of the final state bit for bit; "
            "then stop half-way, save, restore and continue, and compare again. "
            "Exit 0 when everything matches, 1 when anything differs, 2 on bad arguments."
        ),
        epilog="example:\n  axs verify --seed 42 --iterations 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seed", type=argtypes.seed, default=42, help="root seed (default 42)")
    p.add_argument("--iterations", type=argtypes.positive_int, default=10, help="number of training repeats (default 10)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers in the probe (default 2)")
    p.add_argument("--no-deterministic", action="store_true", help="verify with deterministic algorithms off")
    p.add_argument("--show-state", action="store_true", help="print every tensor of the final state with its hash")
    add_debug_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from axs_lib.verify import describe_state, run_verification  # torch: only when verifying

    result = run_verification(
        num_iterations=args.iterations,
        seed=args.seed,
        deterministic=not args.no_deterministic,
        num_workers=args.num_workers,
        log=print,
    )
    if args.show_state and result.state is not None:
        print("Final state of iteration 1:")
        for line in describe_state(result.state):
            print(f"  {line}")
    return EXIT_OK if result.ok else EXIT_FAILURE
