"""Fenced code blocks of a Markdown file, and the commands in them (used by test_guide and test_docs).

A block is a fenced region (```lang ... ``` or ~~~), possibly indented (inside a list item; the
indentation is removed). It knows its language, the line its fence opens on, the headings above
it, and whether the last non-blank line before the fence is an ``<!-- illustrative ... -->``
comment: that marks a block that is deliberately not executed (it is still parsed).

Shell commands: in ``bash``/``sh``/``shell`` blocks every non-blank, non-comment logical line is a
command (a line ending in a backslash continues on the next). In ``console`` blocks only lines
starting with ``$ `` are commands; the other lines are output.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)[^\n]*$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
ILLUSTRATIVE = re.compile(r"^\s*<!--\s*illustrative\b.*-->\s*$", re.IGNORECASE)
SHELL_LANGS = {"bash", "sh", "shell", "zsh"}
CONSOLE_LANGS = {"console", "shell-session"}
PYTHON_LANGS = {"python", "py", "python3"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str  # lower-case; "" for an untagged fence
    code: str  # content with the fence's indentation removed
    headings: tuple[str, ...]  # enclosing headings, outermost first (level >= 2)
    illustrative: bool

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def section(self) -> str:
        return " > ".join(self.headings) or "(top)"

    @property
    def is_python(self) -> bool:
        return self.lang in PYTHON_LANGS

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGS or self.lang in CONSOLE_LANGS


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` in document order."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    headings: dict[int, str] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        m = FENCE.match(line)
        if m is None:
            h = HEADING.match(line)
            if h and len(h.group(1)) >= 2:
                level = len(h.group(1))
                headings = {k: v for k, v in headings.items() if k < level}
                headings[level] = h.group(2)
            i += 1
            continue
        fence, indent = m.group("fence"), m.group("indent")
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) <= {fence[0]}:
                break
            body.append(lines[j])
            j += 1
        else:
            raise ValueError(f"{path}:{i + 1}: unclosed code fence")
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        illustrative = k >= 0 and bool(ILLUSTRATIVE.match(lines[k]))
        code = "\n".join(b[len(indent):] if b.startswith(indent) else b.lstrip() for b in body)
        blocks.append(Block(Path(path), i + 1, m.group("lang").lower(), textwrap.dedent(code) + "\n",
                            tuple(headings[k] for k in sorted(headings)), illustrative))
        i = j + 1
    return blocks


def shell_commands(block: Block) -> list[str]:
    """The commands of a shell or console block, continuation lines joined (backslash kept)."""
    commands: list[str] = []
    pending: list[str] | None = None
    for raw in block.code.splitlines():
        line = raw.rstrip()
        if pending is not None:
            if block.lang in CONSOLE_LANGS and line.startswith("> "):
                line = line[2:]
            pending.append(line)
            if not line.endswith("\\"):
                commands.append("\n".join(pending))
                pending = None
            continue
        if block.lang in CONSOLE_LANGS:
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending = [line]
        else:
            commands.append(line)
    if pending is not None:
        raise ValueError(f"{block.where}: command ends with a line continuation")
    return commands


# --------------------------------------------------------------------------- running examples

import contextlib  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
# `python`, `pip` and `axs` are this venv's. One intra-op thread per process unless set: under
# pytest -n 2 on two cores, processes that each spin a thread per core run several times slower
# (both runs of any comparison get the same setting, and it is recorded in the fingerprint).
EXAMPLE_ENV = {
    **os.environ,
    "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
}


def make_workspace(path: Path, tiles: Path) -> Path:
    """A working directory laid out as the docs assume: tiles/ (demo tiles), axs_lib/, scripts/, tools/."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tiles").symlink_to(tiles)
    for name in ("axs_lib", "scripts", "tools", "benchmarks"):
        (path / name).symlink_to(REPO / name)
    return path


def run_shell(script: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=EXAMPLE_ENV, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- commands in this process
#
# A documented command such as `axs compare runs/a runs/b` or `python scripts/train_stage1.py --seed 42`
# costs seconds in a new interpreter (importing torch, and torch.optim importing torch._dynamo) and a
# fraction of that here, where both are already imported: the same argument vector reaches the same
# `main` either way. So a command made only of plain words (no quotes, variables, globs, redirections,
# pipes, `&` or `;`) whose program is `axs` or `python <file>.py` runs in this process; anything else is
# a shell's job and runs in bash. Real processes stay where they are the point: a command sent to the
# background and killed is never plain. `CMD || echo ...` runs CMD here and, when it fails, the rest in
# bash with `$?` set to CMD's status.

PLAIN_WORD = re.compile(r"[\w@%+=:,./-]+\Z")
OR_ELSE = re.compile(r"(?P<first>[^|&;]+?)\s+\|\|\s+(?P<rest>.+)\Z", re.DOTALL)
# A line that leaves state for the next one (a variable, the directory, an option, a function):
# a block holding one runs as a single bash script, as written.
SHELL_STATE = re.compile(r"\s*(export\s|cd\s|pushd\s|source\s|\.\s|set\s|alias\s|function\s|[A-Za-z_]\w*=|\w+\s*\(\)\s*\{)")


def in_process_argv(command: str, cwd: Path) -> list[str] | None:
    """The argument vector of ``command`` when this process can run it as a shell would, else None."""
    words = command.replace("\\\n", " ").split()
    if not words or not all(PLAIN_WORD.match(word) for word in words):
        return None
    if words[0] == "axs":
        return words
    if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py") and (cwd / words[1]).is_file():
        return words
    return None


def run_in_process(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``axs ...`` through `axs_lib.cli.main`, or ``python FILE.py ...`` as ``__main__``, in ``cwd``.

    What a fresh interpreter would not carry over is undone afterwards: seeds, determinism flags,
    the environment, ``sys.path`` and ``sys.argv``. Python warnings show once per place in the code
    for each command, as they would in a new process.
    """
    from axs_lib.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_path, saved_argv = list(sys.path), sys.argv
    try:
        with (contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
              process_state_restored(), warnings.catch_warnings()):
            warnings.simplefilter("default")
            if argv[0] == "axs":
                code = main(argv[1:])
            else:
                sys.argv = argv[1:]
                code = _run_script(argv[1])
    finally:
        sys.path[:] = saved_path
        sys.argv = saved_argv
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _run_script(path: str) -> int:
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:  # the exit status the interpreter would have given
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def run_command(command: str, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """One command line of a shell block, in this process when it is plain, else in bash (after ``prelude``)."""
    argv = in_process_argv(command, cwd)
    if argv is not None:
        return run_in_process(argv, cwd)
    m = OR_ELSE.match(command)
    if m is not None and (argv := in_process_argv(m["first"], cwd)) is not None:
        first = run_in_process(argv, cwd)
        if first.returncode == 0:
            return first
        rest = run_shell(f"{prelude}(exit {first.returncode}) || {m['rest']}\n", cwd)
        return subprocess.CompletedProcess(command, rest.returncode, first.stdout + rest.stdout, first.stderr + rest.stderr)
    return run_shell(f"{prelude}{command}\n", cwd)


def needs_one_shell(commands: list[str]) -> bool:
    """Whether a block's lines share shell state, so that they must run as one bash script."""
    return any(SHELL_STATE.match(command) for command in commands)


def exec_python(code: str, where: str, namespace: dict, cwd: Path) -> tuple[str, list[str]]:
    """exec ``code`` with cwd ``cwd``; return its stdout and the messages of the warnings it raised."""
    out = io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, where, "exec"), namespace)
    return out.getvalue(), [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]


@contextlib.contextmanager
def process_state_restored():
    """Undo what an executed example does to this process: seeds, determinism flags, environment."""
    import torch

    from axs_lib.reproducibility import get_seed_state, restore_seed_state

    state = get_seed_state()
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    env = dict(os.environ)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2], flags[3]
        restore_seed_state({k: v for k, v in state.items() if k != "cuda_rng_state"})
        os.environ.clear()
        os.environ.update(env)
