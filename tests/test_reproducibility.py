"""The guide's reproducibility API: seeding, modes, RNG state round trips, derive_seed."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from axs_lib import reproducibility as rep
from doc_blocks import run_command
from axs_lib.reproducibility import (
    add_seed_to_checkpoint,
    create_reproducible_generator,
    derive_seed,
    get_seed_state,
    restore_seed_state,
    seed_globals,
    seed_worker,
    set_seed,
    validate_checkpoint_seed,
)

GUIDE_SEED_INFO_KEYS = {
    "seed", "deterministic", "benchmark", "cuda_available", "cuda_device_count",
    "cudnn_deterministic", "cudnn_benchmark", "use_deterministic_algorithms",
}


@pytest.fixture(autouse=True)
def _restore_flags():
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = False


def _draws():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), float(np.random.randn()))


# ----------------------------------------------------------------------------- derive_seed


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((42, "init"), 13764412178455381269),
        ((42, "shuffle", 0), 8786493711401551815),
        ((42, "shuffle", 1), 6870927654699664904),
        ((0, "augment", 3, 17), 11156550474512001742),
        ((2**32 - 1, "step", 100, 0), 7968350367124963170),
        ((42,), 15357285618921490037),
    ],
)
def test_derive_seed_golden_values(args, expected):
    # Pinned: a change here silently breaks reproduction of every earlier run.
    assert derive_seed(*args) == expected


def test_derive_seed_path_semantics_and_separation():
    assert derive_seed(7, "augment", 3, 17) == derive_seed(7, "augment/3/17")
    values = {derive_seed(7, "augment", 0, i) for i in range(1000)}
    assert len(values) == 1000
    assert derive_seed(7, "x") != derive_seed(8, "x")
    assert all(0 <= v < 2**64 for v in values)


@pytest.mark.parametrize("bad", [True, 1.5, None, b"x"])
def test_derive_seed_rejects_bad_keys(bad):
    with pytest.raises(TypeError):
        derive_seed(1, bad)


def test_derive_seed_rejects_negative_key():
    with pytest.raises(ValueError):
        derive_seed(1, "a", -1)


# ----------------------------------------------------------------------------- set_seed


def test_set_seed_returns_guide_keys_and_full_mode_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    info = set_seed(42, deterministic=True, benchmark=False)
    assert GUIDE_SEED_INFO_KEYS <= info.keys()
    assert info["seed"] == 42 and info["deterministic"] is True and info["benchmark"] is False
    assert torch.are_deterministic_algorithms_enabled()  # applied on CPU too
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert info["cublas_workspace_config"] == ":4096:8"
    assert info["use_deterministic_algorithms"] is True


def test_set_seed_faster_and_partial_modes():
    info = set_seed(1, deterministic=False, benchmark=True)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert info["cudnn_benchmark"] is True and info["use_deterministic_algorithms"] is False
    info = set_seed(1, deterministic=False, benchmark=False)
    assert not torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def test_set_seed_keeps_a_valid_user_cublas_setting(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert set_seed(3)["cublas_workspace_config"] == ":16:8"


def test_set_seed_warns_when_cuda_already_initialised(monkeypatch):
    # Stand in for an initialised GPU at set_seed's own seam: patching torch.cuda.is_initialized
    # instead would make torch's seeding run its CUDA callbacks at once on a CUDA machine, against
    # a CUDA that was never really initialised (IndexError in manual_seed_all).
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(rep, "_cuda_initialized", lambda: True)
    with pytest.warns(RuntimeWarning, match="CUBLAS_WORKSPACE_CONFIG"):
        info = set_seed(3)
    assert info["cublas_workspace_config_in_force"] is False


def test_set_seed_does_not_warn_when_cublas_was_set_before_cuda(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setattr(rep, "_cuda_initialized", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = set_seed(3)
    assert info["cublas_workspace_config_in_force"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the real initialised-CUDA path")
def test_set_seed_after_real_cuda_initialisation_warns_in_a_fresh_process():
    # A subprocess, so this process's CUDA state stays as the other tests expect.
    code = (
        "import os, warnings, torch\n"
        "os.environ.pop('CUBLAS_WORKSPACE_CONFIG', None)\n"
        "torch.zeros(1, device='cuda')\n"
        "from axs_lib.reproducibility import set_seed\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    info = set_seed(3)\n"
        "assert info['cublas_workspace_config_in_force'] is False, info\n"
        "assert any('CUBLAS_WORKSPACE_CONFIG' in str(w.message) for w in caught), caught\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", ["deterministic", "benchmark"])
@pytest.mark.parametrize("value", ["false", "True", 0, 1, None, 1.0])
def test_set_seed_refuses_flags_that_are_not_bools(name, value):
    before = torch.are_deterministic_algorithms_enabled()
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        set_seed(42, **{name: value})
    assert torch.are_deterministic_algorithms_enabled() == before


def test_set_seed_accepts_numpy_bools():
    assert set_seed(1, deterministic=np.bool_(False))["deterministic"] is False


def test_set_seed_makes_draws_repeat():
    set_seed(123)
    first = _draws()
    set_seed(123)
    assert _draws() == first
    set_seed(124)
    assert _draws() != first


@pytest.mark.parametrize("seed", [-1, 2**32, 10**20])
def test_set_seed_rejects_out_of_range(seed):
    with pytest.raises(ValueError, match="seed must be in"):
        set_seed(seed)


@pytest.mark.parametrize("seed", [True, 4.0, "42", None])
def test_set_seed_rejects_non_integers(seed):
    with pytest.raises(TypeError, match="seed must be an integer"):
        set_seed(seed)


def test_set_seed_accepts_numpy_integers_and_bounds():
    assert set_seed(np.int64(5))["seed"] == 5
    assert set_seed(0)["seed"] == 0
    assert set_seed(2**32 - 1)["seed"] == 2**32 - 1


# ----------------------------------------------------------------------------- state round trip


@pytest.mark.parametrize("draw", [
    lambda: random.random(),
    lambda: float(np.random.rand()),
    lambda: float(np.random.randn()),  # exercises numpy's cached gaussian
    lambda: torch.rand(4).tolist(),
])
def test_state_round_trip_per_generator(draw):
    set_seed(9)
    draw()
    np.random.randn()  # leave a cached gaussian behind
    state = get_seed_state()
    expected = [draw() for _ in range(5)]
    set_seed(10)
    restore_seed_state(state)
    assert [draw() for _ in range(5)] == expected


def test_state_survives_weights_only_load_without_allow_list():
    set_seed(5)
    np.random.randn()
    ckpt = add_seed_to_checkpoint({"model_state_dict": {"w": torch.ones(2)}}, set_seed(5))
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    expected = _draws()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_seed_state(loaded["rng_state"])
    assert _draws() == expected
    assert not any(isinstance(v, np.ndarray) for v in loaded["rng_state"]["numpy_state"].values())


def test_restore_accepts_legacy_raw_tuples():
    set_seed(11)
    legacy = {
        "random_state": random.getstate(),
        "numpy_state": np.random.get_state(),  # ('MT19937', ndarray, pos, has_gauss, cached)
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": [],
    }
    expected = _draws()
    set_seed(12)
    restore_seed_state(legacy)
    assert _draws() == expected


def test_restore_accepts_lists_from_json():
    set_seed(13)
    state = get_seed_state()
    state["random_state"] = [state["random_state"][0], list(state["random_state"][1]), state["random_state"][2]]
    expected = _draws()
    set_seed(14)
    restore_seed_state(state)
    assert _draws() == expected


def test_restore_warns_on_cuda_state_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the skip path is not reachable")
    with pytest.warns(RuntimeWarning, match="CUDA"):
        restore_seed_state({"cuda_rng_state": [torch.zeros(16, dtype=torch.uint8)]})


def test_restore_rejects_non_dict():
    with pytest.raises(TypeError):
        restore_seed_state([1, 2])


def _damage(state, where):
    if where == "numpy_pos_huge":
        state["numpy_state"]["pos"] = 10**6
    elif where == "numpy_pos_negative":
        state["numpy_state"]["pos"] = -1
    elif where == "numpy_key_short":
        state["numpy_state"]["state"] = state["numpy_state"]["state"][:10]
    elif where == "numpy_key_too_large":
        state["numpy_state"]["state"][0] = 2**40
    elif where == "numpy_missing_pos":
        del state["numpy_state"]["pos"]
    elif where == "numpy_other_generator":
        state["numpy_state"]["bit_generator"] = "PCG64"
    elif where == "torch_short":
        state["torch_rng_state"] = state["torch_rng_state"][:10]
    elif where == "python_short":
        state["random_state"] = (3, (1, 2, 3), None)
    elif where == "cuda_not_a_list":
        state["cuda_rng_state"] = 7
    return state


@pytest.mark.parametrize("where", [
    "numpy_pos_huge", "numpy_pos_negative", "numpy_key_short", "numpy_key_too_large", "numpy_missing_pos",
    "numpy_other_generator", "torch_short", "python_short", "cuda_not_a_list",
])
def test_restore_of_a_damaged_state_raises_and_changes_no_generator(where):
    set_seed(21)
    state = _damage(get_seed_state(), where)
    set_seed(22)
    before = get_seed_state()
    with pytest.raises((ValueError, TypeError), match="rng_state"):
        restore_seed_state(state)
    # Every generator, including those whose entries came before the damaged one, is untouched.
    after = get_seed_state()
    assert after["random_state"] == before["random_state"]
    assert torch.equal(after["numpy_state"]["state"], before["numpy_state"]["state"])
    assert after["numpy_state"]["pos"] == before["numpy_state"]["pos"]
    assert torch.equal(after["torch_rng_state"], before["torch_rng_state"])


def test_restore_of_a_huge_numpy_pos_is_an_error_not_a_crash_in_a_fresh_process():
    # Unchecked, numpy accepts the state and the next draw reads far outside its key array.
    code = (
        "import numpy as np, torch\n"
        "from axs_lib.reproducibility import get_seed_state, restore_seed_state\n"
        "s = get_seed_state(); s['numpy_state']['pos'] = 10**9\n"
        "try:\n"
        "    restore_seed_state(s)\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
        "np.random.rand(10**5)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "pos 1000000000 is outside [0, 624]" in done.stdout


# ----------------------------------------------------------------------------- helpers


def test_create_reproducible_generator_repeats():
    a = torch.randperm(20, generator=create_reproducible_generator(7))
    b = torch.randperm(20, generator=create_reproducible_generator(7))
    c = torch.randperm(20, generator=create_reproducible_generator(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seed_worker_seeds_from_torch_initial_seed():
    torch.manual_seed(1000)
    seed_worker(0)
    a = (random.random(), np.random.rand())
    torch.manual_seed(1000)
    seed_worker(3)
    assert (random.random(), np.random.rand()) == a
    torch.manual_seed(1001)
    seed_worker(0)
    assert (random.random(), np.random.rand()) != a


def test_seed_globals_seeds_every_global_generator():
    seed_globals(derive_seed(1, "step", 5, 0))
    a = _draws()
    seed_globals(derive_seed(1, "step", 5, 0))
    assert _draws() == a
    seed_globals(derive_seed(1, "step", 6, 0))
    b = _draws()
    assert all(x != y for x, y in zip(a, b))  # python, numpy, torch and numpy-gauss all moved


def test_validate_checkpoint_seed():
    ckpt = add_seed_to_checkpoint({}, set_seed(42))
    assert validate_checkpoint_seed(ckpt, expected_seed=42) is True
    with pytest.warns(UserWarning, match="does not match"):
        assert validate_checkpoint_seed(ckpt, expected_seed=43) is False
    with pytest.warns(UserWarning, match="no seed_info"):
        assert validate_checkpoint_seed({"model": {}}, expected_seed=42) is False


@pytest.mark.parametrize("seed", [True, 42.0, "42", -1])
def test_validate_checkpoint_seed_refuses_an_expected_seed_that_is_not_a_seed(seed):
    ckpt = add_seed_to_checkpoint({}, set_seed(1))
    with pytest.raises((TypeError, ValueError), match="seed must be"):
        validate_checkpoint_seed(ckpt, expected_seed=seed)


@pytest.mark.parametrize("stored", [True, 1.0])
def test_validate_checkpoint_seed_does_not_match_a_stored_seed_that_is_not_an_integer(stored):
    # True == 1 and 1.0 == 1 to Python; a damaged seed_info must not pass as seed 1.
    with pytest.warns(UserWarning, match="not an integer seed"):
        assert validate_checkpoint_seed({"seed_info": {"seed": stored}}, expected_seed=1) is False


def test_reproducibility_script_help_exits_0_and_without_verify_exits_2():
    root = Path(__file__).resolve().parents[1]  # as __main__, in this process (test_verify runs it in its own)
    shown = run_command("python axs_lib/reproducibility.py --help", root)
    assert shown.returncode == 0 and "--verify" in shown.stdout, shown.stderr
    bare = run_command("python axs_lib/reproducibility.py", root)
    assert bare.returncode == 2 and "--verify" in bare.stderr


def test_last_seed_info_tracks_latest_call():
    set_seed(77, deterministic=False)
    assert rep.last_seed_info()["seed"] == 77
    assert rep.last_seed_info()["deterministic"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_seed(78)
    assert rep.last_seed_info()["seed"] == 78


@pytest.mark.parametrize("seed64", [0, 1, 2**32 + 7, 2**63 + 5, 2**64 - 1])
def test_seed_globals_without_an_accelerator_leaves_torch_manual_seeds_cpu_state(seed64, monkeypatch):
    torch.manual_seed(seed64)
    expected = torch.get_rng_state()
    torch.manual_seed(0)
    monkeypatch.setattr(rep, "_accelerator_present", lambda: False)  # the fast path, here even where a GPU is
    seed_globals(seed64)
    assert torch.equal(torch.get_rng_state(), expected)
    monkeypatch.setattr(rep, "_accelerator_present", lambda: True)  # torch.manual_seed itself
    torch.manual_seed(0)
    seed_globals(seed64)
    assert torch.equal(torch.get_rng_state(), expected)
