"""The layers of docs/architecture.md, checked against the code: the import graph has no cycle but
the documented one, and the README's layout and the architecture page's layer table name every
module (a module nobody can find has no home)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "axs_lib"
# `python axs_lib/reproducibility.py --verify` hands over to `axs verify`: the one import that goes up
DOCUMENTED_CYCLES = [{"axs_lib.reproducibility", "axs_lib.verify"}]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside a function."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t not in (name, "axs_lib")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_late_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_two_modules_import_each_other_but_the_documented_pair():
    graph = import_graph()
    assert "axs_lib.packed" not in graph["axs_lib.tiles"]  # tiles asks a tile store; the store imports tiles
    assert cycles(graph) == DOCUMENTED_CYCLES


def _top_level() -> list[str]:
    """``errors``, ``tiles``, ... and the subpackages as ``stage1/``."""
    files = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    packages = [f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    return sorted(files + packages)


def test_the_readme_layout_lists_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[layout.index("```") + 3:]
    layout = layout[:layout.index("```")]
    missing = [m for m in [*_top_level(), "__init__"]
               if not re.search(rf"(^|[\s,/]){re.escape(m if m.endswith('/') else m + '.py')}", layout, re.M)]
    assert not missing, f"README.md's layout section does not name {missing}"


def test_the_layer_table_places_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = "\n".join(line.split("|")[2] for line in text.splitlines() if line.startswith("| ") and line.count("|") >= 4)
    missing = [m for m in _top_level() if f"`{m}`" not in table]
    assert not missing, f"docs/architecture.md's layer table does not place {missing}"
