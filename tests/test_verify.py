"""verify_reproducibility and ``axs verify``: passes here, and fails on injected nondeterminism."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from axs_lib import verify
from axs_lib.cli import main
from axs_lib.reproducibility import set_seed, verify_reproducibility
from axs_lib.verify import first_difference, run_verification
from doc_blocks import run_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_flags():
    yield
    torch.use_deterministic_algorithms(False)


def test_guide_snippet_verification_passes():
    set_seed(42, deterministic=True)
    assert verify_reproducibility(num_iterations=3)


def _nondeterministic_augment(image, generator):
    # Noise from the OS entropy pool: a real, unseeded source, in every worker process.
    noise = torch.frombuffer(bytearray(os.urandom(4 * image.numel())), dtype=torch.int32).reshape(image.shape)
    return image + noise.float() * 1e-12


def test_injected_nondeterminism_is_caught_and_named(monkeypatch):
    monkeypatch.setattr(verify, "_augment", _nondeterministic_augment)
    lines = []
    result = run_verification(num_iterations=2, seed=1, num_workers=2, log=lines.append)
    assert not result.ok
    assert result.mismatches and "elements differ, max abs diff" in result.mismatches[0]
    assert result.resume_mismatch is not None
    assert "  ✗ Reproducibility NOT verified" in lines
    assert "  ✓ Reproducibility verified!" not in lines


def test_broken_resume_alone_is_caught(monkeypatch):
    """A restore that loses optimizer state makes only the resume check fail."""
    real_fresh = verify._fresh
    calls = []

    def fresh(seed):
        model, opt = real_fresh(seed)
        calls.append(seed)
        if len(calls) > 3:  # the restore target in the resume run
            opt.load_state_dict = lambda state: None
        return model, opt

    monkeypatch.setattr(verify, "_fresh", fresh)
    result = run_verification(num_iterations=2, seed=1, num_workers=0)
    assert result.mismatches == []
    assert result.resume_mismatch is not None


def test_first_difference_names_tensor_and_size():
    a = {"m": {"w": torch.zeros(4), "b": torch.ones(1)}}
    b = {"m": {"w": torch.tensor([0.0, 0.0, 1e-3, 0.0]), "b": torch.ones(1)}}
    assert first_difference(a, a) is None
    assert first_difference(a, b) == "m.w: 1 of 4 elements differ, max abs diff 1.000e-03"
    assert "keys differ" in first_difference(a, {"m": {"w": torch.zeros(4)}})


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_guide_command_prints_guide_lines_and_exits_zero():
    # A real interpreter: the script fixes sys.path[0] so that axs_lib/ itself does not shadow modules.
    proc = run_cli("axs_lib/reproducibility.py", "--verify", "--seed", "42", "--iterations", "2")
    assert proc.returncode == 0, proc.stderr
    for line in ("Testing reproducibility...", "  Running 2 iterations...",
                 "  ✓ All iterations produced identical results", "  ✓ Reproducibility verified!"):
        assert line in proc.stdout.splitlines()


def test_cli_exits_one_on_injected_nondeterminism(monkeypatch, capsys):
    monkeypatch.setattr(verify, "_augment", _nondeterministic_augment)  # workers are forked: they see it too
    assert main(["verify", "--iterations", "2"]) == 1
    assert "Reproducibility NOT verified" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--seed", "-1"], ["--seed", "abc"], ["--seed", str(2**32)], ["--iterations", "0"]])
def test_cli_bad_arguments_exit_two(args, capsys):
    assert main(["verify", *args]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_script_without_verify_flag_is_a_usage_error():
    proc = run_command("python axs_lib/reproducibility.py", ROOT)  # as __main__, in this process
    assert proc.returncode == 2 and "usage" in proc.stderr
