"""The layout a newcomer relies on: no import cycles, every module in ARCHITECTURE.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "sf_lifecycle"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import that runs (module level or inside a function), not `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at run time."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                base = ".".join(p for p in (base, node.module or "") if p)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (`[a, b, ..., a]`), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_the_graph_sees_the_imports_that_run() -> None:
    graph = import_graph()
    assert "sf_lifecycle._middleware" in graph["sf_lifecycle._lifecycle"]
    assert "sf_lifecycle._health" in graph["sf_lifecycle._middleware"]
    # Imports for annotations only do not run, so they are no edge.
    assert "sf_lifecycle._lifecycle" not in graph["sf_lifecycle._health"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_itself_back() -> None:
    """health -> lifecycle -> middleware -> health was one (through an import inside
    `Lifecycle.install`, which counts: it runs)."""
    assert find_cycle(import_graph()) is None


ARCHITECTURE = SRC.parent / "ARCHITECTURE.md"


def module_table() -> list[str]:
    """The first column of ARCHITECTURE.md's module table, in order."""
    rows = []
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `([\w/]+\.py)` \|", line)
        if m:
            rows.append(m.group(1))
    return rows


def test_architecture_lists_every_module_once() -> None:
    """A newcomer finds each module in the table; a module added without a row fails here."""
    modules = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))
    rows = module_table()
    assert sorted(rows) == modules
    assert len(set(rows)) == len(rows)


def data_path_steps() -> list[str]:
    """The module of each step of ARCHITECTURE.md's two data-path diagrams, in order."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## The two data paths", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^  [├└]─ (\w+) ", section, re.M)


def test_the_data_paths_name_modules_that_exist() -> None:
    """A newcomer follows the diagrams into the code: a renamed or split module must not leave
    a step pointing nowhere."""
    steps = data_path_steps()
    assert steps[0] == "_middleware"  # the write path starts at the request
    assert steps.index("_writer") < steps.index("_runner")  # then the shutdown
    assert steps[-1] == "_runner"  # which ends with the exit code
    assert sorted(set(steps) - {p.stem for p in PACKAGE.glob("*.py")}) == []
