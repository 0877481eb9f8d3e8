"""``axs compare A B`` (also ``python tools/compare_checkpoints.py A B``): do two runs match?"""

from __future__ import annotations

import argparse

from axs_lib import argtypes
from axs_lib.cli import add_debug_flag
from axs_lib.errors import EXIT_FAILURE, EXIT_OK

EPILOG = """examples:
  axs compare test1/checkpoints/checkpoint_step_100.pt test2/checkpoints/checkpoint_step_100.pt
  axs compare runs/exp1 runs/exp2                     every shared step; the first that diverges
  axs compare a.pt b.pt --rtol 1e-6 --ignore 'optimizer_state_dict.*' --json

exit status: 0 they match (bit for bit by default, or within --atol/--rtol),
             1 they differ, 2 bad arguments or a missing, damaged or unsafe file
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two checkpoints or two run directories, tensor by tensor",
        description=(
            "Compare two checkpoint files, or every checkpoint step two run directories share. "
            "Prints the verdict (identical bytes, identical content, equal within tolerance, different), "
            "every tensor that differs with its max absolute, relative and ULP difference, other "
            "values and keys that differ, the metadata side by side and what can explain a difference."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", metavar="A", help="checkpoint file or run directory")
    p.add_argument("b", metavar="B", help="checkpoint file or run directory")
    p.add_argument("--atol", type=argtypes.non_negative_number, default=0.0, help="absolute tolerance for float tensors (default 0: exact)")
    p.add_argument("--rtol", type=argtypes.non_negative_number, default=0.0, help="relative tolerance for float tensors, against max(|a|, |b|) (default 0)")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="skip leaves whose dotted path (or a parent's) matches, e.g. 'rng_state.*'; repeatable")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--trust", action="store_true",
                   help="load legacy pickles that can run code (only for files you made yourself)")
    add_debug_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from axs_lib.compare import Options, compare_paths, to_json  # torch: only when comparing

    options = Options(atol=args.atol, rtol=args.rtol, ignore=tuple(args.ignore), trust=args.trust)
    result = compare_paths(args.a, args.b, options)
    print(to_json(result) if args.json else result.render_text())
    return EXIT_OK if result.match else EXIT_FAILURE
