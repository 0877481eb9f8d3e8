"""The ``axs`` command: one entry point, a subcommand per module in `axs_lib.commands`.

Each module in ``axs_lib/commands/`` defines ``register(subparsers)``, which adds its parser and
sets ``func`` to a handler ``(args) -> int``. Modules are found by name, so adding a command is
adding a file. Errors derived from `AxsError` become one line on stderr and their exit status;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import Sequence

from axs_lib import __version__, commands, errors
from axs_lib.errors import AxsError

EPILOG = """examples:
  axs verify --seed 42                      check that training here is bit-reproducible
  axs env                                   print the environment fingerprint
  axs tiles demo tiles/                     write the real BigEarthNet demo tiles
  axs train stage1 --data-dir tiles/ --output-dir runs/exp1/ --seed 42 --steps 100
  axs compare runs/exp1 runs/exp2           do two runs match, and if not, where and why
"""


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (exit 2), not the usage block and then the error.

    Subcommand parsers are made of the same class, so this holds for every ``axs`` command. Flags
    must be spelled out: an abbreviation (``--no-plot``) would keep a stale command working."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="axs",
        description="Bit-exact reproducible training for SAR-to-optical models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"axs {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``axs`` command line and return its exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_handler(args.func, args, debug=args.debug)


def run_handler(func, args, *, debug: bool = False) -> int:
    """Call a command handler, turning `AxsError` into one line on stderr and its exit status."""
    try:
        return int(func(args) or 0)
    except AxsError as exc:
        if debug:
            raise
        print(f"axs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("axs: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        error = worker_error(exc)
        if error is None or debug:
            raise
        print(f"axs: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def worker_error(exc: BaseException) -> AxsError | None:
    """The `AxsError` a DataLoader worker raised, recovered from the RuntimeError torch re-raises it as.

    torch cannot rebuild our errors in the main process (their constructors take more than a
    message), so it raises ``RuntimeError("Caught InputError in DataLoader worker process 0.
    Original Traceback ... axs_lib.errors.InputError: <message>")``. Without this a bad tile read by
    a worker would end the run with a traceback instead of one line and exit 2.
    """
    text = str(exc)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not (lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]):
        return None
    name, sep, message = lines[-1].partition(": ")
    module, _, cls_name = name.rpartition(".")
    cls = getattr(errors, cls_name, None)
    if not sep or module != errors.__name__ or not (isinstance(cls, type) and issubclass(cls, AxsError)):
        return None
    return AxsError(message.strip(), exit_code=cls.exit_code)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Let ``--debug`` be given after the subcommand too (``axs verify --debug``)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def main_entry() -> None:
    """Console-script entry point: ``axs``."""
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
