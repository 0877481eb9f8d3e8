"""What a user's pip sees: pyproject.toml's ranges and extras, and constraints.txt's exact pins.

pyproject.toml says what axs-lib works with (ranges, so ``pip install axs-lib`` keeps the torch
build a user already has); constraints.txt says what we tested (exact versions that the public
index also has, so ``make install`` resolves for a user as it does here). The checks are plain
functions fed first the real files, then a broken copy, so each one is seen to catch what it is for.
No network. The start-up checks at the end look at what a command imports and where its messages
go, never at how long it takes.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from axs_lib.cli import command_names, commands_needed, main

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"data", "ingest", "tensorboard", "lightning", "mlflow", "wandb", "dev"}
TESTED_PYTHONS = ("3.11", "3.12", "3.13")


def load_pyproject(text: str | None = None) -> dict:
    return tomllib.loads(text if text is not None else (ROOT / "pyproject.toml").read_text())


def load_pins(text: str | None = None) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line of a constraints file."""
    text = text if text is not None else (ROOT / "constraints.txt").read_text()
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier  # one exact pin per line
            assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def python_problems(project: dict) -> list[str]:
    spec = SpecifierSet(project["requires-python"])
    return [f"requires-python {spec} excludes Python {v}" for v in (*TESTED_PYTHONS, "3.14") if v not in spec]


def dependency_requirements(project: dict) -> list[Requirement]:
    """Core and extra requirements, leaving out the extras' references to axs-lib itself."""
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra if canonicalize_name(Requirement(r).name) != canonicalize_name(project["name"])]
    return reqs


def core_pin_problems(project: dict) -> list[str]:
    problems = []
    for req in map(Requirement, project["dependencies"]):
        if any(s.operator in ("==", "===") for s in req.specifier):
            problems.append(f"{req}: an exact pin in [project.dependencies] would replace a user's build")
    torch = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch"]
    if len(torch) != 1 or {s.operator for s in torch[0].specifier} != {">=", "<"}:
        problems.append(f"torch must be one tested range (>=low,<high), got {[str(t) for t in torch]}")
    return problems


def constraint_problems(project: dict, constraints_text: str) -> list[str]:
    problems = [f"local version label in {line.strip()!r}" for line in constraints_text.splitlines()
                if re.search(r"==\S*\+", line.split("#", 1)[0])]
    problems += [f"constraints.txt names a host: {line.strip()!r}" for line in constraints_text.splitlines()
                 if re.search(r"://|--(extra-)?index-url|--find-links", line)]
    if problems:
        return problems
    pins = load_pins(constraints_text)
    for req in dependency_requirements(project):
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name} is a dependency but not pinned in constraints.txt")
        elif pins[name] not in req.specifier:
            problems.append(f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}")
    return problems


def extra_problems(project: dict) -> list[str]:
    extras = project.get("optional-dependencies", {})
    problems = [f"extra [{name}] is missing" for name in sorted(EXTRAS - extras.keys())]
    dev = {canonicalize_name(Requirement(r).name): Requirement(r) for r in extras.get("dev", [])}
    itself = dev.get(canonicalize_name(project["name"]))
    others = EXTRAS - {"dev", "ingest"}  # ingest is another name for data
    if itself is None or not others <= itself.extras:
        problems.append(f"[dev] must pull in {sorted(others)} (as {project['name']}[...])")
    for name in ("pytest", "pytest-timeout", "pytest-xdist", "hypothesis"):
        if name not in dev:
            problems.append(f"[dev] lacks {name}")
    return problems


# ----------------------------------------------------------------------------- the real files


def test_requires_python_admits_every_tested_python_and_has_no_early_cap():
    assert python_problems(load_pyproject()["project"]) == []


def test_core_dependencies_are_ranges_and_torch_is_a_tested_range():
    assert core_pin_problems(load_pyproject()["project"]) == []


def test_constraints_pin_every_dependency_without_local_labels_or_hosts():
    assert constraint_problems(load_pyproject()["project"], (ROOT / "constraints.txt").read_text()) == []


def test_extras_exist_and_dev_pulls_in_all_of_them():
    assert extra_problems(load_pyproject()["project"]) == []


def test_makefile_shows_pip_errors_and_names_no_host():
    makefile = (ROOT / "Makefile").read_text()
    pip_lines = [line for line in makefile.splitlines() if "pip install" in line or "PIP_FLAGS ?=" in line]
    assert pip_lines and not [line for line in pip_lines if re.search(r"\s-q\b|--quiet", line)]
    assert "://" not in makefile


# ----------------------------------------------------------------------------- the checks catch what they are for

GOOD = """
[project]
name = "axs-lib"
requires-python = ">=3.11"
dependencies = ["torch>=2.11,<2.15", "numpy>=2.0,<3"]
[project.optional-dependencies]
data = ["rasterio>=1.4"]
ingest = ["rasterio>=1.4"]
tensorboard = ["tensorboard>=2.16"]
lightning = ["lightning>=2.4"]
mlflow = ["mlflow-skinny>=3.17"]
wandb = ["wandb>=0.31"]
dev = ["axs-lib[data,tensorboard,lightning,mlflow,wandb]", "pytest", "pytest-timeout", "pytest-xdist", "hypothesis"]
"""
GOOD_PINS = "torch==2.13.0\nnumpy==2.4.6\nrasterio==1.4.4\ntensorboard==2.21.0\nlightning==2.6.6\n" \
            "pytest==9.2.0\npytest-timeout==2.4.0\npytest_xdist==3.8.0\nhypothesis==6.170.17\n" \
            "mlflow-skinny==3.17.2\nwandb==0.31.0\n"


def test_the_checks_pass_a_good_example():
    project = load_pyproject(GOOD)["project"]
    assert python_problems(project) + core_pin_problems(project) + extra_problems(project) == []
    assert constraint_problems(project, GOOD_PINS) == []


@pytest.mark.parametrize(("old", "new", "check"), [
    ('">=3.11"', '">=3.11,<3.12"', python_problems),
    ('"torch>=2.11,<2.15"', '"torch==2.13.0"', core_pin_problems),
    ('"torch>=2.11,<2.15"', '"torch>=2.11"', core_pin_problems),
    ('"numpy>=2.0,<3"', '"numpy==2.4.6"', core_pin_problems),
    ('lightning = ["lightning>=2.4"]\n', "", extra_problems),
    ('"axs-lib[data,tensorboard,lightning,mlflow,wandb]", ', "", extra_problems),
    ("lightning,mlflow,wandb]", "lightning]", extra_problems),
    ('"hypothesis"]', '"pytest"]', extra_problems),
])
def test_the_checks_catch_a_broken_pyproject(old, new, check):
    assert old in GOOD
    assert check(load_pyproject(GOOD.replace(old, new))["project"])


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("torch==2.13.0", "torch==2.13.0+cpu", "local version label"),
    ("rasterio==1.4.4\n", "", "rasterio is a dependency but not pinned"),
    ("numpy==2.4.6", "numpy==1.26.4", "outside pyproject"),
    ("torch==2.13.0\n", "torch==2.13.0\n--extra-index-url https://example.invalid/simple\n", "names a host"),
])
def test_the_constraint_check_catches_a_broken_constraints_file(old, new, expected):
    problems = constraint_problems(load_pyproject(GOOD)["project"], GOOD_PINS.replace(old, new))
    assert any(expected in p for p in problems), problems


# ----------------------------------------------------------------------------- start-up and messages
# What each command imports, not how long it takes (timings are benchmarks/bench_startup.py's job).

IMPORTS_AFTER = (
    "import sys\n"
    "from axs_lib.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(code, sorted(m for m in ('torch', 'numpy', 'matplotlib', 'axs_lib.commands.train', 'axs_lib.commands.tiles')"
    " if m in sys.modules))\n"
)


def _imports_after(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", IMPORTS_AFTER, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [("--version",), ("env", "--help"), ("runs", "--help"), ("inspect", "--help")])
def test_commands_that_do_not_need_torch_do_not_import_it(argv):
    assert _imports_after(*argv) == "0 []"


def test_commands_needed_picks_the_named_command_only():
    assert commands_needed(["--debug", "env", "--json"]) == ["env"]
    assert commands_needed(["--version"]) == []
    for argv in ([], ["--help"], ["--version", "--help"], ["nosuch"], ["--", "env"]):
        assert commands_needed(argv) is None, argv
    assert set(command_names()) >= {"compare", "env", "inspect", "runs", "train", "verify"}


def test_cli_prints_library_log_records_plainly_and_removes_its_handler(monkeypatch, capsys):
    import axs_lib.commands.env as env_command

    def noisy(args):
        logging.getLogger("axs_lib.some_module").info("plain progress")
        logging.getLogger("axs_lib.some_module").warning("tile x.npz skipped")
        warnings.warn("late CUBLAS_WORKSPACE_CONFIG", RuntimeWarning, stacklevel=1)  # raised from this test file, not axs_lib
        logging.getLogger("axs_lib.some_module").debug("not shown")
        return 0

    monkeypatch.setattr(env_command, "run", noisy)
    logger = logging.getLogger("axs_lib")
    handlers, level = list(logger.handlers), logger.level
    with pytest.warns(RuntimeWarning, match="late CUBLAS"):  # not axs_lib's: handed on as Python would
        assert main(["env"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["plain progress", "axs: warning: tile x.npz skipped"]
    assert (logger.handlers, logger.level) == (handlers, level)


def test_cli_prints_axs_lib_warnings_as_one_line(monkeypatch, capsys):
    import axs_lib.commands.env as env_command

    # A warning whose frame lies in axs_lib (as for set_seed called by the trainer).
    in_axs_lib = compile("import warnings\nwarnings.warn('CUDA was initialised before set_seed()', RuntimeWarning)\n",
                         str(ROOT / "axs_lib" / "reproducibility.py"), "exec")
    monkeypatch.setattr(env_command, "run", lambda args: exec(in_axs_lib, {}) or 0)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["env"]) == 0
    assert capsys.readouterr().err == "axs: warning: CUDA was initialised before set_seed()\n"


def test_the_linter_configuration_catches_an_undefined_name_and_passes_the_project(tmp_path):
    """`make test` runs ruff with pyproject.toml's rules first: a name used but never defined (a
    misspelt variable on an error path, say) fails it, and the project as committed passes."""
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.fail(f"{ruff} is missing: ruff is a dev dependency (make install)")
    bad = tmp_path / "bad.py"
    bad.write_text("def message(path):\n    return f'{path}: {reason}'\n")
    caught = subprocess.run([str(ruff), "check", "--config", str(ROOT / "pyproject.toml"), "--no-cache", str(bad)],
                            capture_output=True, text=True)
    assert caught.returncode == 1 and "F821" in caught.stdout, caught.stdout + caught.stderr
    clean = subprocess.run([str(ruff), "check", "--no-cache", "--quiet", "."], cwd=ROOT, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_the_license_is_an_spdx_string_so_building_prints_no_deprecation():
    """setuptools 77+ deprecates ``license = {text = ...}`` and prints a page of warning at every
    install; an SPDX string (with a build requirement that reads it) prints none."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str), project["project"]["license"]
    (requirement,) = [Requirement(r) for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert not requirement.specifier.contains("76.9") and requirement.specifier.contains("77.0")
