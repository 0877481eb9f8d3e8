"""Checkpoint files: atomic writes, a content checksum, and loading that never runs code.

A checkpoint is a plain ``torch.save`` archive of a nested dict, so ``torch.load(path,
weights_only=True)`` opens it with no allow-list. On top of that we add:

* ``format_version`` and ``content_xxh3`` top-level keys. The checksum covers the whole nested
  content (every key, every tensor's dtype, shape and bytes, every scalar), so bit-rot inside
  tensor data, which the zip container does not catch on load, is reported by name. It is an
  integrity check against accidents (bit-rot, truncation, a half-copied file), not a signature
  against tampering, so a fast non-cryptographic hash does the job: XXH3-128 reads a 23 MB state
  in about a quarter of the time SHA-256 takes. Format 1 files carry ``content_sha256`` over the
  same structure; they still load and verify. A file with neither is refused unless the caller
  says so (``allow_unverified``): otherwise one flipped byte in the key's name would switch the
  check off. The key names live here, once (`RESERVED_KEYS`).
* Atomic writes: temp file in the same directory, flush, fsync, rename, fsync the directory. A
  crash at any instant leaves either the old file or the complete new one.
* Byte-identical output for identical content: the archive is written through a file object, so
  its internal record names do not depend on the file name or directory, and the content is
  put in a canonical form first (`canonical`), so pickle's memo does not depend on object history.
  Tensors are stored from host memory (a GPU tensor's storage is copied to the CPU first, views
  kept as views), so a file says ``cpu`` for every storage: the bytes do not depend on whether
  the state was saved straight from the GPU or from a host snapshot (`AsyncCheckpointWriter`).
* One call writes a checkpoint under several names and moves ``latest`` (`write_checkpoint_files`);
  a full disk or a read-only directory is one `AxsError` line that names the file.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import pickle
import stat
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import xxhash

from axs_lib.bounded_read import NO_SUCH_FILE, open_regular
from axs_lib.errors import EXIT_FAILURE, AxsError, CheckpointError

FORMAT_VERSION = 2
FORMAT_KEY = "format_version"
CHECKSUM_KEY = "content_xxh3"  # what this version writes
LEGACY_CHECKSUM_KEY = "content_sha256"  # format 1; still verified on load
CHECKSUM_KEYS = (CHECKSUM_KEY, LEGACY_CHECKSUM_KEY)
# Formats this version loads and continues exactly: format 1 differs from 2 only in its checksum.
READABLE_FORMATS = frozenset((1, FORMAT_VERSION))
# Every top-level key a checkpoint of ours may carry besides the user's content; the one list of them
# (`axs_lib.state.TrainingState` refuses components and extras under these names).
GUIDE_KEYS = ("step", "epoch", "seed_info", "rng_state")  # the reproducibility guide's names
RESERVED_KEYS = frozenset((*GUIDE_KEYS, FORMAT_KEY, *CHECKSUM_KEYS))
# checksum key -> hash constructor; the structure fed to it is the same for both
_HASHES = {CHECKSUM_KEY: xxhash.xxh3_128, LEGACY_CHECKSUM_KEY: hashlib.sha256}
LATEST_POINTER = "latest"


# --------------------------------------------------------------------------- content digest


def iter_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted_path, leaf)`` for every leaf of a nested dict/list/tuple, in sorted key order.

    Dict keys are visited sorted by their string form, so two dicts with the same items in
    another insertion order give the same sequence.
    """
    if isinstance(obj, dict):
        for key in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            yield from iter_leaves(obj[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        if not obj:
            yield prefix, obj
        for i, item in enumerate(obj):
            yield from iter_leaves(item, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor in C order, without copying when it is already contiguous on CPU."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def content_digest(obj: Any, key: str = CHECKSUM_KEY) -> str:
    """The checksum stored under ``key`` (`CHECKSUM_KEY` by default) for a nested checkpoint dict.

    Each leaf contributes its path, its type and its value: dtype, shape and raw bytes for a
    tensor, ``repr`` for python scalars and strings. Container types are part of the path
    (``a[0]`` for a list item), so a list and a dict with the same values differ. ``key`` picks
    the hash: XXH3-128 for ``content_xxh3`` (format 2), SHA-256 for ``content_sha256`` (format 1).
    """
    try:
        h = _HASHES[key]()
    except KeyError:
        raise ValueError(f"unknown checksum key {key!r} (known: {', '.join(CHECKSUM_KEYS)})") from None
    for path, leaf in iter_leaves(obj):
        h.update(path.encode("utf-8", "surrogatepass") + b"\0")
        if isinstance(leaf, torch.Tensor):
            h.update(f"tensor:{leaf.dtype}:{tuple(leaf.shape)}\0".encode())
            data = tensor_bytes(leaf)
            h.update(struct.pack("<Q", data.nbytes))
            h.update(data)
        else:
            h.update(f"{type(leaf).__name__}:{leaf!r}\0".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


# Types that torch.load(weights_only=True) accepts with no allow-list.
_SAFE_SCALARS = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)
_SAFE_CONTAINERS = (dict, collections.OrderedDict, list, tuple, torch.Size)


def unsafe_leaves(obj: Any, prefix: str = "") -> list[str]:
    """Paths of values that ``torch.load(weights_only=True)`` would refuse (``path: type``).

    Subclasses count as unsafe (``torch.__version__`` is a ``str`` subclass that is), except
    tensors and parameters.
    """
    if isinstance(obj, torch.Tensor):
        return []
    kind = type(obj)
    if kind in _SAFE_CONTAINERS:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        found = []
        for key, value in items:
            if isinstance(obj, dict) and type(key) not in _SAFE_SCALARS:
                found.append(f"{prefix}: key of type {type(key).__name__}")
            found += unsafe_leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return found
    return [] if kind in _SAFE_SCALARS else [f"{prefix or '<root>'}: {kind.__module__}.{kind.__qualname__}"]


class HostCopies:
    """Copy tensors into host memory one storage at a time, so views of one storage stay views.

    ``torch.save`` writes each storage once, however many tensors view it, and records where
    it lived. Copying storage by storage (rather than tensor by tensor) keeps that structure, so
    the copy serialises to the same bytes as a CPU original. ``alloc(nbytes)`` gives the uint8
    buffer for one storage (reusable, pinned buffers in `AsyncCheckpointWriter`); ``copy_cpu``
    says whether tensors already in host memory are copied too (a snapshot) or kept (a save).
    """

    def __init__(self, alloc: Callable[[int], torch.Tensor] | None = None, *, copy_cpu: bool = False):
        self.alloc = alloc or (lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))
        self.copy_cpu = copy_cpu
        self.copied: dict[int, torch.Tensor] = {}  # storage identity (as torch.save keys it) -> host buffer
        # a tensor object met twice is pickled once and then referenced: its copy must be one object too
        self.tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, copy)
        self.non_blocking = False

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu" and not self.copy_cpu:
            return tensor
        seen = self.tensors.get(id(tensor))
        if seen is None:
            seen = self.tensors[id(tensor)] = (tensor, self._copy(tensor))  # the original is kept: its id stays taken
        return seen[1]

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout != torch.strided or tensor.is_quantized or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            return tensor.detach().to("cpu", copy=True)  # rare kinds: a plain copy
        storage = tensor.untyped_storage()
        host = self.copied.get(storage._cdata)
        if host is None:
            host = self.alloc(storage.nbytes())
            # a tensor copy (memcpy / one DMA), not UntypedStorage.copy_, which measured far slower on CPU
            source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            host.copy_(source, non_blocking=self.non_blocking and host.is_pinned())
            self.copied[storage._cdata] = host
        view = torch.empty(0, dtype=tensor.dtype).set_(host.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(view, requires_grad=tensor.requires_grad)
        return view.requires_grad_(tensor.requires_grad)


def canonical(obj: Any, tensors: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """A copy of a nested checkpoint whose pickle bytes depend only on its content.

    Pickle memoises objects by identity: a string or tuple that appears twice is written once and
    then referenced, and whether two equal strings are one object depends on history (a key
    loaded from a checkpoint is a new object; a literal in our code is interned). So a resumed
    run would write other bytes for the same content. Here every string is interned (always
    shared) and every container is rebuilt (never shared). Tensors go through ``tensors``
    (default: a `HostCopies` that moves GPU storages to the CPU and keeps CPU tensors as they are).
    """
    return _canonical(obj, tensors or HostCopies())


def _canonical(obj: Any, tensors: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, str):
        return sys.intern(str(obj))
    if isinstance(obj, torch.Tensor):
        return tensors(obj)
    if isinstance(obj, dict):
        copy = type(obj)((_canonical(k, tensors), _canonical(v, tensors)) for k, v in obj.items())
        metadata = getattr(obj, "_metadata", None)  # module state_dict version info
        if metadata is not None:
            copy._metadata = _canonical(metadata, tensors)
        return copy
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v, tensors) for v in obj)
    return obj


# --------------------------------------------------------------------------- atomic files

# In their own module, which imports no torch, so that tile and run-directory tools start fast;
# named here too, where the checkpoint code and its users have always found them.
from axs_lib.atomic import atomic_link, atomic_open, atomic_write_text  # noqa: E402,F401


# --------------------------------------------------------------------------- save / load


def check_savable(checkpoint: Any) -> None:
    """Raise TypeError (naming the keys) for content that ``torch.load(weights_only=True)`` would refuse."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint must be a dict, got {type(checkpoint).__name__}")
    try:
        unsafe = unsafe_leaves(checkpoint)
    except RecursionError:
        raise TypeError(f"checkpoint content is nested more than {sys.getrecursionlimit()} levels deep") from None
    if unsafe:
        raise TypeError(f"checkpoint would not load with weights_only=True: {'; '.join(unsafe[:5])}")


def save_checkpoint(checkpoint: dict, path: os.PathLike | str) -> str:
    """Write ``checkpoint`` atomically with ``format_version`` and ``content_xxh3``; return the digest.

    Refuses (TypeError naming the keys) content that ``torch.load(weights_only=True)`` could not
    read back, so every file we write is safe to load. The caller's dict is not modified.
    """
    check_savable(checkpoint)
    body = {k: v for k, v in checkpoint.items() if k != FORMAT_KEY and k not in CHECKSUM_KEYS}
    body[FORMAT_KEY] = FORMAT_VERSION
    digest = content_digest(body)
    body[CHECKSUM_KEY] = digest
    body = canonical(body)
    with atomic_open(path) as f:
        sink = _WriteErrors(f)
        try:
            torch.save(body, sink)
        except RuntimeError:
            # torch's zip writer turns a failed write into a RuntimeError ("unexpected pos ...",
            # "PytorchStreamWriter failed writing file ..."): give back the OSError that caused it
            if sink.error is not None:
                raise sink.error from None
            raise
    return digest


class _WriteErrors:
    """A file object for ``torch.save`` that keeps the OSError a write raised (ENOSPC, EIO, EFBIG)."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._f.flush()


def write_checkpoint_files(directory: os.PathLike | str, names: list[str] | tuple[str, ...], checkpoint: dict,
                           latest: str | None = None) -> str:
    """Write ``checkpoint`` as ``directory/names[0]``, give it the other ``names`` too, then move ``latest``.

    The file is serialised once; every other name is an atomic hard link to it (``best.pt`` and
    the step checkpoint of the same step). ``latest`` moves last, so it only ever names a file
    that is complete and durable. A failed write (full disk, read-only or unwritable directory,
    I/O error) raises one `AxsError` line, exit status 1, that names the file: the files written
    before, and ``latest``, are untouched and no temp file is left. Returns the content checksum.
    """
    directory = Path(directory)
    if not names:
        raise ValueError("write_checkpoint_files needs at least one name")
    path = directory / names[0]
    try:
        digest = save_checkpoint(checkpoint, path)
        for name in names[1:]:
            path = directory / name
            atomic_link(directory / names[0], path)
        if latest:
            path = directory / LATEST_POINTER
            write_latest(directory, latest)
    except OSError as exc:
        raise write_failure(path, exc.strerror or str(exc), full=exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) from None
    except RuntimeError as exc:
        if not _is_torch_write_failure(exc):
            raise
        raise write_failure(path, f"write failed ({str(exc).splitlines()[0][:160]})", full=True) from None
    return digest


def write_failure(path: os.PathLike | str, problem: str, *, full: bool = False) -> AxsError:
    """The one-line error for a checkpoint that could not be written (exit status 1)."""
    hint = "free some space, then " if full else ""
    return AxsError(
        f"{path}: cannot write checkpoint: {problem}; earlier checkpoints and the latest pointer are intact; "
        f"{hint}rerun with --resume auto to continue from the latest one",
        exit_code=EXIT_FAILURE,
    )


def _is_torch_write_failure(exc: RuntimeError) -> bool:
    text = str(exc)
    return "PytorchStreamWriter failed writing" in text or "inline_container" in text


def _describe_load_failure(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def load_checkpoint(
    path: os.PathLike | str,
    *,
    trust: bool = False,
    verify: bool = True,
    allow_unverified: bool = False,
    mmap: bool = False,
    map_location: Any = "cpu",
) -> dict:
    """Load a checkpoint safely and check its checksum.

    * Missing, empty, truncated or non-checkpoint files raise `CheckpointError` naming the file,
      and so do names that are not regular files: a FIFO (which would block a reader forever),
      a device such as ``/dev/zero`` (endless), a directory, a socket. The file is opened once,
      without blocking, and checked through that open descriptor, so what is checked is what is read.
    * Files that hold pickled Python objects beyond tensors and plain containers (which can run
      arbitrary code when unpickled) are refused unless ``trust=True``; with it they load with a
      warning. Only pass ``trust`` for files you made yourself.
    * A ``content_xxh3`` (or format 1's ``content_sha256``) that does not match the content
      raises `CheckpointError`. So does a file with no checksum at all: every file we write has
      one, and one flipped byte in the key's *name* would otherwise turn the check off. Files of
      other tools (a plain ``torch.save``) load only with ``allow_unverified=True`` (``axs inspect
      --allow-unverified``) or ``trust=True``, or with ``verify=False``, which skips the check.
    * Whatever the bytes, the result is a dict or a `CheckpointError`: content that is not a dict,
      or nested too deep to walk, is refused by name too.
    """
    path = Path(path)
    with _open_regular(path) as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise CheckpointError(path, "empty file (0 bytes), not a checkpoint")
        is_zip = zipfile.is_zipfile(f)
        if not is_zip and not _looks_like_pickle(f):
            raise CheckpointError(path, "truncated or not a PyTorch checkpoint (no zip archive found)")
        source = _descriptor_path(f, path)
        obj = _torch_load(path, source, trust=trust, mmap=mmap and is_zip, map_location=map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a checkpoint (a dict of named entries)")
    if verify:  # a file the user vouches for (trust) may be a legacy one, from before checksums
        verify_content(obj, path, allow_unverified=allow_unverified or trust)
    return obj


def verify_content(obj: dict, path: os.PathLike | str, *, allow_unverified: bool = False) -> bool:
    """Check a loaded checkpoint's content against its stored checksum; True when it had one.

    `CheckpointError` (one line naming ``path``) for a mismatch, for content too odd to walk, and
    for a checkpoint without a checksum unless ``allow_unverified`` (then False is returned).
    """
    if not any(k in obj for k in CHECKSUM_KEYS):
        if not allow_unverified:
            raise CheckpointError(path, unverified_problem(obj))
        return False
    try:
        check_content(obj, path)
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(path, f"content nested more than {sys.getrecursionlimit()} levels deep; not a checkpoint we wrote") from None
    except Exception as exc:  # noqa: BLE001 - content torch accepted but our walk cannot (odd tensor kinds)
        raise CheckpointError(path, f"cannot verify its content: {_describe_load_failure(exc)}") from None
    return True


def unverified_problem(obj: dict) -> str:
    """Why a checkpoint without a content checksum is refused (one line)."""
    claims = f"it says format_version {repr(obj[FORMAT_KEY])[:20]}, which always carries one: the checksum's key is " \
        "damaged" if FORMAT_KEY in obj else "it was not written by axs, or its checksum's key is damaged"
    return (f"no content checksum ({' or '.join(CHECKSUM_KEYS)}) to verify: {claims}; refused "
            "(pass --allow-unverified / allow_unverified=True to load it unchecked)")


def _open_regular(path: Path):
    """Open ``path`` for reading without blocking; refuse anything but a regular file (CheckpointError)."""
    return open_regular(path, what="a checkpoint file", error=CheckpointError)


def _descriptor_path(f, path: Path) -> str:
    """A name for the file already open as ``f``: torch then reads that very file, even if ``path`` is replaced."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return proc if os.path.exists(proc) else str(path)


def _torch_load(path: Path, source: str, *, trust: bool, mmap: bool, map_location: Any) -> Any:
    try:
        return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ... for bad files
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(path, f"truncated or corrupted checkpoint: {_describe_load_failure(exc)}") from None
    if not trust:
        raise CheckpointError(
            path,
            "holds pickled Python objects that can run code when loaded; refused "
            "(pass --trust / trust=True only if you made this file yourself)",
        )
    warnings.warn(
        f"{path}: loading with trust: unpickling may run code embedded in the file",
        RuntimeWarning,
        stacklevel=3,
    )
    try:
        return torch.load(source, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
        raise CheckpointError(path, f"cannot load: {_describe_load_failure(exc)}") from None


def check_content(obj: dict, path: os.PathLike | str = "<checkpoint>") -> None:
    """Raise `CheckpointError` when ``obj``'s content does not match its stored checksum.

    Format 2 stores ``content_xxh3``, format 1 ``content_sha256``; a file with neither is refused
    here (callers that accept foreign files check for the keys first).
    """
    key = next((k for k in CHECKSUM_KEYS if k in obj), None)
    if key is None:
        raise CheckpointError(path, f"no content checksum ({' or '.join(CHECKSUM_KEYS)}) to verify")
    stored = obj[key]
    body = {k: v for k, v in obj.items() if k != key}
    actual = content_digest(body, key)
    if stored != actual:
        raise CheckpointError(path, f"checksum mismatch: content is corrupted (stored {str(stored)[:12]}..., actual {actual[:12]}...)")


def _looks_like_pickle(f) -> bool:
    f.seek(0)
    head = f.read(2)
    f.seek(0)
    # protocol 2+ pickles start with PROTO (0x80); torch's legacy format is a pickle stream too
    return len(head) == 2 and head[0] == 0x80 and head[1] <= pickle.HIGHEST_PROTOCOL


# --------------------------------------------------------------------------- latest pointer


def write_latest(checkpoint_dir: os.PathLike | str, filename: str) -> None:
    """Point ``checkpoint_dir/latest`` at ``filename`` (a name inside that directory), atomically."""
    atomic_write_text(Path(checkpoint_dir) / LATEST_POINTER, filename + "\n")


LATEST_MAX_BYTES = 512  # a file name and a newline; anything longer is not a pointer we wrote


def read_latest(checkpoint_dir: os.PathLike | str) -> Path | None:
    """The checkpoint the ``latest`` pointer names, or None if there is no pointer.

    A pointer that is not a regular file (a FIFO would block, ``/dev/zero`` never ends), longer
    than `LATEST_MAX_BYTES`, not UTF-8, or naming anything but a plain file name in this
    directory raises `CheckpointError`.
    """
    pointer = Path(checkpoint_dir) / LATEST_POINTER
    try:
        f = _open_regular(pointer)
    except CheckpointError as exc:
        if exc.problem == NO_SUCH_FILE:
            return None
        raise
    with f:
        raw = f.read(LATEST_MAX_BYTES + 1)
    if len(raw) > LATEST_MAX_BYTES:
        raise CheckpointError(pointer, f"malformed latest pointer: longer than {LATEST_MAX_BYTES} bytes")
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(pointer, "malformed latest pointer: not UTF-8 text") from None
    if not name or "/" in name or "\\" in name or name.startswith(".") or not name.isprintable():
        raise CheckpointError(pointer, f"malformed latest pointer {name[:80]!r}")
    return Path(checkpoint_dir) / name


def follow_latest(path: os.PathLike | str) -> Path:
    """``path``, or the checkpoint it names when it is a ``latest`` pointer (`read_latest`).

    So ``axs evaluate run/checkpoints/latest`` reads the checkpoint a resume would start from. Only
    a small regular file that is not itself a checkpoint counts as a pointer: a symbolic link called
    ``latest`` (a common way to mark the newest checkpoint) or a checkpoint copied to that name is
    returned as it is, as is a missing path, for the loader to name. A malformed pointer, or one
    naming a file that does not exist, raises `CheckpointError` naming the pointer.
    """
    path = Path(path)
    if path.name != LATEST_POINTER or not _may_be_pointer(path):
        return path
    target = read_latest(path.parent)
    if target is None:
        return path
    if not os.path.exists(target):
        raise CheckpointError(path, f"names {target.name}, which does not exist")
    return target


def _may_be_pointer(path: Path) -> bool:
    """False for a link, a directory, a missing path, a file longer than a pointer and one that
    starts as a checkpoint does (zip or pickle); True otherwise, FIFOs and devices included
    (`read_latest` refuses those in one line, without reading them)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISLNK(info.st_mode) or stat.S_ISDIR(info.st_mode):  # a run directory may be called latest too
        return False
    if not stat.S_ISREG(info.st_mode):
        return True
    if info.st_size > LATEST_MAX_BYTES:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return True  # read_latest names the problem
    return not (head == b"PK" or head[:1] == b"\x80")


def load_noting_trust(path: os.PathLike | str, *, trust: bool, verify: bool = False) -> tuple[Any, list[str]]:
    """Load a checkpoint memory-mapped; return it with the warnings a ``--trust`` load gave.

    An empty list means the file loaded weights-only, i.e. safely. Damaged, unsafe (without
    ``trust``) and foreign files raise `CheckpointError`.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = load_checkpoint(path, trust=trust, verify=verify, mmap=True)
    return obj, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
