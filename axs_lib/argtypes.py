"""Value parsers for ``argparse`` ``type=``: one wording for every command's bad numbers.

Each raises ``argparse.ArgumentTypeError``, which argparse reports as one usage line and exit 2.
"""

from __future__ import annotations

import argparse
import math



def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def number(text: str) -> float:
    """Any float ``float()`` accepts, ``inf`` and ``nan`` included (see `finite_number`)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def finite_number(text: str) -> float:
    """A float that is neither infinite nor NaN: what every hyperparameter must be."""
    value = number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_number(text: str) -> float:
    value = number(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def seed(text: str) -> int:
    """A seed: an integer in [0, 2**32 - 1]."""
    try:
        from axs_lib.reproducibility import check_seed  # imports torch: only when a seed is parsed

        return check_seed(integer(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
