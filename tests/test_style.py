"""The tree stays ruff-clean (lint and format) and free of import cycles (the house style)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "imder_sweep"


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args: list[str]) -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` under `root`."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imported(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]
) -> Iterator[str]:
    """The package's modules one import statement of `module` loads: `from a.b import c` is
    module `a.b.c` if that is a module, else `a.b`; relative imports resolve against the
    package; names outside the package are left out."""
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            anchor = package[: len(package) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        wanted = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names
        ]
    for name in wanted:
        while name and name not in modules:  # `import pkg.mod.attr` style: its module
            name = name.rpartition(".")[0]
        if name:
            yield name


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body: at the top, inside
    functions (lazy imports still close a cycle when they run) and under TYPE_CHECKING (a
    layering that needs a cycle for its types has one)."""
    modules = _modules(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[name] |= set(_imported(node, name, is_package, set(modules))) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module
    (Tarjan's algorithm), each listed from its smallest name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, c) for c in components]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself (breadth first)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is no cycle")


def test_no_import_cycle() -> None:
    found = cycles(import_graph(ROOT, PACKAGE))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_cycle_check_sees_lazy_imports_and_imported_modules(tmp_path: Path) -> None:
    """The check itself, on a made-up package: a cycle closed by an import inside a function,
    through `from pkg.sub import module`, and a relative import; a plain name is no module."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.sub import b\nimport json\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def f():\n    from ..c import VALUE\n    return VALUE\n",
        "pkg/c.py": "VALUE = 1\ndef g():\n    import pkg.a\n",
        "pkg/d.py": "from pkg import c\nfrom pkg.c import VALUE\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.d"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


MAX_FUNCTION_LINES = 60
# Functions allowed to be longer, each with the reason (none today).
LONG_FUNCTIONS: dict[str, str] = {}


def long_functions(root: Path, package: str, limit: int) -> dict[str, int]:
    """`module:qualified.name` -> lines (decorators excluded) of every function over `limit`."""
    found = {}
    for name, path in _modules(root, package).items():
        tree = ast.parse(path.read_text(), str(path))
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    qual = f"{prefix}{child.name}"
                    stack.append((child, qual + "."))
                    lines = child.end_lineno - child.lineno + 1
                    if not isinstance(child, ast.ClassDef) and lines > limit:
                        found[f"{name}:{qual}"] = lines
    return found


def test_no_function_over_60_lines() -> None:
    """The house style's small units: a longer function is split along its concerns, or listed
    in LONG_FUNCTIONS with the reason."""
    found = long_functions(ROOT, PACKAGE, MAX_FUNCTION_LINES)
    unexplained = {k: v for k, v in found.items() if k not in LONG_FUNCTIONS}
    assert not unexplained, f"functions over {MAX_FUNCTION_LINES} lines: {unexplained}"


def test_long_function_check_counts_methods_and_nested_functions(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "m.py").write_text(
        f"class C:\n    def short(self):\n        return 1\n\n    def long(self):\n"
        f"    {body.replace(chr(10), chr(10) + '    ')}\n\n\ndef outer():\n    def inner():\n"
        f"    {body.replace(chr(10), chr(10) + '    ')}\n    return inner\n"
    )
    found = long_functions(tmp_path, "pkg", 60)
    assert found == {"pkg.m:C.long": 62, "pkg.m:outer": 64, "pkg.m:outer.inner": 62}
