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
