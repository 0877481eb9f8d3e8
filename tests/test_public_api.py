"""The package's one import surface: ``from axs_lib import ...`` for every toolkit name.

`axs_lib.__all__` names what a user of the toolkit looks for; each name is imported lazily from the
module that owns it, so ``import axs_lib`` (and with it ``axs --help``) stays free of torch. The
checks that look at what a bare import loads run in a fresh interpreter: this one has torch already.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import axs_lib
from axs_lib.errors import AxsError

ROOT = Path(__file__).resolve().parents[1]

# What a user of the toolkit looks for by name (docs/own_loop.md, docs/distributed.md, the guide).
EXPECTED = {
    "set_seed", "derive_seed", "seed_globals", "seed_worker", "get_seed_state", "restore_seed_state",
    "ResumableSampler", "ResumableLoader", "SeededDataset", "TrainingState", "CheckpointManager",
    "EarlyStopping", "MicroBatchPlan", "GradientTree", "StopRequest", "pin",
    "AxsError", "InputError", "CheckpointError", "UsageError",
}


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_all_lists_what_a_toolkit_user_looks_for():
    assert EXPECTED <= set(axs_lib.__all__), sorted(EXPECTED - set(axs_lib.__all__))
    assert len(axs_lib.__all__) == len(set(axs_lib.__all__))
    assert set(axs_lib.__all__) == set(axs_lib._HOMES)  # every exported name has a home, every home is exported


@pytest.mark.parametrize("name", axs_lib.__all__)
def test_every_name_in_all_resolves_to_the_object_of_its_home_module(name):
    value = getattr(axs_lib, name)
    home = importlib.import_module(axs_lib._HOMES[name])
    assert value is getattr(home, name)
    assert name in dir(axs_lib)


def test_star_import_gives_every_name_in_all():
    namespace: dict = {}
    exec("from axs_lib import *", namespace)
    assert set(axs_lib.__all__) <= namespace.keys()


def test_an_unknown_name_is_an_attribute_error_and_submodules_still_import():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        axs_lib.no_such_name  # noqa: B018
    from axs_lib import commands, errors  # submodules: the import system's fallback after AttributeError

    assert commands.__name__ == "axs_lib.commands" and errors is importlib.import_module("axs_lib.errors")


def test_no_exported_name_is_also_a_submodule_name():
    # ``import axs_lib.<module>`` sets the package attribute to the module: a function of the same
    # name would be replaced by it depending on what was imported first.
    modules = {m.name for m in pkgutil.iter_modules(axs_lib.__path__)}
    assert not modules & set(axs_lib.__all__), sorted(modules & set(axs_lib.__all__))


def test_every_toolkit_error_type_of_the_exporting_modules_is_exported():
    errors = set()
    for home in set(axs_lib._HOMES.values()):
        module = importlib.import_module(home)
        errors |= {name for name, obj in vars(module).items()
                   if inspect.isclass(obj) and issubclass(obj, AxsError) and obj.__module__ == home}
    assert errors, "found no error types at all"
    assert errors <= set(axs_lib.__all__), sorted(errors - set(axs_lib.__all__))


def test_import_axs_lib_does_not_import_torch_or_any_toolkit_module():
    loaded = _run("import sys, axs_lib\n"
                  "print(sorted(m for m in sys.modules if m in ('torch', 'numpy') or m.startswith('axs_lib.')))")
    assert loaded == "[]"


def test_reading_a_torch_free_name_does_not_import_torch():
    # The errors, the stop-signal flag and portable mode are what a launcher reads before torch.
    loaded = _run("import sys, axs_lib\n"
                  "axs_lib.AxsError, axs_lib.UsageError, axs_lib.StopRequest, axs_lib.pin, axs_lib.PortableError\n"
                  "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    assert loaded == "[]"


def test_dir_lists_the_exported_names_before_any_is_read():
    listed = _run("import axs_lib\nprint(sorted(set(axs_lib.__all__) - set(dir(axs_lib))))")
    assert listed == "[]"
