"""Environment fingerprint: everything about the machine and software that can change the bits.

Two runs with the same seed, data and config give the same bits only on the same hardware and
software. This module records what that means concretely (python, torch, numpy, CUDA, cuDNN,
GPU model and compute capability, driver, CPU model, BLAS, thread count, determinism flags and
the environment variables that steer them), so that a mismatch can be explained rather than
guessed at. It replaces the guide's manual ``pip freeze`` / ``python --version`` /
``nvidia-smi`` step: `installed_packages` is the ``pip freeze`` part.

The fingerprint holds no hostname, user, time or path: it is stored in checkpoints, which must be
byte-identical between two runs on one machine.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

import numpy as np
import torch

# Variables that change numerics or determinism. Their values go into the fingerprint.
RELEVANT_ENV_VARS = (
    "CUBLAS_WORKSPACE_CONFIG",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_LAUNCH_BLOCKING",
    "NVIDIA_TF32_OVERRIDE",
    "PYTHONHASHSEED",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "MKL_CBWR",
    "ATEN_CPU_CAPABILITY",
    "TORCH_DETERMINISTIC",
)

# Fingerprint keys, and why a difference in each can change results.
EXPLANATIONS = {
    "python": "another Python version",
    "torch": "another PyTorch version: kernels and defaults change between releases",
    "torch_git": "another PyTorch build",
    "numpy": "another NumPy version",
    "cuda": "another CUDA version: different kernels",
    "cudnn": "another cuDNN version: different convolution algorithms",
    "gpus": "another GPU model or compute capability: different floating-point kernels",
    "gpu_driver": "another GPU driver",
    "cpu": "another CPU model: different SIMD paths",
    "cpu_capability": "another CPU instruction set in use by PyTorch",
    "blas": "another BLAS/LAPACK build",
    "num_threads": "another intra-op thread count: reductions may be summed in another order",
    "deterministic_algorithms": "deterministic algorithms on in one run and off in the other",
    "cudnn_deterministic": "cuDNN determinism on in one run and off in the other",
    "cudnn_benchmark": "cuDNN autotuning on in one run: algorithm choice varies",
    "tf32_matmul": "TF32 matmul on in one run: lower-precision GPU matmuls",
    "tf32_cudnn": "TF32 convolutions on in one run",
    "env": "environment variables that steer numerics differ",
    "machine": "another processor architecture",
    "portable": "portable CPU mode (pinned threads and instruction set) in one run and not the other, or pinned differently",
}

# What a portable run's checkpoint keeps of the fingerprint: the software, the architecture and the
# pinning. The CPU model, its capability, the core count and the thread variables are exactly what
# portable mode makes irrelevant (axs_lib.portable), and no GPU computes a portable run.
PORTABLE_KEYS = ("python", "python_implementation", "machine", "os", "torch", "torch_git", "numpy", "cuda", "cudnn",
                 "blas", "deterministic_algorithms")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas() -> str:
    """The BLAS and LAPACK that torch was built with, from its build config."""
    config = torch.__config__.show()
    found = [f"{name}={m.group(1)}" for name in ("BLAS_INFO", "LAPACK_INFO") if (m := re.search(rf"\b{name}=([^,\s]+)", config))]
    return ", ".join(found) or "unknown"


def _gpu_driver() -> str | None:
    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_mib": props.total_memory // 2**20})
    return gpus


def environment_fingerprint() -> dict[str, Any]:
    """Describe the software and hardware that determine a run's bits (no host, user or path)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "os": platform.system(),
        "torch": str(torch.__version__),  # TorchVersion is not weights-only loadable
        "torch_git": str(torch.version.git_version),
        "numpy": str(np.__version__),
        "cuda": None if torch.version.cuda is None else str(torch.version.cuda),
        "cudnn": cudnn,
        "gpus": _gpus(),
        "gpu_driver": _gpu_driver(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": _blas(),
        "num_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "env": {name: os.environ[name] for name in RELEVANT_ENV_VARS if name in os.environ},
    }


def portable_fingerprint(fingerprint: dict[str, Any], pinning: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint a portable run stores in its checkpoints: `PORTABLE_KEYS` plus the pinning."""
    return {**{k: fingerprint.get(k) for k in PORTABLE_KEYS}, "portable": dict(pinning)}


def installed_packages() -> dict[str, str]:
    """Name -> version of every installed distribution, sorted: the ``pip freeze`` step."""
    packages = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            packages[name] = dist.version
    return dict(sorted(packages.items(), key=lambda kv: kv[0].lower()))


def environment_report(fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint plus what only a person needs (interpreter path, packages): ``environment.json``.

    Pass a ``fingerprint`` already taken to avoid probing the machine (``nvidia-smi``) twice.
    """
    return {
        "fingerprint": environment_fingerprint() if fingerprint is None else fingerprint,
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "packages": installed_packages(),
    }


def diff_environments(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[dict[str, Any]]:
    """List the fingerprint keys whose values differ, each with why it can change results.

    Returns ``[{"key", "a", "b", "explains"}]`` in the fingerprint's key order; ``explains`` is
    None for keys that do not affect numerics (such as the OS name).
    """
    a, b = a or {}, b or {}
    keys = list(dict.fromkeys([*a.keys(), *b.keys()]))
    return [
        {"key": key, "a": a.get(key), "b": b.get(key), "explains": EXPLANATIONS.get(key)}
        for key in keys
        if a.get(key) != b.get(key)
    ]
