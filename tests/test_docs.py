"""Our documentation, executed: a stale example fails the build.

For ``docs/*.md`` and ``README.md``:

* Every ```` ```python ```` block and every command of every ```` ```bash ````/``sh``/``shell``
  block and ```` ```console ```` block (its ``$ `` lines) is executed, in document order, in a
  fresh working directory per document that holds ``tiles/`` (the six real demo tiles, shared by
  the whole session) and links to ``axs_lib/``, ``scripts/``, ``tools/`` and ``benchmarks/``.
  Later blocks see what earlier ones wrote (a run trained in one block is compared in the next).
  A shell block runs line by line with ``set -e -o pipefail`` semantics (a failing command, or a
  failing part of a pipe, fails the block; write ``cmd || echo ...`` for a command that is meant
  to fail): a plain ``axs ...`` or ``python FILE.py ...`` line runs in this process, any other line
  in bash, and a block whose lines share shell state (a variable, ``cd``, ``export``) as one bash
  script (``doc_blocks.run_command``). Python blocks share one namespace per document and run in
  this process (state they change is restored).
* A block whose fence is preceded by an ``<!-- illustrative ... -->`` comment is not executed,
  only parsed: ``compile()`` for Python, ``bash -n`` for shell.
* Blocks in other languages (``text``, untagged) are prose, not checked.
* A non-illustrative block that would run the test suite itself (``make test``, ``pytest``, ...)
  fails with a request to mark it illustrative, instead of recursing.

`test_every_help_shows_an_example` walks every ``axs`` subcommand (``axs tiles <action>`` and
``axs train stage1`` included): each ``--help`` exits 0 and shows an example, and every example
command line in a help text parses with the real argument parser.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from axs_lib.cli import build_parser, main
from doc_blocks import (
    REPO,
    Block,
    exec_python,
    in_process_argv,
    make_workspace,
    needs_one_shell,
    parse_blocks,
    process_state_restored,
    run_command,
    run_shell,
    shell_commands,
)

DOCS = sorted((REPO / "docs").glob("*.md")) + ([REPO / "README.md"] if (REPO / "README.md").exists() else [])
PRELUDE = "set -e -o pipefail\n"  # a failing command, or a failing part of a pipe, fails its block
RECURSIVE = re.compile(r"(^|[\s;&|(])(make\s+(test|soak|bench)|pytest|py\.test|python\s+-m\s+pytest)\b")


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def executable_blocks(path: Path) -> list[Block]:
    return [b for b in parse_blocks(path) if (b.is_python or b.is_shell) and not b.illustrative]


def shell_script(block: Block) -> str:
    commands = shell_commands(block)
    for command in commands:
        if RECURSIVE.search(command):
            pytest.fail(f"{block.where}: `{command}` would run the test suite from inside it; "
                        "put <!-- illustrative --> on the line before the fence")
    return PRELUDE + "\n".join(commands) + "\n"


def run_block(block: Block, namespace: dict, work: Path) -> str:
    """Execute one block; return what it printed. Fails the test, naming the block, when it fails."""
    if block.is_python:
        try:
            out, _ = exec_python(block.code, block.where, namespace, work)
        except Exception as exc:  # noqa: BLE001 - report any failure with the block's place
            raise AssertionError(f"{block.where}: python block failed: {type(exc).__name__}: {exc}\n{block.code}") from exc
        return out
    script = shell_script(block)
    commands = shell_commands(block)
    if needs_one_shell(commands):
        runs = [(script, run_shell(script, work))]
    else:  # line by line, as `set -e` would: plain axs/python lines in this process (see doc_blocks)
        runs = []
        for command in commands:
            runs.append((command, run_command(command, work, prelude=PRELUDE)))
            if runs[-1][1].returncode != 0:
                break
    what, proc = runs[-1]
    assert proc.returncode == 0, (
        f"{block.where}: shell block exited {proc.returncode}\n--- command\n{what}\n--- stdout\n{proc.stdout[-4000:]}"
        f"--- stderr\n{proc.stderr[-4000:]}")
    return "".join(p.stdout for _, p in runs)


# --------------------------------------------------------------------------- the docs' examples


def test_there_are_docs_to_test():
    names = {p.name for p in DOCS}
    assert {"reproducibility.md", "early_stopping.md", "metadata_handling.md"} <= names, names
    assert any(executable_blocks(REPO / "docs" / "reproducibility.md"))


RUNNABLE = [doc for doc in DOCS if executable_blocks(doc)]  # docs of only illustrative blocks are parsed below


@pytest.mark.parametrize("doc", RUNNABLE, ids=doc_id)
def test_doc_examples_run(doc, demo_tiles, tmp_path):
    blocks = executable_blocks(doc)
    work = make_workspace(tmp_path / "work", demo_tiles)
    namespace: dict = {"__name__": "__doc__"}
    with process_state_restored():
        for block in blocks:
            run_block(block, namespace, work)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_illustrative_blocks_parse(doc):
    for block in parse_blocks(doc):
        if not block.illustrative:
            continue
        if block.is_python:
            compile(block.code, block.where, "exec")
        elif block.is_shell:
            proc = subprocess.run(["bash", "-n"], input="\n".join(shell_commands(block)) + "\n",
                                  capture_output=True, text=True)
            assert proc.returncode == 0, f"{block.where}: {proc.stderr}"


def test_a_stale_example_fails(tmp_path, demo_tiles):
    """The runner is not a rubber stamp: a python block or a command that no longer works fails it."""
    doc = tmp_path / "stale.md"
    doc.write_text(
        "```bash\naxs compare --no-such-flag a b\n```\n\n"
        "```python\nfrom axs_lib.reproducibility import no_such_function\n```\n\n"
        "```bash\nfalse | true\n```\n\n"
        "<!-- illustrative -->\n```bash\nif then fi\n```\n"
    )
    work = make_workspace(tmp_path / "work", demo_tiles)
    blocks = parse_blocks(doc)
    assert [b.illustrative for b in blocks] == [False, False, False, True]
    for block in blocks[:3]:
        with pytest.raises(AssertionError, match=re.escape(block.where)):
            run_block(block, {}, work)
    proc = subprocess.run(["bash", "-n"], input=blocks[3].code, capture_output=True, text=True)
    assert proc.returncode != 0


def test_recursive_commands_are_refused(tmp_path):
    doc = tmp_path / "r.md"
    doc.write_text("```bash\nmake test\n```\n")
    with pytest.raises(pytest.fail.Exception, match="illustrative"):
        shell_script(parse_blocks(doc)[0])


def test_block_parser_reads_indented_fences_console_and_continuations(tmp_path):
    doc = tmp_path / "p.md"
    doc.write_text(
        "## A\n\n1. item\n   ```python\n   x = 1\n   ```\n\n"
        "```console\n$ axs env \\\n>   --json\n{ output }\n$ echo hi\nhi\n```\n\n"
        "<!-- illustrative: example output -->\n\n```bash\n# comment\nfoo \\\n  bar\n```\n"
    )
    py, console, sh = parse_blocks(doc)
    assert (py.lang, py.code, py.headings, py.line) == ("python", "x = 1\n", ("A",), 4)
    assert shell_commands(console) == ["axs env \\\n  --json", "echo hi"]
    assert sh.illustrative and shell_commands(sh) == ["foo \\\n  bar"]


# --------------------------------------------------------------------------- --help


def _subcommands(parser, path=()):
    """(path, parser) for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and action.__class__.__name__ == "_SubParsersAction":
            for name, sub in choices.items():
                yield from _subcommands(sub, (*path, name))


HELP_PATHS = [path for path, _ in _subcommands(build_parser())]


def test_help_walk_finds_every_subcommand():
    names = {" ".join(p) for p in HELP_PATHS}
    assert {"", "verify", "env", "compare", "inspect", "runs", "tiles", "train", "train stage1",
            "tiles validate", "tiles summary", "tiles demo", "tiles synth", "tiles from-bigearthnet"} <= names, names


@pytest.mark.parametrize("path", HELP_PATHS, ids=lambda p: "axs " + " ".join(p) if p else "axs")
def test_every_help_shows_an_example(path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*path, "--help"])
    text = out.getvalue()
    assert code == 0, text
    assert "example" in text.lower(), f"`axs {' '.join(path)} --help` shows no example:\n{text}"
    examples = [line.strip() for line in text.splitlines() if line.strip().startswith("axs ")]
    assert examples, f"`axs {' '.join(path)} --help` has no `axs ...` example line"
    for line in examples:
        lexer = shlex.shlex(re.split(r"\s{2,}", line)[0], posix=True, punctuation_chars=True)  # drop "   description"
        lexer.whitespace_split = True
        tokens = list(lexer)
        argv = tokens[1:next((i for i, t in enumerate(tokens) if set(t) <= set("|&;<>")), len(tokens))]
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"example in `axs {' '.join(path)} --help` does not parse ({exc.code}): {line}")


def test_axs_console_script_help():
    proc = subprocess.run([str(Path(REPO / ".venv" / "bin" / "axs")) if (REPO / ".venv/bin/axs").exists() else "axs", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "examples:" in proc.stdout, proc.stderr


# --------------------------------------------------------------------------- the command runner


@pytest.mark.parametrize("command, plain", [
    ("axs compare runs/a runs/b", True),
    ("python scripts/train_stage1.py --seed 42 \\\n  --steps 2", True),
    ("python tools/no_such_tool.py a", False),  # not a file: the shell reports it
    ("python -c 'print(1)'", False),
    ("axs compare runs/a runs/b > out.txt", False),
    ("axs compare runs/*", False),
    ("axs env | head -1", False),
    ("axs train stage1 --seed $SEED", False),
    ("OMP_NUM_THREADS=2 axs env", False),
    ("axs env & wait", False),
    ("axs env; axs env", False),
    ("axs compare \"runs/a b\" runs/c", False),
    ("sha256sum runs/a/checkpoints/x.pt", False),
])
def test_only_plain_axs_and_python_script_lines_run_in_this_process(command, plain):
    assert (in_process_argv(command, REPO) is not None) is plain


def test_a_line_in_this_process_gives_the_exit_status_output_and_leaves_no_trace(tmp_path):
    (tmp_path / "script.py").write_text(
        "import sys\nsys.path.insert(0, 'elsewhere')\nprint('args', sys.argv[1:])\n"
        "print('to stderr', file=sys.stderr)\nsys.exit(int(sys.argv[1]))\n")
    path, argv = list(sys.path), sys.argv
    ok = run_command("python script.py 0 x", tmp_path)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "args ['0', 'x']\n", "to stderr\n")
    assert run_command("python script.py 3", tmp_path).returncode == 3
    assert (sys.path, sys.argv) == (path, argv)
    assert run_command("axs compare --no-such-flag a b", tmp_path).returncode == 2


def test_or_else_gets_the_status_of_the_command_run_in_this_process(tmp_path):
    (tmp_path / "script.py").write_text("import sys\nsys.exit(int(sys.argv[1]))\n")
    failed = run_command('python script.py 4 || echo "refused with exit status $?"', tmp_path)
    assert (failed.returncode, failed.stdout) == (0, "refused with exit status 4\n")
    passed = run_command('python script.py 0 || echo "not printed"', tmp_path)
    assert (passed.returncode, passed.stdout) == (0, "")


def test_lines_that_share_shell_state_run_as_one_script(tmp_path):
    assert needs_one_shell(["export SEED=3", "axs env"])
    assert needs_one_shell(["cd runs", "axs runs a"])
    assert not needs_one_shell(["axs env", "axs train stage1 --seed 1 & pid=$!; kill $pid"])
    doc = tmp_path / "d.md"
    doc.write_text("```bash\nN=7\necho $N\n```\n")
    assert run_block(parse_blocks(doc)[0], {}, tmp_path) == "7\n"
