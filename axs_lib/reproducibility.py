"""Seeding, determinism flags and RNG state: the reproducibility guide's API.

Two ideas live here.

* The guide's functions (`set_seed`, `get_seed_state`, `restore_seed_state`, `seed_worker`,
  `create_reproducible_generator`, `add_seed_to_checkpoint`, `validate_checkpoint_seed`,
  `verify_reproducibility`) with the guide's signatures, made honest: determinism flags are
  applied on CPU too, a late ``CUBLAS_WORKSPACE_CONFIG`` is reported instead of ignored, RNG state
  is stored in a form that ``torch.load(weights_only=True)`` accepts, and verify can fail.

* Derived randomness (`derive_seed`, `seed_globals`): every random draw that shapes a training
  result is a pure function of the root seed and a path of counters such as
  ``("augment", epoch, sample)``. Nothing has to be remembered to resume exactly, and the result
  cannot depend on how many processes produced it.

Run as a script, ``python axs_lib/reproducibility.py --verify --seed 42`` is ``axs verify``.
"""

from __future__ import annotations

import functools
import hashlib
import numbers
import os
import random
import warnings
from typing import Any, Dict

import numpy as np
import torch

SEED_MAX = 2**32 - 1
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
_VALID_CUBLAS_CONFIGS = (":4096:8", ":16:8")

_last_seed_info: Dict[str, Any] | None = None

_MT19937_WORDS = 624  # numpy's MT19937 key length; its position runs 0..624


def _cuda_initialized() -> bool:
    """Whether CUDA is initialised in this process (one place, so tests can stand in for a GPU)."""
    return torch.cuda.is_initialized()


def _check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool; a string, number or None is refused (``'false'`` is truthy to ``bool()``)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_seed(seed: Any) -> int:
    """Return ``seed`` as an ``int`` if it is an integer in [0, 2**32 - 1]; raise otherwise.

    Bools are refused (``True`` is an int to Python but never a deliberate seed), as are floats,
    even integral ones: a seed of ``42.0`` usually means a config was parsed wrongly.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer in [0, {SEED_MAX}], got {seed!r} ({type(seed).__name__})")
    seed = int(seed)
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [0, {SEED_MAX}], got {seed}")
    return seed


# --------------------------------------------------------------------------- derived seeds


def derive_seed(seed: int, *keys: str | int) -> int:
    """Map a root seed and a path of keys to a 64-bit seed, as a pure function.

    Algorithm (pinned by golden-value tests; changing it breaks reproduction of old runs):

    1. The keys are joined with ``"/"`` into a path, so ``derive_seed(s, "shuffle", 3)`` equals
       ``derive_seed(s, "shuffle/3")``. Keys are strings or non-negative ints.
    2. The UTF-8 path is hashed with SHA-256 and read as eight little-endian uint32 words.
    3. ``numpy.random.SeedSequence(entropy=seed, spawn_key=words)`` mixes root seed and path;
       its first 64-bit output word is the derived seed.

    SeedSequence gives well-separated streams for nearby inputs, so ``augment/0/1`` and
    ``augment/0/2`` are as unrelated as two random seeds.
    """
    seed = check_seed(seed)
    parts = []
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (str, numbers.Integral)):
            raise TypeError(f"derive_seed keys must be str or int, got {key!r}")
        if isinstance(key, numbers.Integral) and key < 0:
            raise ValueError(f"derive_seed int keys must be >= 0, got {key}")
        parts.append(str(int(key)) if isinstance(key, numbers.Integral) else key)
    digest = hashlib.sha256("/".join(parts).encode("utf-8")).digest()
    words = tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4))
    state = np.random.SeedSequence(entropy=seed, spawn_key=words).generate_state(1, dtype=np.uint64)
    return int(state[0])


def seed_globals(seed64: int) -> None:
    """Seed python ``random``, numpy's global generator, torch CPU and every CUDA device.

    Takes a 64-bit seed (as from `derive_seed`). numpy's legacy seeder takes 32 bits and gets the
    low 32; torch's CPU generator (mt19937) also keeps only the low 32 bits, CUDA's uses all 64.
    The trainer calls this before every micro-batch with ``step/<step>/<micro-batch>``, so code
    that draws from the global generators (dropout) is exact after a resume and on any world size.
    """
    random.seed(seed64)
    np.random.seed(seed64 & SEED_MAX)
    if _accelerator_present():
        torch.manual_seed(seed64)  # also seeds every CUDA device, lazily when CUDA is not initialised
    else:
        # The same CPU generator state. torch.manual_seed would also queue a lazy seed for each
        # accelerator backend it was built with (CUDA, XPU, MTIA), none present here, capturing a
        # formatted stack for each: 0.15-2 ms per call, called at every step and every sample.
        torch.default_generator.manual_seed(seed64)


@functools.cache
def _accelerator_present() -> bool:
    """Whether a device other than the CPU is visible (cached: it does not change in a process)."""
    return torch.accelerator.is_available()


# --------------------------------------------------------------------------- guide API


def set_seed(seed: int, deterministic: bool = True, benchmark: bool = False) -> Dict[str, Any]:
    """Seed every random source and set the determinism flags; return ``seed_info``.

    Modes, as in the guide:

    * ``deterministic=True, benchmark=False``: full reproducibility. cuDNN deterministic, autotune
      off, ``torch.use_deterministic_algorithms(True)`` (an op with no deterministic
      implementation raises instead of silently varying) and ``CUBLAS_WORKSPACE_CONFIG`` set.
    * ``deterministic=False, benchmark=True``: fastest, not reproducible on GPU.
    * ``deterministic=False, benchmark=False``: seeded, no autotune, but nondeterministic kernels
      allowed.

    ``CUBLAS_WORKSPACE_CONFIG`` only takes effect if set before CUDA initialises. When CUDA was
    already initialised and the variable was not set, a warning says so and
    ``seed_info['cublas_workspace_config_in_force']`` is False.
    """
    global _last_seed_info
    seed = check_seed(seed)
    deterministic = _check_flag("deterministic", deterministic)
    benchmark = _check_flag("benchmark", benchmark)

    cuda_initialized = _cuda_initialized()
    cublas_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if deterministic and cublas_before not in _VALID_CUBLAS_CONFIGS:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    cublas_in_force = cublas in _VALID_CUBLAS_CONFIGS and (not cuda_initialized or cublas_before == cublas)
    if deterministic and cuda_initialized and not cublas_in_force:
        warnings.warn(
            "CUDA was initialised before set_seed(): CUBLAS_WORKSPACE_CONFIG set now does not "
            "take effect, so cuBLAS results may vary. Call set_seed() before any CUDA work, "
            f"or export CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE_CONFIG} before starting Python.",
            RuntimeWarning,
            stacklevel=2,
        )

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)

    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = benchmark
    torch.use_deterministic_algorithms(deterministic)

    _last_seed_info = {
        "seed": seed,
        "deterministic": deterministic,
        "benchmark": benchmark,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device_count": torch.cuda.device_count(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": cublas,
        "cublas_workspace_config_in_force": cublas_in_force if deterministic else False,
    }
    return dict(_last_seed_info)


def last_seed_info() -> Dict[str, Any] | None:
    """The ``seed_info`` of the latest `set_seed` call in this process, or None."""
    return dict(_last_seed_info) if _last_seed_info is not None else None


def get_seed_state() -> Dict[str, Any]:
    """Capture the state of every global generator in a weights-only-safe form.

    numpy's state is stored as a dict with the key array as an int64 tensor (never an
    ``ndarray``, which ``torch.load(weights_only=True)`` refuses); python's is a tuple of ints.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "random_state": random.getstate(),
        "numpy_state": {
            "bit_generator": str(kind),
            "state": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def _as_tuple(value: Any) -> Any:
    """Turn lists (as JSON or older tools may have written them) back into nested tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def restore_seed_state(state: Dict[str, Any]) -> None:
    """Restore the generators captured by `get_seed_state`: all of them, or none.

    Accepts our weights-only-safe form and the raw form older code saved (numpy's
    ``('MT19937', ndarray, pos, has_gauss, cached)`` tuple, tensors or arrays for torch). Keys
    that are absent are left alone. CUDA states are restored only when CUDA is available; when
    they are present but CUDA is not, a warning says they were skipped.

    Every state is decoded and checked on a throwaway generator before any global one changes, so
    a damaged entry raises (TypeError or ValueError naming the key) and leaves every generator as
    it was. numpy's ``pos`` is checked by hand: numpy accepts any value and a later draw reads
    outside its key array (a crash, not an error).
    """
    if not isinstance(state, dict):
        raise TypeError(f"rng state must be a dict, got {type(state).__name__}")
    plan = []  # (setter, decoded state), applied only once every entry has been checked
    if "random_state" in state:
        plan.append((random.setstate, _checked_python_state(state["random_state"])))
    if "numpy_state" in state:
        plan.append((np.random.set_state, _checked_numpy_state(state["numpy_state"])))
    if "torch_rng_state" in state:
        plan.append((torch.set_rng_state, _checked_torch_state("torch_rng_state", state["torch_rng_state"], "cpu")))
    cuda_states = state.get("cuda_rng_state") or []
    if not isinstance(cuda_states, (list, tuple)):
        raise TypeError(f"rng_state['cuda_rng_state'] must be a list of byte tensors, got {type(cuda_states).__name__}")
    skip_cuda = bool(cuda_states) and not torch.cuda.is_available()
    if cuda_states and not skip_cuda:
        if len(cuda_states) > torch.cuda.device_count():
            raise ValueError(f"rng_state['cuda_rng_state'] holds {len(cuda_states)} device states; "
                             f"this machine has {torch.cuda.device_count()} CUDA devices")
        decoded = [_checked_torch_state(f"cuda_rng_state[{i}]", s, f"cuda:{i}") for i, s in enumerate(cuda_states)]
        plan.append((torch.cuda.set_rng_state_all, decoded))
    for setter, value in plan:
        setter(value)
    if skip_cuda:
        warnings.warn("checkpoint holds CUDA RNG state but CUDA is not available; skipped", RuntimeWarning, stacklevel=2)


def _checked_python_state(value: Any) -> tuple:
    value = _as_tuple(value)
    try:
        random.Random().setstate(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rng_state['random_state'] is not a python random state: {exc}") from None
    return value


def _checked_numpy_state(value: Any) -> tuple:
    where = "rng_state['numpy_state']"
    try:
        if isinstance(value, dict):
            kind, keys = value.get("bit_generator", "MT19937"), value["state"]
            pos, has_gauss, cached = value["pos"], value.get("has_gauss", 0), value.get("cached_gaussian", 0.0)
        else:
            kind, keys, pos, has_gauss, cached = value
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where} is not a numpy MT19937 state ({type(exc).__name__}: {exc})") from None
    if kind != "MT19937":
        raise ValueError(f"{where}: bit generator {kind!r} is not MT19937")
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    if keys.shape != (_MT19937_WORDS,) or keys.dtype.kind not in "iu":
        raise ValueError(f"{where}: key must be {_MT19937_WORDS} integers, got shape {keys.shape} of {keys.dtype}")
    if keys.size and (int(keys.min()) < 0 or int(keys.max()) > 2**32 - 1):
        raise ValueError(f"{where}: key words must be in [0, 2**32 - 1]")
    for name, number in (("pos", pos), ("has_gauss", has_gauss)):
        if isinstance(number, bool) or not isinstance(number, numbers.Integral):
            raise ValueError(f"{where}: {name} must be an integer, got {number!r}")
    if not 0 <= pos <= _MT19937_WORDS:
        raise ValueError(f"{where}: pos {pos} is outside [0, {_MT19937_WORDS}] (damaged checkpoint?)")
    if has_gauss not in (0, 1) or not isinstance(cached, numbers.Real):
        raise ValueError(f"{where}: has_gauss must be 0 or 1 and cached_gaussian a number, got {has_gauss!r}, {cached!r}")
    return (kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached))


def _as_byte_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(torch.uint8).cpu()
    return torch.as_tensor(np.asarray(value, dtype=np.uint8))


def _checked_torch_state(name: str, value: Any, device: str) -> torch.Tensor:
    try:
        tensor = _as_byte_tensor(value)
        torch.Generator(device=device).set_state(tensor)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"rng_state['{name}'] is not a torch generator state: {exc}") from None
    return tensor


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader: seed a worker's python and numpy globals.

    Inside a worker, ``torch.initial_seed()`` is the loader's base seed plus ``worker_id``, and
    the base seed is drawn from the loader's ``generator``; so with a seeded generator every
    worker's globals are fixed. (Our own augmentation does not rely on this: it derives a
    generator per sample, which is what makes results independent of the worker count.)
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def create_reproducible_generator(seed: int) -> torch.Generator:
    """A ``torch.Generator`` seeded with ``seed`` for ``random_split`` and DataLoader."""
    generator = torch.Generator()
    generator.manual_seed(check_seed(seed))
    return generator


def add_seed_to_checkpoint(checkpoint: Dict[str, Any], seed_info: Dict[str, Any]) -> Dict[str, Any]:
    """Add ``seed_info`` and the current ``rng_state`` to ``checkpoint`` (in place) and return it."""
    checkpoint["seed_info"] = dict(seed_info)
    checkpoint["rng_state"] = get_seed_state()
    return checkpoint


def validate_checkpoint_seed(checkpoint: Dict[str, Any], expected_seed: int) -> bool:
    """True if ``checkpoint`` was made with ``expected_seed``; warn and return False otherwise.

    ``expected_seed`` must be a valid seed (`check_seed`): a bool or float raises TypeError.
    """
    expected_seed = check_seed(expected_seed)  # True or 42.0 is a caller's bug, not a seed
    info = checkpoint.get("seed_info") if isinstance(checkpoint, dict) else None
    if not isinstance(info, dict) or "seed" not in info:
        warnings.warn("checkpoint has no seed_info: seed unknown, reproducibility cannot be guaranteed", UserWarning, stacklevel=2)
        return False
    stored = info["seed"]
    if isinstance(stored, bool) or not isinstance(stored, numbers.Integral):
        # 42.0 == 42 and True == 1 to Python: without this a damaged seed_info would pass
        warnings.warn(f"checkpoint seed {stored!r} ({type(stored).__name__}) is not an integer seed", UserWarning, stacklevel=2)
        return False
    if info["seed"] != expected_seed:
        warnings.warn(f"checkpoint seed {info['seed']} does not match expected seed {expected_seed}", UserWarning, stacklevel=2)
        return False
    return True


def verify_reproducibility(num_iterations: int = 10, seed: int | None = None, deterministic: bool | None = None) -> bool:
    """Train a small real model ``num_iterations`` times and check that every bit agrees.

    The seed and mode default to those of the last `set_seed` call (42 and deterministic when
    there was none). See `axs_lib.verify` for what the probe trains and compares.
    """
    from axs_lib.verify import run_verification

    info = _last_seed_info or {}
    seed = info.get("seed", 42) if seed is None else seed
    deterministic = info.get("deterministic", True) if deterministic is None else deterministic
    return run_verification(num_iterations=num_iterations, seed=seed, deterministic=deterministic).ok


def _script(argv: list[str]) -> int:
    """``python axs_lib/reproducibility.py --verify [options of axs verify]``."""
    import argparse

    from axs_lib.cli import main

    parser = argparse.ArgumentParser(
        prog="python axs_lib/reproducibility.py",
        description="Check that training here is bit-reproducible (the same as `axs verify`).",
        epilog="Other options are those of `axs verify`: --seed N, --iterations N, --num-workers N, "
               "--no-deterministic, --show-state (see axs verify --help).",
        allow_abbrev=False,
    )
    parser.add_argument("--verify", action="store_true", required=True, help="train a small probe repeatedly and compare every bit")
    args, rest = parser.parse_known_args(argv)
    return main(["verify", *rest])


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # import axs_lib from this checkout, not axs_lib/
    from axs_lib.reproducibility import _script  # the package's module, not this __main__ copy

    sys.exit(_script(sys.argv[1:]))
