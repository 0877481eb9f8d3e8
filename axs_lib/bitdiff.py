"""Bit-exact equality of nested values, and where two of them first differ.

Reproducible training promises bits, so "equal" here means the same bits, not ``==``: a NaN equals
a NaN with the same payload (``float("nan") != float("nan")`` in Python), and ``-0.0`` differs from
``0.0`` (which ``==`` calls equal). Tensors and arrays are compared by their bytes, after their dtype
and shape; Python floats by their IEEE-754 bytes; other scalars and strings by type and ``==``.
Containers are walked in order: dicts key by key (the same keys in the same order), lists and
tuples item by item, a list never equal to a tuple.

`first_difference` is the one walk that `axs_lib.compare` (leaf by leaf, through `same_value`),
`axs_lib.verify` (model and optimizer states) and `axs_lib.check_dataset` (samples) use; each
renders the `Difference` it gets in its own words. The module imports neither torch nor numpy: a
value can only be a tensor or an array once its library has been imported, so the walk looks them
up in ``sys.modules`` when it meets them, and importing this module stays cheap.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Difference:
    """Where two values first differ and how.

    ``steps`` is the way down from the root: ``(kind, key)`` pairs, kind ``"key"`` for a dict key,
    ``"index"`` for a list or tuple position. ``detail`` says what differs in one phrase (``shape
    (2,) vs (3,)``, ``2 of 4 elements differ, first at (0, 0): 0.0 vs 1.0``). ``a`` and ``b`` are
    the two values found there; for arrays and tensors of one dtype and shape, ``count`` of
    ``total`` elements differ.
    """

    steps: tuple[tuple[str, Any], ...]
    detail: str
    a: Any
    b: Any
    count: int | None = None
    total: int | None = None

    @property
    def subscript(self) -> str:
        """The path as Python subscripts: ``['model'][0]``; empty for the root."""
        return "".join(f"[{key!r}]" if kind == "key" else f"[{key}]" for kind, key in self.steps)

    @property
    def dotted(self) -> str:
        """The path as `axs_lib.checkpoint.iter_leaves` names leaves: ``model.weight[0]``; empty for the root."""
        out = ""
        for kind, key in self.steps:
            out += (f".{key}" if out else str(key)) if kind == "key" else f"[{key}]"
        return out


def same_value(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same bits (see the module notes)."""
    return first_difference(a, b) is None


def first_difference(a: Any, b: Any) -> Difference | None:
    """The first place where ``a`` and ``b`` differ, walking both in order; None when bit-identical."""
    return _walk(a, b, ())


def _walk(a: Any, b: Any, steps: tuple) -> Difference | None:
    if type(a) is not type(b):
        return Difference(steps, f"type {type(a).__name__} vs {type(b).__name__}", a, b)
    if isinstance(a, dict):
        if list(a.keys()) != list(b.keys()):
            return Difference(steps, f"keys differ: {_short(list(a.keys()), 200)} vs {_short(list(b.keys()), 200)}", a, b)
        for key in a:
            found = _walk(a[key], b[key], (*steps, ("key", key)))
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return Difference(steps, f"length {len(a)} vs {len(b)}", a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            found = _walk(x, y, (*steps, ("index", i)))
            if found:
                return found
        return None
    torch, np = sys.modules.get("torch"), sys.modules.get("numpy")
    if torch is not None and isinstance(a, torch.Tensor):
        if a.dtype != b.dtype:
            return Difference(steps, f"dtype {a.dtype} vs {b.dtype}", a, b)
        if a.shape != b.shape:
            return Difference(steps, f"shape {tuple(a.shape)} vs {tuple(b.shape)}", a, b)
        return _arrays(_tensor_array(a), _tensor_array(b), steps, a, b)
    if np is not None and isinstance(a, (np.ndarray, np.generic)):
        return _arrays(np.asarray(a), np.asarray(b), steps, a, b)
    if isinstance(a, float):  # by its IEEE-754 bytes: NaN is NaN, -0.0 is not 0.0
        equal = struct.pack("<d", a) == struct.pack("<d", b)
    else:
        try:
            equal = bool(a == b)
        except Exception:  # noqa: BLE001 - objects from user code or --trust checkpoints may compare oddly
            equal = repr(a) == repr(b)
    return None if equal else Difference(steps, f"{_short(a)} vs {_short(b)}", a, b)


def _tensor_array(tensor: Any) -> Any:
    """The tensor's values as a numpy array; dtypes numpy lacks (bfloat16, float8) as same-size ints."""
    import torch

    tensor = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    try:
        return tensor.numpy()
    except TypeError:
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
        return tensor.view(ints).numpy()


def _arrays(a: Any, b: Any, steps: tuple, leaf_a: Any, leaf_b: Any) -> Difference | None:
    import numpy as np

    if a.dtype != b.dtype:
        return Difference(steps, f"dtype {a.dtype} vs {b.dtype}", leaf_a, leaf_b)
    if a.shape != b.shape:
        return Difference(steps, f"shape {tuple(a.shape)} vs {tuple(b.shape)}", leaf_a, leaf_b)
    if a.dtype == object:
        return _walk(a.tolist(), b.tolist(), steps)
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.tobytes() == b.tobytes():
        return None
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    bytes_a = flat_a.view(np.uint8).reshape(flat_a.size, -1) if flat_a.size else flat_a
    bytes_b = flat_b.view(np.uint8).reshape(flat_b.size, -1) if flat_b.size else flat_b
    unequal = np.flatnonzero((bytes_a != bytes_b).any(axis=1))
    first = int(unequal[0])
    where = np.unravel_index(first, a.shape) if a.ndim else ()
    total = math.prod(a.shape) or 1
    return Difference(steps, f"{len(unequal)} of {total} elements differ, first at "
                             f"{tuple(int(i) for i in where)}: {flat_a[first]!r} vs {flat_b[first]!r}",
                      leaf_a, leaf_b, count=len(unequal), total=total)


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."
