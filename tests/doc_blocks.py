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
