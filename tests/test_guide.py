"""The user's reproducibility guide, executed: every code block and command of it runs against our package.

``tests/data/reproducibility-guide.md`` is a verbatim copy of the user's specification
(``../shared/reproducibility-guide.md``; `test_vendored_guide_is_the_shared_spec` catches drift).
Every fenced block of it has exactly one entry in `TREATMENTS` (a block without one, or an entry
without a block, fails `test_every_guide_block_has_exactly_one_treatment`), and is run by
`test_guide_block`, one test per block, in a fresh working directory that holds ``tiles/`` (the
six real demo tiles) and links to the repository's ``axs_lib/``, ``scripts/`` and ``tools/``, so
the guide's relative paths work as written. ``python``, ``pip`` and ``axs`` are the test's venv; a
plain ``axs ...`` or ``python FILE.py ...`` line runs in the test's process through the same entry
point with the same arguments, any other line in bash (``doc_blocks.run_command``).

Kinds of treatment (nothing is skipped silently):

* ``run``: executed exactly as written.
* ``context``: executed as written in a namespace that first runs the named CONTEXTS (the imports
  a fragment assumes, stand-ins for what the guide leaves undefined such as ``train_model``,
  ``args`` or ``dataset``) and after the named SETUPS (files the block loads, e.g. ``model.pt``).
* ``substituted``: executed after the textual substitutions listed with the block, each with its
  reason. Substitutions marked ``fast`` only shorten work (``--steps 100`` -> ``--steps 2``,
  ``10`` verify iterations -> ``2``); set ``AXS_GUIDE_AS_WRITTEN=1`` to run every block with no
  fast substitution (slow on a CPU: the guide trains 4 x 1000 + 2 x 100 steps).
* ``schema``: a Python-like description of data (checkpoint metadata), checked key by key against
  what our code really writes.
* ``signatures``: API-reference lines, checked against ``inspect.signature`` of the real function.
* ``output`` / ``text``: an untagged block showing a command's output (asserted by the command's
  test) or a directory layout (no code).

Beyond running, each block has a check that fails when the behaviour the guide describes changes
(printed lines, checkpoint keys, flags, exit codes, files written).
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import axs_lib.reproducibility as repro
from axs_lib.checkpoint import load_checkpoint
from conftest import build_once, train_in_process
from doc_blocks import (EXAMPLE_ENV, Block, exec_python, make_workspace, parse_blocks, process_state_restored, run_command,
                        run_shell, shell_commands)

ROOT = Path(__file__).resolve().parents[1]
GUIDE = Path(__file__).parent / "data" / "reproducibility-guide.md"
SHARED_GUIDE = ROOT.parent / "shared" / "reproducibility-guide.md"
AS_WRITTEN = os.environ.get("AXS_GUIDE_AS_WRITTEN") == "1"
FAST_STEPS = "2"
ENV = EXAMPLE_ENV


def block_ids(blocks: list[Block]) -> list[str]:
    """``"<section> [<n>]"``: the n-th block under the nearest headings."""
    seen: Counter[str] = Counter()
    ids = []
    for b in blocks:
        seen[b.section] += 1
        ids.append(f"{b.section} [{seen[b.section]}]")
    return ids


BLOCKS = dict(zip(block_ids(parse_blocks(GUIDE)), parse_blocks(GUIDE)))


# --------------------------------------------------------------------------- contexts and setups

CONTEXTS = {
    "imports": (
        "The guide's fragments use os, random, numpy as np and torch without importing them.",
        "import os\nimport random\nimport numpy as np\nimport torch\n",
    ),
    "guide_api": (
        "Fragments of train_stage1.py and the troubleshooting snippets call the guide's functions without importing them.",
        "from axs_lib.reproducibility import (set_seed, get_seed_state, restore_seed_state, seed_worker,\n"
        "    create_reproducible_generator, add_seed_to_checkpoint, validate_checkpoint_seed, verify_reproducibility)\n",
    ),
    "args": (
        "Stand-in for train_stage1.py's parsed command line.",
        "import argparse\nargs = argparse.Namespace(seed=42)\n",
    ),
    "dataset": (
        "Stand-in for the script's dataset: ten items, as with the guide's --max-tiles 10.",
        "from torch.utils.data import DataLoader, TensorDataset, random_split\ndataset = TensorDataset(torch.arange(10))\n",
    ),
    "model": (
        "The Stage-1 U-Net with the trainer's default width and dropout, so a trainer checkpoint loads into it.",
        "from axs_lib.stage1.model import UNet\nmodel = UNet(width=16, dropout=0.0)\n",
    ),
    "seed_info": (
        "The script's seed_info, from its first step (set_seed at startup).",
        "seed_info = set_seed(42, deterministic=True, benchmark=False)\n",
    ),
    "train_model": (
        "The guide never defines train_model: a tiny stand-in that takes one real AdamW step of a model and returns it.",
        "def train_model(model=None, *args, **kwargs):\n"
        "    import torch\n"
        "    if not isinstance(model, torch.nn.Module):\n"
        "        model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Dropout(0.1), torch.nn.Conv2d(4, 4, 1))\n"
        "    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)\n"
        "    x = torch.randn(2, 2, 16, 16)\n"
        "    loss = model(x).abs().mean()\n"
        "    loss.backward()\n"
        "    opt.step()\n"
        "    return model\n",
    ),
}


def setup_trainer_checkpoint_as(*names: str) -> Callable[[Path, Path], None]:
    """Put a copy of a real trainer checkpoint (seed 42) at each of ``names`` in the workspace."""

    def setup(work: Path, trained: Path) -> None:
        for name in names:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(trained, work / name)

    setup.__doc__ = f"a checkpoint written by our trainer (seed 42) at {', '.join(names)}"
    return setup


def setup_old_checkpoint(work: Path, trained: Path) -> None:
    """old_model.pt: a checkpoint as older code wrote it, weights only and no seed_info."""
    torch.save({"model_state_dict": {"w": torch.ones(3)}, "epoch": 3}, work / "old_model.pt")


# --------------------------------------------------------------------------- treatments


@dataclass(frozen=True)
class Sub:
    old: str
    new: str
    reason: str
    fast: bool = False  # only shortens the work; dropped with AXS_GUIDE_AS_WRITTEN=1
    when: Callable[[], bool] | None = None  # applies only when this holds (e.g. no nvidia-smi here)

    def active(self) -> bool:
        return not (self.fast and AS_WRITTEN) and (self.when is None or self.when())


@dataclass
class Run:
    """What one block's test gets: its (substituted) code, output and namespace."""

    code: str
    work: Path
    trained: Path
    stdout: str = ""
    warnings: list[str] = field(default_factory=list)
    namespace: dict = field(default_factory=dict)
    results: list[subprocess.CompletedProcess] = field(default_factory=list)


@dataclass(frozen=True)
class Treatment:
    kind: str  # run, context, substituted, schema, signatures, output, text
    reason: str = ""
    contexts: tuple[str, ...] = ()
    setups: tuple[Callable[[Path, Path], None], ...] = ()
    subs: tuple[Sub, ...] = ()
    exit_codes: tuple[int, ...] = ()  # shell: expected status of each command (default all 0)
    check: Callable[[Run], None] | None = None


def no_gpu_tool(name: str) -> Callable[[], bool]:
    return lambda: shutil.which(name, path=ENV["PATH"]) is None


def steps_sub(old: str, new: str) -> Sub:
    return Sub(old, new, "training 100 or 1000 steps on a 2-core CPU takes minutes (about 2-3 s a step); "
               "two steps still write the final checkpoint the commands compare", fast=True)


DOTS_SYNTAX = "`, ...` after a keyword argument or inside a dict display is a SyntaxError; it stands for 'the other arguments/keys'"


# --------------------------------------------------------------------------- checks


def lines_in_order(text: str, expected: list[str]) -> None:
    got = iter(text.splitlines())
    for line in expected:
        assert any(g == line for g in got), f"line {line!r} missing or out of order in:\n{text}"


def check_verify_command(r: Run) -> None:
    (proc,) = r.results
    expected = [line for line in BLOCKS["Quick Start > Verify Reproducibility [2]"].code.splitlines() if line.strip()]
    if not AS_WRITTEN:
        expected = [line.replace("Running 10 iterations", "Running 2 iterations") for line in expected]
    lines_in_order(proc.stdout, expected)


def check_seeded_like_set_seed(draw: Callable[[], Any]) -> Callable[[Run], None]:
    """After the guide's line, the generator's next draw equals the one after set_seed(42)."""

    def check(r: Run) -> None:
        after_block = draw()
        repro.set_seed(42)
        assert np.array_equal(np.asarray(draw()), np.asarray(after_block)), "set_seed(42) does not seed this generator like the guide's line"

    return check


def check_cuda_seeded_by_set_seed(r: Run) -> None:
    """set_seed(42) calls the guide's torch.cuda.manual_seed_all(42) (observed by wrapping it: no GPU needed)."""
    calls = []
    real = torch.cuda.manual_seed_all
    torch.cuda.manual_seed_all = lambda seed: (calls.append(seed), real(seed))
    try:
        repro.set_seed(42)
    finally:
        torch.cuda.manual_seed_all = real
    assert calls and set(calls) == {42}, calls


def check_flags_like_set_seed(r: Run) -> None:
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    torch.use_deterministic_algorithms(False)
    info = repro.set_seed(42)
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
    assert torch.are_deterministic_algorithms_enabled()
    assert info["cudnn_deterministic"] is True and info["cudnn_benchmark"] is False and info["use_deterministic_algorithms"] is True


def check_cublas_like_set_seed(r: Run) -> None:
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    info = repro.set_seed(42)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" == info["cublas_workspace_config"]


def check_mode(deterministic: bool, benchmark: bool) -> Callable[[Run], None]:
    def check(r: Run) -> None:
        assert torch.backends.cudnn.deterministic is deterministic
        assert torch.backends.cudnn.benchmark is benchmark
        assert torch.are_deterministic_algorithms_enabled() is deterministic

    return check


def check_script_seed_info(r: Run) -> None:
    assert r.namespace["seed_info"]["seed"] == 42 and r.namespace["seed_info"]["deterministic"] is True


def check_split_is_the_trainers(r: Run) -> None:
    from axs_lib.split import make_split

    train_set, val_set = r.namespace["train_set"], r.namespace["val_set"]
    assert (len(train_set), len(val_set)) == (9, 1)
    paths = [Path(f"t{i:02d}.npz") for i in range(10)]
    split = make_split(paths, 42, 0.1, "random")
    assert split.val == [paths[i] for i in val_set.indices], "the trainer's random split is not the guide's random_split"


def check_model_pt_loads_weights_only(r: Run) -> None:
    ckpt = torch.load(r.work / "model.pt", weights_only=True)
    assert ckpt["seed_info"]["seed"] == 42
    assert set(ckpt["rng_state"]) == {"random_state", "numpy_state", "torch_rng_state", "cuda_rng_state"}


def check_printed(*lines: str, warned: str | None = None) -> Callable[[Run], None]:
    def check(r: Run) -> None:
        assert r.stdout.splitlines() == list(lines), r.stdout
        if warned is not None:
            assert any(warned in w for w in r.warnings), r.warnings
        else:
            assert not r.warnings, r.warnings

    return check


def check_rng_restored(r: Run) -> None:
    assert r.stdout.splitlines() == ["✓ RNG state restored"]
    stored = r.namespace["checkpoint"]["rng_state"]
    assert torch.equal(torch.get_rng_state(), stored["torch_rng_state"])
    assert np.array_equal(np.random.get_state()[1], stored["numpy_state"]["state"].numpy().astype(np.uint32))
    import random

    assert random.getstate() == repro._as_tuple(stored["random_state"])


def check_seed_info_schema(r: Run) -> None:
    guide = eval(r.code, {})  # noqa: S307 - the guide's own literal
    written = r.namespace["trainer_checkpoint"]["seed_info"]
    returned = repro.set_seed(42)
    assert set(guide) <= set(written) and set(guide) <= set(returned), set(guide) - set(written)
    machine = {"cuda_available": torch.cuda.is_available(), "cuda_device_count": torch.cuda.device_count()}
    for key, value in guide.items():
        want = machine.get(key, value)  # the guide's example machine had one GPU; this one may not
        assert written[key] == want, f"seed_info[{key!r}]: checkpoint has {written[key]!r}, guide says {value!r}"


def check_rng_state_schema(r: Run) -> None:
    guide = eval(r.code, {})  # noqa: S307
    assert set(guide) == set(r.namespace["trainer_checkpoint"]["rng_state"]) == set(repro.get_seed_state())


SIGNATURE_LINE = re.compile(r"^(?P<name>\w+)\((?P<params>.*)\)\s*(->\s*(?P<ret>.+))?$")


def check_signatures(r: Run) -> None:
    lines = [line.strip() for line in r.code.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines
    for line in lines:
        m = SIGNATURE_LINE.match(line)
        assert m, f"not a signature line: {line!r}"
        ns: dict = {}
        exec(f"from typing import Dict\nimport torch\ndef {m['name']}({m['params']}){' -> ' + m['ret'] if m['ret'] else ''}: ...", ns)
        want = inspect.signature(ns[m["name"]])
        real_fn = getattr(repro, m["name"], None)
        assert real_fn is not None, f"axs_lib.reproducibility has no {m['name']}"
        real = inspect.signature(real_fn)
        wanted, actual = list(want.parameters.values()), list(real.parameters.values())
        assert [p.name for p in actual[: len(wanted)]] == [p.name for p in wanted], f"{line}: real signature {real}"
        for w, a in zip(wanted, actual):
            assert w.default == a.default, f"{line}: default of {w.name} is {a.default!r}"
        assert all(p.default is not inspect.Parameter.empty for p in actual[len(wanted):]), f"{line}: extra required params in {real}"
        if m["ret"]:
            ret = str(real.return_annotation)
            assert ret.startswith(m["ret"].strip()), f"{line}: returns {ret}"


def check_compare_identical(r: Run) -> None:
    *trains, compare = r.results
    assert compare.stdout.startswith("verdict: IDENTICAL BYTES"), compare.stdout


def check_bad_command_refused(r: Run) -> None:
    good, bad = r.results
    before = sorted((r.work / "runs/exp1/checkpoints").iterdir())
    # refused as one line; the no-seed notice is said only by a run that starts
    assert "output directory is not empty" in bad.stderr and "--resume auto" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert before == sorted((r.work / "runs/exp1/checkpoints").iterdir())
    assert load_checkpoint(r.work / "runs/exp1/checkpoints" / f"checkpoint_step_{'1000' if AS_WRITTEN else FAST_STEPS}.pt")["step"] > 0


def check_environment_files(r: Run) -> None:
    torch_version = torch.__version__.split("+")[0]  # the version this interpreter runs, not a pinned one
    assert f"torch=={torch_version}" in (r.work / "requirements_frozen.txt").read_text()
    assert (r.work / "python_version.txt").read_text().startswith(f"Python {sys.version_info.major}.{sys.version_info.minor}.")
    gpu = (r.work / "gpu_info.txt").read_text()
    assert gpu.strip(), "gpu_info.txt is empty"
    if no_gpu_tool("nvidia-smi")():
        assert re.search(r"^gpus\s+", gpu, re.M) and re.search(rf"^torch\s+{re.escape(torch_version)}", gpu, re.M), gpu


def check_no_differences(r: Run) -> None:
    *trains, diff = r.results
    assert diff.stdout == "", diff.stdout
    # Process substitution hides a failing python -c (two empty outputs do not differ): run one alone.
    step = "1000" if AS_WRITTEN else FAST_STEPS
    alone = run_shell(f"python -c \"import torch; print(torch.load('run1/checkpoints/checkpoint_step_{step}.pt')['model_state_dict'])\"", r.work)
    assert alone.returncode == 0 and "tensor(" in alone.stdout, alone.stderr


def check_cuda_report(r: Run) -> None:
    (proc,) = r.results
    if no_gpu_tool("nvcc")():
        assert re.search(r"^cuda\s+", proc.stdout, re.M) and re.search(r"^cudnn\s+", proc.stdout, re.M), proc.stdout


def check_verified(r: Run) -> None:
    assert not r.warnings


def check_example1(r: Run) -> None:
    check_model_pt_loads_weights_only(r)
    ckpt = torch.load(r.work / "model.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["loss"]) == (10, 0.123) and "model_state_dict" in ckpt


def check_example2(r: Run) -> None:
    model = r.namespace["model"]
    assert isinstance(model, torch.nn.Module)
    assert torch.are_deterministic_algorithms_enabled()  # set_seed(seed, deterministic=True) ran


def check_example3(r: Run) -> None:
    assert r.stdout.splitlines() == ["✓ All experiments use seed 42"], r.stdout


# --------------------------------------------------------------------------- the table

TREATMENTS: dict[str, Treatment] = {
    "Quick Start > Basic Usage [1]": Treatment("run", check=check_mode(True, False)),
    "Quick Start > Verify Reproducibility [1]": Treatment(
        "substituted",
        subs=(Sub("--seed 42", "--seed 42 --iterations 2",
                  "each verify iteration trains the probe (~3 s here); 2 iterations still compare bits and run the "
                  "stop-save-restore check", fast=True),),
        check=check_verify_command,
    ),
    "Quick Start > Verify Reproducibility [2]": Treatment(
        "output", "The printed lines of the command above; asserted, in order, by that block's test "
                  "(with 'Running 2 iterations' while its fast substitution is on)."),
    "Implementation Details > What Gets Seeded [1]": Treatment(
        "context", contexts=("imports",), check=check_seeded_like_set_seed(lambda: __import__("random").random())),
    "Implementation Details > What Gets Seeded [2]": Treatment(
        "context", contexts=("imports",), check=check_seeded_like_set_seed(lambda: np.random.rand(3))),
    "Implementation Details > What Gets Seeded [3]": Treatment(
        "context", contexts=("imports",), check=check_seeded_like_set_seed(lambda: torch.rand(3).numpy())),
    "Implementation Details > What Gets Seeded [4]": Treatment(
        "context", contexts=("imports",),
        check=check_cuda_seeded_by_set_seed),
    "Implementation Details > What Gets Seeded [5]": Treatment("context", contexts=("imports",), check=check_flags_like_set_seed),
    "Implementation Details > What Gets Seeded [6]": Treatment("context", contexts=("imports",), check=check_flags_like_set_seed),
    "Implementation Details > What Gets Seeded [7]": Treatment("context", contexts=("imports",), check=check_cublas_like_set_seed),
    "Implementation Details > Training Script Integration [1]": Treatment(
        "context", contexts=("guide_api", "args"), check=check_script_seed_info),
    "Implementation Details > Training Script Integration [2]": Treatment(
        "context", contexts=("imports", "guide_api", "args", "dataset"), check=check_split_is_the_trainers),
    "Implementation Details > Training Script Integration [3]": Treatment(
        "substituted", contexts=("imports", "guide_api", "dataset"),
        subs=(Sub("worker_init_fn=seed_worker, ...)", "worker_init_fn=seed_worker)", DOTS_SYNTAX),)),
    "Implementation Details > Training Script Integration [4]": Treatment(
        "substituted", contexts=("imports", "guide_api", "model", "seed_info"),
        subs=(Sub("model.state_dict(), ...}", "model.state_dict()}", DOTS_SYNTAX),),
        check=check_model_pt_loads_weights_only),
    "Checkpoint Metadata > Seed Info [1]": Treatment(
        "schema", "Checked against the seed_info of a real trainer checkpoint and of set_seed(); cuda_available and "
                  "cuda_device_count are compared with this machine, not with the guide's one-GPU example.",
        check=check_seed_info_schema),
    "Checkpoint Metadata > RNG State [1]": Treatment(
        "schema", "Placeholders <...> are not Python; they become None and the keys are checked against a trainer "
                  "checkpoint's rng_state and get_seed_state().",
        subs=tuple(Sub(p, "None", "placeholder for a value, not Python") for p in
                   ("<Python random state>", "<NumPy random state>", "<PyTorch CPU RNG state>", "<CUDA RNG state>")),
        check=check_rng_state_schema),
    "Loading Checkpoints > Validate Seed [1]": Treatment(
        "context", contexts=("imports",), setups=(setup_trainer_checkpoint_as("model.pt"),),
        check=check_printed("✓ Seed validated!")),
    "Loading Checkpoints > Restore RNG State [1]": Treatment(
        "context", contexts=("imports",), setups=(setup_trainer_checkpoint_as("model.pt"),), check=check_rng_restored),
    "Performance Considerations > Configuration Options [1]": Treatment("context", contexts=("guide_api",), check=check_mode(True, False)),
    "Performance Considerations > Configuration Options [2]": Treatment("context", contexts=("guide_api",), check=check_mode(False, True)),
    "Performance Considerations > Configuration Options [3]": Treatment("context", contexts=("guide_api",), check=check_mode(False, False)),
    "Best Practices > 1. Always Specify Seed [1]": Treatment(
        "substituted",
        "The second ('Bad') command, as written, reuses runs/exp1/: our trainer refuses a used output directory "
        "(exit 2, nothing touched) and still prints the missing-seed notice.",
        subs=(Sub("--output-dir runs/exp1/ --seed 42", f"--output-dir runs/exp1/ --seed 42 --steps {FAST_STEPS}",
                  "the default is 45 passes over the training tiles (at least 200 steps); two steps are enough to write a checkpoint", fast=True),),
        exit_codes=(0, 2), check=check_bad_command_refused),
    "Best Practices > 2. Document Seed in Experiments [1]": Treatment("text", "A directory layout, not code."),
    "Best Practices > 3. Validate Before Comparing [1]": Treatment(
        "context",
        "Our trainer writes <run>/checkpoints/checkpoint_step_<N>.pt and best.pt, never <run>/model.pt: the test puts "
        "a trainer checkpoint at the paths the guide names.",
        contexts=("imports",), setups=(setup_trainer_checkpoint_as("run1/model.pt", "run2/model.pt"),)),
    "Best Practices > 4. Test Reproducibility [1]": Treatment(
        "substituted",
        subs=(steps_sub("--steps 100", f"--steps {FAST_STEPS}"),
              steps_sub("checkpoint_step_100.pt", f"checkpoint_step_{FAST_STEPS}.pt")),
        check=check_compare_identical),
    "Best Practices > 5. Save Environment Info [1]": Treatment(
        "substituted",
        subs=(Sub("nvidia-smi > gpu_info.txt", "axs env > gpu_info.txt",
                  "no nvidia-smi on this machine: `axs env` is our replacement (GPU model, compute capability, "
                  "driver, CUDA, cuDNN, and what else changes bits)", when=no_gpu_tool("nvidia-smi")),),
        check=check_environment_files),
    "Verification > Automated Testing [1]": Treatment(
        "substituted",
        subs=(Sub("num_iterations=10", "num_iterations=2", "each iteration trains the probe (~3 s here)", fast=True),),
        check=check_verified),
    "Verification > Manual Testing [1]": Treatment(
        "substituted",
        "Also runs one `python -c` alone: a failing process substitution would otherwise make diff compare two empty outputs.",
        subs=(steps_sub("--steps 1000", f"--steps {FAST_STEPS}"),
              steps_sub("checkpoint_step_1000.pt", f"checkpoint_step_{FAST_STEPS}.pt")),
        check=check_no_differences),
    "Troubleshooting > Results Still Vary [1]": Treatment("run"),
    "Troubleshooting > Results Still Vary [2]": Treatment(
        "substituted",
        subs=(Sub("nvcc --version", "axs env",
                  "no CUDA toolkit here: `axs env` reports the CUDA and cuDNN that torch uses (what matters for "
                  "bits; nvcc reports the installed toolkit, which may differ)", when=no_gpu_tool("nvcc")),),
        check=check_cuda_report),
    "Troubleshooting > Results Still Vary [3]": Treatment("run", check=check_printed(torch.__version__)),
    "Troubleshooting > Training Very Slow [1]": Treatment("context", contexts=("guide_api",), check=check_mode(False, True)),
    "Troubleshooting > Checkpoint Missing Seed [1]": Treatment(
        "context", contexts=("imports", "guide_api"), setups=(setup_old_checkpoint,),
        check=check_printed("⚠️ Old checkpoint, seed unknown", "⚠️ Cannot guarantee reproducibility")),
    "API Reference > Core Functions [1]": Treatment("signatures", check=check_signatures),
    "API Reference > Checkpoint Functions [1]": Treatment("signatures", check=check_signatures),
    "API Reference > Verification [1]": Treatment("signatures", check=check_signatures),
    "Examples > Example 1: Reproducible Training [1]": Treatment(
        "context", contexts=("imports", "train_model"), check=check_example1),
    "Examples > Example 2: Resume Training Reproducibly [1]": Treatment(
        "context", contexts=("imports", "model", "train_model"), setups=(setup_trainer_checkpoint_as("model.pt"),),
        check=check_example2),
    "Examples > Example 3: Compare Experiments [1]": Treatment(
        "context", contexts=("imports",), setups=(setup_trainer_checkpoint_as("exp1/model.pt", "exp2/model.pt", "exp3/model.pt"),),
        check=check_example3),
}


# --------------------------------------------------------------------------- fixtures and runners


@pytest.fixture(scope="session")
def trainer_checkpoint(demo_tiles, tmp_path_factory) -> Path:
    """The final checkpoint of a real 2-step Stage-1 run on the demo tiles, seed 42 (trained once per test run)."""
    out = build_once(tmp_path_factory, "guide_trained_run", lambda out: train_in_process([
        "--data-dir", str(demo_tiles), "--output-dir", str(out), "--seed", "42", "--steps", "2", "--no-plots", "--quiet"]))
    return out / "checkpoints" / "checkpoint_step_2.pt"


@pytest.fixture
def workspace(tmp_path, demo_tiles) -> Path:
    """A working directory laid out like the guide assumes: tiles/, axs_lib/, scripts/, tools/."""
    return make_workspace(tmp_path / "work", demo_tiles)


@pytest.fixture
def isolated():
    """Undo what a block does to this process: seeds, determinism flags, environment."""
    with process_state_restored():
        yield


def substituted(block_id: str) -> str:
    code = BLOCKS[block_id].code
    for sub in TREATMENTS[block_id].subs:
        if sub.active():
            assert sub.old in code, f"{block_id}: substitution target {sub.old!r} is no longer in the guide"
            code = code.replace(sub.old, sub.new)
    return code


# --------------------------------------------------------------------------- tests


@pytest.mark.skipif(not SHARED_GUIDE.exists(), reason="no ../shared/reproducibility-guide.md beside the repository")
def test_vendored_guide_is_the_shared_spec():
    assert GUIDE.read_bytes() == SHARED_GUIDE.read_bytes(), (
        "tests/data/reproducibility-guide.md differs from ../shared/reproducibility-guide.md: copy the spec over "
        "and update TREATMENTS in tests/test_guide.py")


def test_every_guide_block_has_exactly_one_treatment():
    assert len(BLOCKS) == len(parse_blocks(GUIDE)), "two blocks share an id"
    assert sorted(BLOCKS) == sorted(TREATMENTS), (
        f"blocks without a treatment: {sorted(set(BLOCKS) - set(TREATMENTS))}; "
        f"treatments without a block: {sorted(set(TREATMENTS) - set(BLOCKS))}")
    for block_id, t in TREATMENTS.items():
        block = BLOCKS[block_id]
        assert t.kind in {"run", "context", "substituted", "schema", "signatures", "output", "text"}
        assert (t.kind == "substituted") == bool(t.subs) or t.kind == "schema", block_id
        assert t.kind not in {"output", "text"} or (block.lang == "" and t.reason), block_id
        for sub in t.subs:
            assert sub.old in block.code, f"{block_id}: {sub.old!r} not in the block"
            assert sub.reason
        assert all(c in CONTEXTS for c in t.contexts)
        if block.is_shell and t.exit_codes:
            assert len(t.exit_codes) == len(shell_commands(block)), block_id


def test_every_python_block_compiles_after_its_listed_substitutions_only():
    """Blocks marked run/context compile as written; only the listed substitutions make the others compile."""
    for block_id, block in BLOCKS.items():
        t = TREATMENTS[block_id]
        if block.is_python and t.kind in {"run", "context", "substituted"}:
            compile(substituted(block_id), block.where, "exec")
            if t.kind in {"run", "context"}:
                compile(block.code, block.where, "exec")


@pytest.mark.parametrize("block_id", list(BLOCKS))
def test_guide_block(block_id, workspace, trainer_checkpoint, isolated):
    block, t = BLOCKS[block_id], TREATMENTS[block_id]
    code = substituted(block_id)
    r = Run(code, workspace, trainer_checkpoint)
    for setup in t.setups:
        setup(workspace, trainer_checkpoint)

    if t.kind in {"output", "text"}:
        assert block.lang == "" and code.strip()
        return
    if t.kind == "schema":
        r.namespace["trainer_checkpoint"] = load_checkpoint(trainer_checkpoint)
    elif t.kind == "signatures":
        pass
    elif block.is_python:
        for name in t.contexts:
            exec(CONTEXTS[name][1], r.namespace)
        r.stdout, r.warnings = exec_python(code, block.where, r.namespace, workspace)
    elif block.is_shell:
        expected = t.exit_codes or (0,) * len(shell_commands(block))
        for command, want in zip([c for c in _commands(code, block)], expected):
            proc = run_command(command, workspace)
            r.results.append(proc)
            assert proc.returncode == want, f"{block.where}: `{command}` exited {proc.returncode}, expected {want}\n{proc.stdout}\n{proc.stderr}"
    else:
        pytest.fail(f"{block.where}: no runner for a {block.lang!r} block")
    if t.check is not None:
        t.check(r)


def _commands(code: str, block: Block) -> list[str]:
    return shell_commands(Block(block.path, block.line, block.lang, code, block.headings, block.illustrative))
