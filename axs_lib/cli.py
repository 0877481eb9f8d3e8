"""The ``axs`` command: one entry point, a subcommand per module in `axs_lib.commands`.

Each module in ``axs_lib/commands/`` defines ``register(subparsers)``, which adds its parser and
sets ``func`` to a handler ``(args) -> int``. Modules are found by name, so adding a command is
adding a file. Errors derived from `AxsError` become one line on stderr and their exit status;
``--debug`` shows the traceback instead.

Start-up cost is kept to what the command uses. Finding the modules does not import them; when
the command line names a command, only that module is imported (``axs env`` never imports the
trainer), and ``axs --version`` imports none. Command modules import torch and other heavy
libraries inside their handlers, so even ``axs --help``, which imports every command module to
show their help, need not import torch. `benchmarks/bench_startup.py` measures this.

Library modules report through `logging` (``logging.getLogger(__name__)``) and never configure
it; `main` installs one stderr handler on the ``axs_lib`` logger that prints the message alone
(``axs: warning: ...`` for warnings), so a program that uses the library routes or silences the
same messages with ordinary logging configuration.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import warnings
from typing import Iterable, Sequence

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


def command_names() -> list[str]:
    """Names of the ``axs`` subcommands: the modules of `axs_lib.commands`, found without importing them."""
    return sorted(info.name for info in pkgutil.iter_modules(commands.__path__))


def build_parser(only: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``axs`` parser with every subcommand, or with just those named in ``only``.

    Registering a subcommand imports its module, so `main` passes the one the command line names
    (or none for a bare ``axs --version``); help and usage errors get the full parser.
    """
    parser = OneLineParser(
        prog="axs",
        description="Bit-exact reproducible training for SAR-to-optical models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"axs {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_names() if only is None else sorted(only):
        importlib.import_module(f"{commands.__name__}.{name}").register(sub)
    return parser


def commands_needed(argv: Sequence[str]) -> list[str] | None:
    """The subcommand modules a parse of ``argv`` needs: the one it names, none, or None for all.

    Only the top-level options come before a subcommand, and none of them takes a value, so the
    first word that is not an option is the subcommand. ``axs --version`` needs none; help, a
    bare ``axs`` and an unknown word need all (their output lists every command).
    """
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return [word] if word in command_names() else None
    return [] if "--version" in argv and not {"-h", "--help"} & set(argv) else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``axs`` command line and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(commands_needed(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help and --version
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 2
    with _messages_to_stderr():
        return run_handler(args.func, args, debug=args.debug)


class _PlainFormatter(logging.Formatter):
    """The message alone; ``axs: warning: `` / ``axs: error: `` in front of warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"axs: error: {message}"
        if record.levelno >= logging.WARNING:
            return f"axs: warning: {message}"
        return message


class _messages_to_stderr:
    """While a command runs: ``axs_lib`` log records (INFO and up) and our Python warnings on stderr.

    One handler on the ``axs_lib`` logger, removed again on exit (tests call `main` many times in
    one process). Warnings raised by axs_lib code print as ``axs: warning: <message>`` instead of
    Python's ``file:line: Category: message`` form; other packages' warnings keep theirs.
    """

    def __enter__(self):
        self.logger = logging.getLogger("axs_lib")
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(_PlainFormatter("%(message)s"))
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # one copy of each message, even if the root logger has handlers
        self.saved_showwarning = warnings.showwarning
        warnings.showwarning = self._show_warning
        return self

    def __exit__(self, *exc_info):
        warnings.showwarning = self.saved_showwarning
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]
        return False

    def _show_warning(self, message, category, filename, lineno, file=None, line=None):
        module = os.path.abspath(filename)
        if module.startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep):
            print(f"axs: warning: {message}", file=file or sys.stderr)
        else:
            self.saved_showwarning(message, category, filename, lineno, file, line)


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
    """Console-script entry point: ``axs``.

    stdout and stderr are made line-buffered, so progress lines and messages arrive in order and
    at once when piped into a log file or ``tee``.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
