"""Portable CPU mode: the same bits on any core count and any x86-64 CPU with AVX2.

On the CPU, three things besides the inputs decide how PyTorch sums numbers, and all three differ
between a laptop, a workstation and a cluster node:

* the intra-op thread count (by default one per core): a reduction split over 2 or 64 threads is
  added up in another order;
* ATen's CPU capability (``DEFAULT``, ``AVX2``, ``AVX512``): the vectorised kernels of a newer CPU
  use wider registers, so a sum is grouped differently;
* the instruction set of oneDNN (convolutions) and of MKL (BLAS), chosen at run time per CPU.

Portable mode fixes each one: a thread count recorded in the run (`DEFAULT_THREADS` unless given,
the same on a 2-core and a 64-core machine), ATen's capability ``avx2``, oneDNN's maximum ISA
``AVX2`` and MKL's conditional numerical reproducibility ``AVX2``: the most common x86-64 level.
The last three are environment variables the libraries read once, when they first compute, so
`prepare` sets them before torch computes anything (the trainer does it before its first tensor
operation; a user's program calls `pin` first thing), and `pin` checks that ATen took them and
refuses, with the exact line to add, when torch has already chosen another capability. The thread
count is set with ``torch.set_num_threads`` and recorded.

What stays outside: other PyTorch (and Python, NumPy) versions, non-x86 CPUs (ARM), CPUs without
AVX2, and GPUs. Those change the bits and are named in the environment fingerprint.

This module does not import torch at import time (`axs --help` stays torch-free).
"""

from __future__ import annotations

import os
from typing import Any

from axs_lib.errors import UsageError

DEFAULT_THREADS = 4  # a common laptop core count; more threads than cores is slower, never different
LEVEL = "AVX2"
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
}
# Environment variables whose value portable mode replaces, so they no longer describe the run.
REPLACED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", *PINNED_ENV)


class PortableError(UsageError):
    """Portable mode cannot be guaranteed in this process or on this machine."""


def exact_line() -> str:
    """The shell prefix that sets the pinning before Python starts."""
    env = " ".join(f"{k}={v}" for k, v in PINNED_ENV.items())
    return env


def cpu_has_avx2() -> bool:
    """True when /proc/cpuinfo lists AVX2 (on Linux x86-64; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx2" in line.split()
    except OSError:
        pass
    return False


_before: dict[str, str | None] = {}  # the variables' values before `prepare`, restored when `pin` refuses


def prepare() -> None:
    """Set the pinning variables for this process (and its children); call before torch computes anything."""
    for name, value in PINNED_ENV.items():
        _before.setdefault(name, os.environ.get(name))
        os.environ[name] = value


def _undo() -> None:
    for name, value in _before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _before.clear()


def pin(threads: int | None = None) -> dict[str, Any]:
    """Pin this process's CPU arithmetic and return the pinning record (stored in checkpoints).

    Raises `PortableError` on a CPU without AVX2, or when torch already computed with another
    capability (call `pin` before the first torch operation, or start Python with
    `exact_line`).
    """
    threads = DEFAULT_THREADS if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise PortableError(f"threads (--threads) must be a positive integer, got {threads!r}")
    if not cpu_has_avx2():
        raise PortableError("portable mode (--portable, axs_lib.portable.pin): this CPU has no AVX2 (or is not x86-64); portable mode pins the arithmetic "
                            "to AVX2 and cannot run here")
    prepare()
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability != LEVEL:
        _undo()  # this process cannot be pinned: leave its environment as it was
        raise PortableError(f"portable mode (--portable, axs_lib.portable.pin): torch already computes with CPU capability {capability}, not {LEVEL}; "
                            f"start Python with `{exact_line()}` or call axs_lib.portable.pin() "
                            "before the first torch operation")
    torch.set_num_threads(threads)
    return record(threads)


def record(threads: int) -> dict[str, Any]:
    """What portable mode pinned: the checkpoint's ``portable`` entry."""
    return {"threads": threads, "cpu_capability": LEVEL, "dnnl_max_cpu_isa": LEVEL, "mkl_cbwr": LEVEL}


def in_effect() -> dict[str, Any]:
    """The pinning this process runs under, as `axs env` shows it (imports torch)."""
    import torch

    return {
        "intra_op_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_has_avx2": cpu_has_avx2(),
        **{k: os.environ.get(k) for k in PINNED_ENV},
        "portable": torch.backends.cpu.get_cpu_capability() == LEVEL and all(os.environ.get(k) == v for k, v in PINNED_ENV.items()),
    }
