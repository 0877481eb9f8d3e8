"""Text and JSON for people and scripts: tables, short values, JSON without NaN.

The commands that print (``axs compare``, ``axs runs``, ``axs inspect``, ``axs evaluate``) share
these, so a table looks the same everywhere and every ``--json`` is valid JSON (which has no NaN or
infinity). Nothing here imports torch or numpy: ``axs runs`` over run.json files stays fast; a
tensor is recognised by its module in ``sys.modules`` (as `axs_lib.bitdiff` does).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Sequence


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def describe_leaf(value: Any) -> Any:
    """A JSON-safe stand-in for a checkpoint leaf: numbers, strings, bools and None as they are
    (non-finite floats as strings), tensors as a short description, anything else as its ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if _is_tensor(value):
        return f"tensor({str(value.dtype).removeprefix('torch.')}, shape={list(value.shape)})"
    if isinstance(value, (list, tuple)) and not value:
        return []
    return repr(value)


def json_safe(obj: Any, nonfinite: Callable[[float], Any] = str) -> Any:
    """``obj`` (dicts, lists, tuples, numbers) with every NaN or infinity replaced by
    ``nonfinite(value)``: a string such as ``"nan"`` by default, None where "nothing to measure"
    reads better (the quality metrics)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return nonfinite(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v, nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, nonfinite) for v in obj]
    return obj


def short_repr(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else describe_leaf(value) if _is_tensor(value) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def format_number(x: float | int | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return "0" if x == 0 else f"{x:.3g}"


def format_shape(shape: Sequence[int] | None) -> str:
    return "-" if shape is None else "(" + ", ".join(map(str, shape)) + ")"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart, indented by two."""
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in (headers, *rows)]
