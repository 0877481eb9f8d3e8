"""Do two checkpoints (or two runs) match, and if not, where and why.

`compare_paths` takes two checkpoint files or two run directories and returns a result that
renders as a readable report (`render_text`) and as JSON (`to_dict`):

* A verdict: ``identical bytes`` (the files are equal), ``identical content`` (every value is
  bit-equal, the files are not), ``equal within tolerance`` (only with ``atol``/``rtol``: every
  floating-point difference is within ``|a - b| <= atol + rtol * max(|a|, |b|)``) or
  ``different``. Exact is the default, because reproducible training promises bits.
* Every leaf of the whole nested state (model, optimizer, scheduler, RNG state, sampler, early
  stopping, ...), by its dotted path from `iter_leaves`. Tensors get shape, dtype, number of
  differing elements, max absolute and relative difference and max ULP distance; other values
  are compared bit for bit (`axs_lib.bitdiff.same_value`); keys present on one side only are
  listed. ``content_sha256`` is not a leaf here (it is a checksum of the rest) but it is shown
  and used: equal checksums with unequal content mean a damaged file, which is then found by
  verifying both.
* Metadata side by side (seed info, determinism flags, environment and data fingerprints,
  config) and, when content differs, which of those differences can explain it.
* The environment a checkpoint records (its ``environment`` section, and whether CUDA was
  there) describes the machine, not the training result: it is compared and listed, but it is
  not content. Two runs on two machines whose every tensor and value agree bit for bit are
  ``identical content`` (exit 0) with the environment differences listed, not a false alarm.
* For two run directories: every checkpoint step they share, in order, and the first step at
  which they diverge, with the full report for that step.

Memory: checkpoints are memory-mapped and compared tensor by tensor in chunks of
`CHUNK_BYTES`. Pages of the mapped files that have been compared are handed back to the kernel
(`_MappedPages`), so comparing two 1 GiB files keeps a few tens of MiB resident, not 2 GiB.
Checksums are not recomputed on the way (that would read every byte a second time through
SHA-256): the comparison reads every byte of both files itself, so damage shows up as a named
difference; ``axs inspect`` verifies a single file.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import math
import mmap
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from axs_lib.bitdiff import same_value
from axs_lib.report import describe_leaf, format_number, format_shape, format_table, json_safe, short_repr
from axs_lib.checkpoint import (CHECKSUM_KEY, CHECKSUM_KEYS, LEGACY_CHECKSUM_KEY, check_content, follow_latest, iter_leaves,
                                load_noting_trust)
from axs_lib.run_dir import step_checkpoints
from axs_lib.errors import CheckpointError, InputError, UsageError
from axs_lib.fingerprint.environment import diff_environments, PORTABLE_KEYS

IDENTICAL_BYTES = "identical bytes"
IDENTICAL_CONTENT = "identical content"
WITHIN_TOLERANCE = "equal within tolerance"
DIFFERENT = "different"

CHUNK_BYTES = 16 << 20  # elements compared at a time, per side
MAX_ROWS = 20  # rows per table in the text report; JSON always has everything

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Options:
    """How strict to be and what to skip. ``ignore`` holds globs over dotted leaf paths."""

    atol: float = 0.0
    rtol: float = 0.0
    ignore: tuple[str, ...] = ()
    trust: bool = False

    def __post_init__(self):
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"--{name} must be a finite number >= 0, got {value}")

    @property
    def tolerant(self) -> bool:
        return self.atol > 0 or self.rtol > 0

    def ignores(self, path: str) -> bool:
        """True if ``path`` or a container above it matches an ``--ignore`` glob."""
        return any(
            fnmatch.fnmatchcase(path, g) or fnmatch.fnmatchcase(path, g + ".*") or fnmatch.fnmatchcase(path, g + "[[]*")
            for g in self.ignore
        )


# --------------------------------------------------------------------------- mapped pages


class _MappedPages:
    """Gives pages of a memory-mapped checkpoint back to the kernel once they have been compared.

    Touching a mapped file makes its pages part of our resident set until the mapping goes away.
    ``madvise(MADV_DONTNEED)`` drops them again; the data stays in the page cache and is read back
    on the next touch, and since torch maps checkpoints private and we never write to them,
    nothing changes. Only addresses inside mappings of this very file (by device and inode, from
    ``/proc/self/maps``) are released, never ordinary memory. Off Linux this does nothing.
    """

    _madvise = None

    def __init__(self, path: Path):
        self._ranges: list[tuple[int, int]] = []
        if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        st = os.stat(path)
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 5 or int(fields[4]) != st.st_ino:
                    continue
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                if (major, minor) == (os.major(st.st_dev), os.minor(st.st_dev)):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    self._ranges.append((start, end))
        if self._ranges and _MappedPages._madvise is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _MappedPages._madvise = libc.madvise

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the pages under ``tensor``'s whole storage, if they belong to the mapped file."""
        storage = tensor.untyped_storage()
        self._release(storage.data_ptr(), storage.nbytes())

    def release_chunk(self, chunk: torch.Tensor) -> None:
        """Drop the pages under the bytes of a contiguous chunk view."""
        self._release(chunk.data_ptr(), chunk.numel() * chunk.element_size())

    def _release(self, address: int, nbytes: int) -> None:
        # widen to whole pages: a neighbour's page dropped too is simply read back when touched
        start = address - address % mmap.PAGESIZE
        end = -(-(address + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
        for lo, hi in self._ranges:
            lo, hi = max(lo, start), min(hi, end)
            if lo < hi:
                self._madvise(lo, hi - lo, mmap.MADV_DONTNEED)


# --------------------------------------------------------------------------- tensors


@dataclass
class TensorReport:
    """How one tensor compares. ``n_outside`` counts differences beyond the tolerance (all of
    them in exact mode, and always for integer and bool tensors, which must match exactly)."""

    path: str
    dtype_a: str
    dtype_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    numel: int = 0
    n_differ: int = 0
    n_outside: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ulp: int | float | None = None  # None: not a float tensor; inf: NaN against a number
    first_index: tuple[int, ...] | None = None

    @property
    def mismatch(self) -> str | None:
        """``"dtype ..."`` or ``"shape ..."`` when the two tensors cannot be compared elementwise."""
        if self.dtype_a != self.dtype_b:
            return f"dtype {self.dtype_a} vs {self.dtype_b}"
        if self.shape_a != self.shape_b:
            return f"shape {self.shape_a} vs {self.shape_b}"
        return None

    @property
    def identical(self) -> bool:
        return self.mismatch is None and self.n_differ == 0

    @property
    def within_tolerance(self) -> bool:
        return self.mismatch is None and self.n_outside == 0

    def sort_key(self) -> tuple:
        """Largest differences first: incomparable tensors, then by max abs, ULP, count."""
        ulp = self.max_ulp if self.max_ulp is not None else -1
        return (self.mismatch is not None, self.max_abs, ulp, self.n_differ)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "dtype": self.dtype_a if self.dtype_a == self.dtype_b else [self.dtype_a, self.dtype_b],
            "shape": list(self.shape_a) if self.shape_a == self.shape_b else [list(self.shape_a), list(self.shape_b)],
            "mismatch": self.mismatch,
            "numel": self.numel,
            "n_differ": self.n_differ,
            "n_outside_tolerance": self.n_outside,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "max_ulp": self.max_ulp,
            "first_index": list(self.first_index) if self.first_index is not None else None,
        }


def _ordered_keys(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Map float bit patterns (viewed as signed ints) to int64 keys on the number line.

    Adjacent floats get adjacent keys across the whole range, including across zero: positive
    floats keep their bits, negative ones become minus their magnitude bits, so +0 and -0 are
    both 0 and the smallest subnormals of either sign are 1 and -1.
    """
    k = bits.to(torch.int64)
    magnitude = k & ((1 << (8 * width - 1)) - 1)
    return torch.where(k < 0, -magnitude, k)


def _unravel(index: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for dim in reversed(shape):
        index, rem = divmod(index, dim) if dim else (index, 0)
        out.append(rem)
    return tuple(reversed(out))


def _prepare(t: torch.Tensor) -> torch.Tensor:
    """A strided CPU tensor with a real dtype (complex as pairs of reals), flattened."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    return t.cpu().reshape(-1)


def compare_tensors(path: str, a: torch.Tensor, b: torch.Tensor, options: Options, pages: Sequence[_MappedPages] = ()) -> TensorReport:
    """Compare two tensors element by element, `CHUNK_BYTES` at a time.

    Elements are equal when their bits are equal; NaN against NaN in the same place counts as
    no difference for the numeric statistics and the tolerance. Chunks whose bits are all equal
    (the common case) cost one vectorised comparison; statistics are computed only for the
    differing elements.
    """
    report = TensorReport(path, str(a.dtype).removeprefix("torch."), str(b.dtype).removeprefix("torch."), tuple(a.shape), tuple(b.shape))
    if report.mismatch is not None:
        report.n_differ = report.n_outside = max(a.numel(), b.numel())
        return report
    report.numel = a.numel()
    fa, fb = _prepare(a), _prepare(b)
    width, per_item = fa.element_size(), 2 if a.is_complex() else 1
    if fa.is_floating_point():
        report.max_ulp = 0
    step = max(1, CHUNK_BYTES // width)
    for start in range(0, fa.numel(), step):
        ca, cb = fa[start : start + step], fb[start : start + step]
        ia, ib = ca.view(_INT_OF_WIDTH[width]), cb.view(_INT_OF_WIDTH[width])
        if not torch.equal(ia, ib):
            _add_chunk_stats(report, ca, cb, ia, ib, start, width, per_item, options)
        for p, chunk in zip(pages, (ca, cb)):
            p.release_chunk(chunk)
    for p, t in zip(pages, (a, b)):
        p.release(t)
    return report


def _add_chunk_stats(report: TensorReport, ca, cb, ia, ib, start: int, width: int, per_item: int, options: Options) -> None:
    """Fold the differing elements of one chunk (values ``ca``/``cb``, bits ``ia``/``ib``) into ``report``.

    ``start`` is the chunk's offset in the flattened tensor, of which ``per_item`` values make one
    element of the original (2 for complex numbers, seen as pairs of reals).
    """
    where = (ia != ib).nonzero().reshape(-1)
    if report.first_index is None:
        report.first_index = _unravel((start + int(where[0])) // per_item, report.shape_a)
    report.n_differ += where.numel()
    va, vb = ca[where].double(), cb[where].double()
    if not ca.is_floating_point():  # integers and bools: exact only; max abs exact beyond 2**53 too
        report.n_outside += where.numel()
        abs_diff = (va - vb).abs()
        i = int(abs_diff.argmax())
        report.max_abs = max(report.max_abs, float(abs(int(ca[where[i]]) - int(cb[where[i]]))))
        report.max_rel = max(report.max_rel, float((abs_diff / torch.maximum(va.abs(), vb.abs())).max()))
        return
    keep = ~(va.isnan() & vb.isnan())  # NaN against NaN: same place, no numeric difference
    if not options.tolerant:
        report.n_outside += where.numel()  # exact mode: bits are what count
    if not keep.any():
        return
    va, vb, where = va[keep], vb[keep], where[keep]
    one_nan = va.isnan() | vb.isnan()
    abs_diff = (va - vb).abs().masked_fill(one_nan, math.inf)
    scale = torch.maximum(va.abs(), vb.abs())
    rel = (abs_diff / scale).nan_to_num(nan=math.inf, posinf=math.inf)  # inf/inf: inf against -inf
    rel = rel.masked_fill(abs_diff == 0, 0.0)  # +0 against -0
    if options.tolerant:
        within = abs_diff.isfinite() & (abs_diff <= options.atol + options.rtol * scale)
        report.n_outside += int((~within).sum())
    report.max_abs = max(report.max_abs, float(abs_diff.max()))
    report.max_rel = max(report.max_rel, float(rel.max()))
    if one_nan.any():
        report.max_ulp = math.inf
    elif report.max_ulp != math.inf:
        ka, kb = _ordered_keys(ia[where], width), _ordered_keys(ib[where], width)
        # pick the element by float64 distance, then take its exact distance as a Python int
        i = int((ka.double() - kb.double()).abs().argmax())
        report.max_ulp = max(report.max_ulp, abs(int(ka[i]) - int(kb[i])))


# --------------------------------------------------------------------------- leaves and metadata


def _as_tensor(leaf: Any) -> torch.Tensor | None:
    """Tensors as they are, numpy arrays (in legacy ``--trust`` checkpoints) as tensors, else None."""
    if isinstance(leaf, torch.Tensor):
        return leaf
    if isinstance(leaf, np.ndarray) and leaf.dtype.kind in "biufc":
        array = leaf.astype(np.int64) if leaf.dtype.kind == "u" and leaf.dtype.itemsize > 1 else leaf
        return torch.from_numpy(np.ascontiguousarray(array))
    return None


def _prefixes(path: str) -> Iterable[str]:
    """``a``, ``a.b``, ``a.b[0]``, ... for ``a.b[0].c`` (the path itself excluded)."""
    for m in re.finditer(r"[.\[]", path):
        if m.start():
            yield path[: m.start()]


def _one_sided(paths: Iterable[str], other: set[str]) -> list[str]:
    """Collapse leaf paths missing from the other side to the highest key that is missing."""
    present = set(other)
    for p in other:
        present.update(_prefixes(p))
    out: dict[str, None] = {}
    for p in paths:
        top = next((q for q in _prefixes(p) if q not in present), p)
        out[top] = None
    return list(out)


METADATA_SECTIONS = ("seed_info", "data_fingerprint", "environment", "config")
# Leaves that describe the machine a checkpoint was written on rather than what training computed.
ENVIRONMENT_LEAVES = ("environment", "seed_info.cuda_available", "seed_info.cuda_device_count")


def is_environment(path: str) -> bool:
    """Whether a leaf's dotted path is environment metadata (compared and shown, not content)."""
    return any(path == p or path.startswith((p + ".", p + "[")) for p in ENVIRONMENT_LEAVES)
HEADLINE_KEYS = ("format_version", "step", "epoch", "world_size", CHECKSUM_KEY, LEGACY_CHECKSUM_KEY)
DETERMINISM_FLAGS = {  # flag (in seed_info or environment) -> the value that means "deterministic"
    "deterministic": True,
    "use_deterministic_algorithms": True,
    "deterministic_algorithms": True,
    "cudnn_deterministic": True,
    "cudnn_benchmark": False,
    "benchmark": False,
}


class _Absent:
    """Marks a metadata key that one checkpoint does not have."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


@dataclass
class MetaRow:
    """One metadata field, side by side."""

    key: str
    a: Any
    b: Any

    @property
    def equal(self) -> bool:
        return same_value(self.a, self.b) if not isinstance(self.a, _Absent) else isinstance(self.b, _Absent)

    def to_dict(self) -> dict:
        return {"key": self.key, "a": None if self.a is ABSENT else describe_leaf(self.a),
                "b": None if self.b is ABSENT else describe_leaf(self.b), "equal": self.equal}


def metadata_leaves(ckpt: Any) -> dict[str, Any]:
    """The metadata fields of a checkpoint as ``{dotted path: value}``; tolerant of absent keys."""
    if not isinstance(ckpt, dict):
        return {}
    out = {k: ckpt[k] for k in HEADLINE_KEYS if k in ckpt}
    for section in METADATA_SECTIONS:
        if isinstance(ckpt.get(section), dict):
            out.update(iter_leaves(ckpt[section], section))
    return out


def metadata_rows(a: Any, b: Any) -> list[MetaRow]:
    """Every metadata field of either checkpoint, A's order first."""
    ma, mb = metadata_leaves(a), metadata_leaves(b)
    return [MetaRow(k, ma.get(k, ABSENT), mb.get(k, ABSENT)) for k in {**ma, **mb}]


def _cause(row: MetaRow) -> str | None:
    """What a differing seed, data, config or world-size field says about why results differ."""
    key = row.key
    if key == "seed_info.seed":
        return f"another seed: A {row.a!r}, B {row.b!r} (different seeds give different results by design)"
    if key == "data_fingerprint.split_sha256":
        return "another train/val split"
    if key.startswith("data_fingerprint."):
        return "other tiles: the data fingerprints differ"
    if key == "config.portable":
        return (f"portable CPU mode in one run only (A {row.a!r}, B {row.b!r}): the thread count and instruction "
                "set were pinned in one and left to the machine in the other")
    if key == "config.threads":
        return f"another intra-op thread count: A {row.a!r}, B {row.b!r} (sums are split and added in another order)"
    if key.startswith("config."):
        return "another training config"
    if key == "world_size":  # written by versions whose steps were sharded per rank
        return f"another world size under the earlier per-rank sharding: A {row.a!r}, B {row.b!r}"
    return None


def _determinism_off(side: str, leaves: dict[str, Any]) -> list[str]:
    """``["determinism off in A: ..."]`` when a checkpoint records a non-deterministic setting."""
    off = [
        f"{key}={value}"
        for key, value in leaves.items()
        if key.startswith(("seed_info.", "environment."))
        and isinstance(value, bool)
        and DETERMINISM_FLAGS.get(key.rsplit(".", 1)[-1], value) != value
    ]
    return [f"determinism off in {side}: {', '.join(off)}"] if off else []


def explain(rows: list[MetaRow], a: Any, b: Any) -> list[str]:
    """Which metadata differences can explain a content mismatch, most decisive first.

    Environment differences and their meaning come from `diff_environments`; seed, data, config
    and world size are judged here; a determinism flag that is off on either side is named even
    when both sides agree, since it alone can make two runs differ.
    """
    causes: dict[str, list[str]] = {}
    for row in rows:
        if not row.equal and (cause := _cause(row)):
            causes.setdefault(cause, []).append(row.key)
    env_a, env_b = (c.get("environment") if isinstance(c, dict) else None for c in (a, b))
    if isinstance(env_a, dict) and isinstance(env_b, dict) and ("portable" in env_a) != ("portable" in env_b):
        # a portable run records only what its pinning leaves free: compare those fields alone
        keep = {*PORTABLE_KEYS, "portable"}
        env_a, env_b = ({k: v for k, v in env.items() if k in keep} for env in (env_a, env_b))
    for d in diff_environments(env_a, env_b):
        if d["explains"]:
            causes.setdefault(d["explains"], []).append(f"environment.{d['key']}")
    out = [f"{cause} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})" for cause, keys in causes.items()]
    out += _determinism_off("A", metadata_leaves(a)) + _determinism_off("B", metadata_leaves(b))
    if not out:
        out.append(
            "no recorded difference explains it: same seed, data, config and environment, determinism on; "
            "look for nondeterminism the flags do not cover (unseeded randomness, a nondeterministic op, a data race)"
        )
    return out


# --------------------------------------------------------------------------- one pair of files


@dataclass
class ValueDiff:
    """A non-tensor leaf that differs, or a tensor on one side against a non-tensor on the other."""

    path: str
    a: Any
    b: Any

    def to_dict(self) -> dict:
        return {"path": self.path, "a": describe_leaf(self.a), "b": describe_leaf(self.b)}


@dataclass
class CheckpointComparison:
    """The comparison of two checkpoint files; `render_text` and `to_dict` present it."""

    a: str
    b: str
    options: Options
    verdict: str = DIFFERENT
    tensors: list[TensorReport] = field(default_factory=list)
    values_compared: int = 0
    value_diffs: list[ValueDiff] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    environment_diffs: list[ValueDiff] = field(default_factory=list)  # not content; see is_environment
    ignored: int = 0
    metadata: list[MetaRow] = field(default_factory=list)
    explanations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def match(self) -> bool:
        return self.verdict != DIFFERENT

    @property
    def tensor_diffs(self) -> list[TensorReport]:
        """Tensors that are not bit-identical, largest differences first."""
        return sorted((t for t in self.tensors if not t.identical), key=TensorReport.sort_key, reverse=True)

    def content_identical(self) -> bool:
        return not (self.value_diffs or self.only_in_a or self.only_in_b) and all(t.identical for t in self.tensors)

    def within_tolerance(self) -> bool:
        return not (self.value_diffs or self.only_in_a or self.only_in_b) and all(t.within_tolerance for t in self.tensors)

    def summary(self) -> str:
        diffs = self.tensor_diffs
        parts = [f"{len(diffs)} of {len(self.tensors)} tensors differ"]
        if self.options.tolerant:
            beyond = sum(not t.within_tolerance for t in diffs)
            parts[0] += f" ({beyond} beyond atol={self.options.atol:g} rtol={self.options.rtol:g})"
        parts.append(f"{len(self.value_diffs)} of {self.values_compared} other values differ")
        if self.only_in_a or self.only_in_b:
            parts.append(f"{len(self.only_in_a)} keys only in A, {len(self.only_in_b)} only in B")
        if self.ignored:
            parts.append(f"{self.ignored} leaves ignored")
        if self.environment_diffs:
            parts.append(f"{len(self.environment_diffs)} environment fields differ")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {
            "kind": "checkpoints",
            "a": self.a,
            "b": self.b,
            "verdict": self.verdict,
            "match": self.match,
            "atol": self.options.atol,
            "rtol": self.options.rtol,
            "ignore": list(self.options.ignore),
            "summary": self.summary(),
            "tensors": [t.to_dict() for t in self.tensors],
            "values_compared": self.values_compared,
            "value_diffs": [v.to_dict() for v in self.value_diffs],
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "environment_diffs": [v.to_dict() for v in self.environment_diffs],
            "ignored": self.ignored,
            "metadata": [m.to_dict() for m in self.metadata],
            "explanations": self.explanations,
            "notes": self.notes,
        }

    def render_text(self, max_rows: int = MAX_ROWS) -> str:
        lines = [f"verdict: {self.verdict.upper()} - {self.summary()}"]
        if self.verdict not in (IDENTICAL_BYTES, IDENTICAL_CONTENT) and self.explanations:
            lines.append(f"likely cause: {self.explanations[0]}")  # the decisive one first; all of them at the end
        lines += [f"  A: {self.a}", f"  B: {self.b}"]
        lines += [f"  note: {n}" for n in self.notes]
        diffs = self.tensor_diffs
        if diffs:
            lines += ["", "tensors that differ (largest first):"]
            rows = [
                (t.path or "(root)", t.dtype_a, format_shape(t.shape_a), t.mismatch or f"{t.n_differ}/{t.numel}",
                 format_number(t.max_abs), format_number(t.max_rel), format_number(t.max_ulp), format_shape(t.first_index))
                for t in diffs[:max_rows]
            ]
            lines += format_table(("path", "dtype", "shape", "differ", "max abs", "max rel", "max ULP", "first at"), rows)
            if len(diffs) > max_rows:
                rest = diffs[max_rows:]
                lines.append(f"  ... and {len(rest)} more, with max abs diff up to {format_number(rest[0].max_abs)} (see --json)")
        lines.append(f"{len(self.tensors) - len(diffs)} of {len(self.tensors)} tensors bit-identical.")
        if self.value_diffs:
            lines += ["", "other values that differ:"]
            lines += format_table(("path", "A", "B"), [(v.path, short_repr(v.a), short_repr(v.b)) for v in self.value_diffs[:max_rows]])
            if len(self.value_diffs) > max_rows:
                lines.append(f"  ... and {len(self.value_diffs) - max_rows} more (see --json)")
        for side, keys in (("A", self.only_in_a), ("B", self.only_in_b)):
            if keys:
                shown = ", ".join(keys[:max_rows]) + (f", ... ({len(keys)} in all)" if len(keys) > max_rows else "")
                lines += ["", f"keys only in {side}: {shown}"]
        if self.environment_diffs and self.verdict in (IDENTICAL_BYTES, IDENTICAL_CONTENT):
            lines += ["", "the environment differs, but every tensor and value is bit-identical:"]
            lines += format_table(("path", "A", "B"), [(v.path, short_repr(v.a), short_repr(v.b))
                                                        for v in self.environment_diffs[:max_rows]])
        lines += ["", "metadata (A | B, * differs):"]
        differing = [m for m in self.metadata if not m.equal]
        shown = differing + [m for m in self.metadata if m.equal and m.key in _HEADLINE_META]
        shown.sort(key=lambda m: self.metadata.index(m))
        lines += format_table(("key", "A", "B", ""), [(m.key, short_repr(m.a), short_repr(m.b), "" if m.equal else "*") for m in shown[: 3 * max_rows]])
        lines.append(f"  ({len(self.metadata) - len(differing)} of {len(self.metadata)} metadata fields equal)")
        if self.verdict not in (IDENTICAL_BYTES, IDENTICAL_CONTENT):
            lines += ["", "what can explain the difference:"] + [f"  - {e}" for e in self.explanations]
        return "\n".join(lines)


_HEADLINE_META = {"step", "epoch", CHECKSUM_KEY, LEGACY_CHECKSUM_KEY, "seed_info.seed", "seed_info.deterministic",
                  "data_fingerprint.sha256", "environment.torch", "environment.cuda"}


def files_equal(a: Path, b: Path, block: int = 1 << 20) -> bool:
    """True if the two files hold the same bytes, read a block at a time."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if x != y:
                return False
            if not x:
                return True


def compare_checkpoints(a: os.PathLike | str, b: os.PathLike | str, options: Options = Options()) -> CheckpointComparison:
    """Compare two checkpoint files leaf by leaf; see the module docstring."""
    a, b = Path(a), Path(b)
    result = CheckpointComparison(str(a), str(b), options)
    (ca, notes_a), (cb, notes_b) = (load_noting_trust(p, trust=options.trust) for p in (a, b))
    result.notes += notes_a + notes_b
    pages = (_MappedPages(a), _MappedPages(b))
    la, lb = dict(iter_leaves(ca)), dict(iter_leaves(cb))
    for lv in (la, lb):
        for key in CHECKSUM_KEYS:  # a checksum is about the file, not content (format 1 and 2 differ only there)
            lv.pop(key, None)
    kept_a = [p for p in la if not options.ignores(p)]
    kept_b = {p for p in lb if not options.ignores(p)}
    result.ignored = len({*la, *lb}) - len({*kept_a, *kept_b})
    result.environment_diffs = _environment_diffs(la, lb, kept_a, kept_b)
    kept_a = [p for p in kept_a if not is_environment(p)]
    kept_b = {p for p in kept_b if not is_environment(p)}
    la = {p: v for p, v in la.items() if not is_environment(p)}
    lb = {p: v for p, v in lb.items() if not is_environment(p)}
    result.only_in_a = _one_sided((p for p in kept_a if p not in lb), set(lb))
    result.only_in_b = _one_sided((p for p in lb if p in kept_b and p not in la), set(la))
    for path in kept_a:
        if path not in kept_b:
            continue
        ta, tb = _as_tensor(la[path]), _as_tensor(lb[path])
        if ta is not None and tb is not None:
            result.tensors.append(compare_tensors(path, ta, tb, options, pages))
        else:
            result.values_compared += 1
            if ta is not None or tb is not None or not same_value(la[path], lb[path]):
                result.value_diffs.append(ValueDiff(path, la[path], lb[path]))
    result.metadata = metadata_rows(ca, cb)
    if result.content_identical():
        result.verdict = IDENTICAL_BYTES if files_equal(a, b) else IDENTICAL_CONTENT
        return result
    _check_not_damaged(ca, cb, a, b)
    if options.tolerant and result.within_tolerance():
        result.verdict = WITHIN_TOLERANCE
    result.explanations = explain(result.metadata, ca, cb)
    return result


def _environment_diffs(la: dict[str, Any], lb: dict[str, Any], kept_a: list[str], kept_b: set[str]) -> list[ValueDiff]:
    """Environment leaves (not ignored) that differ or that one side lacks, A's order first."""
    paths = [p for p in dict.fromkeys([*kept_a, *(p for p in lb if p in kept_b)]) if is_environment(p)]
    out = []
    for path in paths:
        a, b = la.get(path, ABSENT), lb.get(path, ABSENT)
        ta, tb = _as_tensor(a), _as_tensor(b)
        if ta is not None and tb is not None:
            equal = ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb)
        else:
            equal = (a is ABSENT) == (b is ABSENT) and (a is ABSENT or (ta is None and tb is None and same_value(a, b)))
        if not equal:
            out.append(ValueDiff(path, None if a is ABSENT else a, None if b is ABSENT else b))
    return out


def _check_not_damaged(ca: Any, cb: Any, a: Path, b: Path) -> None:
    """Two checkpoints whose content differs: first make sure neither file is damaged.

    A file whose content no longer matches its own checksum (a flipped bit on disk, a copy cut
    short in the middle of a tensor that still unpickles) would otherwise be reported as training
    nondeterminism. This reads both through their hash, and only runs when the contents differ, so
    the usual identical comparison never pays for it. A file without a checksum (a foreign
    checkpoint, loaded with ``--trust``) is compared as it is.
    """
    for obj, path in ((ca, a), (cb, b)):
        if isinstance(obj, dict) and any(k in obj for k in CHECKSUM_KEYS):
            check_content(obj, path)


# --------------------------------------------------------------------------- two runs


def checkpoint_steps(run_dir: os.PathLike | str) -> dict[int, Path]:
    """The ``checkpoint_step_<N>.pt`` files of a run directory (or of its ``checkpoints/``), by step."""
    return dict(sorted((step, path) for step, path in step_checkpoints(run_dir)))


@dataclass
class RunComparison:
    """The comparison of two run directories, step by step; ``detail`` is the first diverging step."""

    a: str
    b: str
    options: Options
    steps: list[tuple[int, str]] = field(default_factory=list)  # (step, verdict), in order
    only_in_a: list[int] = field(default_factory=list)
    only_in_b: list[int] = field(default_factory=list)
    detail: CheckpointComparison | None = None

    @property
    def first_diverging_step(self) -> int | None:
        return next((s for s, v in self.steps if v == DIFFERENT), None)

    @property
    def match(self) -> bool:
        return self.first_diverging_step is None

    @property
    def verdict(self) -> str:
        """The weakest verdict over the shared steps."""
        order = (IDENTICAL_BYTES, IDENTICAL_CONTENT, WITHIN_TOLERANCE, DIFFERENT)
        return max((v for _, v in self.steps), key=order.index)

    def to_dict(self) -> dict:
        return {
            "kind": "runs",
            "a": self.a,
            "b": self.b,
            "verdict": self.verdict,
            "match": self.match,
            "first_diverging_step": self.first_diverging_step,
            "steps": [{"step": s, "verdict": v} for s, v in self.steps],
            "steps_only_in_a": self.only_in_a,
            "steps_only_in_b": self.only_in_b,
            "detail": self.detail.to_dict() if self.detail else None,
        }

    def render_text(self, max_rows: int = MAX_ROWS) -> str:
        first = self.first_diverging_step
        head = f"first diverging step: {first}" if first is not None else "every shared step matches"
        lines = [f"verdict: {self.verdict.upper()} - {head} ({len(self.steps)} shared checkpoint steps)"]
        if self.detail is not None and self.detail.explanations:
            lines.append(f"likely cause: {self.detail.explanations[0]}")
        lines += [f"  A: {self.a}", f"  B: {self.b}", ""]
        lines += format_table(("step", "verdict"), [(str(s), v) for s, v in self.steps])
        for side, steps in (("A", self.only_in_a), ("B", self.only_in_b)):
            if steps:
                lines.append(f"steps only in {side} (not compared): {', '.join(map(str, steps))}")
        if self.detail is not None:
            lines += ["", f"at step {first}:", self.detail.render_text(max_rows)]
        return "\n".join(lines)


def _config_difference(a: os.PathLike | str, b: os.PathLike | str) -> str:
    """``"; their configs differ: ..."`` from the two runs' run.json, or "" when unreadable or equal."""
    from axs_lib.errors import AxsError
    from axs_lib.run_dir import config_differences, read_run_json

    try:
        ca, cb = ((read_run_json(Path(p)) or {}).get("config") for p in (a, b))
    except AxsError:
        return ""
    if not isinstance(ca, dict) or not isinstance(cb, dict):
        return ""
    keys = config_differences(ca, cb)
    if not keys:
        return "; their configs are the same"
    return "; their configs differ: " + ", ".join(f"{k} {ca.get(k)!r} vs {cb.get(k)!r}" for k in keys[:6]) + (
        f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def compare_runs(a: os.PathLike | str, b: os.PathLike | str, options: Options = Options()) -> RunComparison:
    """Compare every checkpoint step two run directories share, in order."""
    sa, sb = checkpoint_steps(a), checkpoint_steps(b)
    shared = [s for s in sa if s in sb]
    if not shared:
        raise InputError(b, f"no checkpoint step in common with {a} (A has {list(sa) or 'none'}, B has {list(sb) or 'none'})"
                            + _config_difference(a, b))
    result = RunComparison(str(a), str(b), options, only_in_a=[s for s in sa if s not in sb], only_in_b=[s for s in sb if s not in sa])
    for step in shared:
        pair = compare_checkpoints(sa[step], sb[step], options)
        result.steps.append((step, pair.verdict))
        if not pair.match and result.detail is None:
            result.detail = pair
    return result


def compare_paths(a: os.PathLike | str, b: os.PathLike | str, options: Options = Options()) -> CheckpointComparison | RunComparison:
    """Compare two checkpoint files (a ``latest`` pointer counts as the checkpoint it names), or two
    run directories."""
    a, b = follow_latest(a), follow_latest(b)
    for p in (a, b):
        if not p.exists():
            raise CheckpointError(p, "no such file or directory")
    if a.is_dir() != b.is_dir():
        raise UsageError(f"compare two checkpoint files or two run directories, not one of each: {a}, {b}")
    return compare_runs(a, b, options) if a.is_dir() else compare_checkpoints(a, b, options)


def to_json(result: CheckpointComparison | RunComparison) -> str:
    """The result as indented JSON (non-finite numbers as strings, so any JSON parser reads it)."""
    return json.dumps(json_safe(result.to_dict()), indent=2)
