"""Architecture rules of the package: no import cycle anywhere in ``kvcache_plugins``, no source file over 450 lines.

The import graph is read from the source with :mod:`ast`, never by importing: every ``import`` and ``from ...
import`` statement counts, at module level, inside functions (lazy imports), under ``if TYPE_CHECKING:`` and in
``try`` blocks alike, relative or absolute. An edge goes from a module to the module it names:

* ``import a.b`` and ``from a.b import name`` -> ``a.b`` (``a/b.py`` or ``a/b/__init__.py``);
* ``from a import b`` where ``a/b`` is a module -> ``a.b`` (the submodule, not the package ``a``).

Only edges inside ``kvcache_plugins`` are kept. A cycle is a strongly connected component of more than one module,
or a module importing itself. Run ``python tests/test_architecture.py`` to print the cycles and the long files.

Layering: ``layers/`` and ``selection/`` never import each other, and neither imports ``caches/`` (issue 28).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvcache_plugins"
MAX_LINES = 450

def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module below ``package`` (a package is named by its ``__init__.py``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute name ``from <node.module> import ...`` refers to, seen from ``module``."""
    if node.level == 0:
        return node.module or ""
    # level 1 is the module's own package: the module itself when it is a package's __init__
    base = module.split(".")
    drop = node.level - 1 if is_package else node.level
    if drop >= len(base):
        raise ValueError(f"{module}: relative import beyond the top-level package (level {node.level})")
    base = base[: len(base) - drop]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports anywhere in its source (see the module docstring)."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, node, is_package)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            for target in targets:
                # ``import a.b.c`` of a name that is not a module (or not ours): its nearest module of ours
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module, and modules importing themselves (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

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
            if len(component) > 1 or v in graph[v]:
                found.append(frozenset(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def describe(component: frozenset[str], graph: dict[str, set[str]]) -> str:
    """The component's modules and the edges between them, for a failure message."""
    edges = [f"{a} -> {b}" for a in sorted(component) for b in sorted(graph[a] & component)]
    return "{" + ", ".join(sorted(component)) + "}: " + "; ".join(edges)


def long_files(package: Path, limit: int = MAX_LINES) -> dict[str, int]:
    """Source files (paths relative to the repository) of more than ``limit`` lines, with their line counts."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > limit:
            out[path.relative_to(package.parent).as_posix()] = lines
    return out


# -- the checker on packages with known cycles ----------------------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "pkg"


def test_graph_reads_every_import_form(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "from .a import f\n",
        "a.py": "import os\nfrom . import b\nfrom .sub import c\n",
        "b.py": "def g():\n    from .sub.c import h\n    import pkg.d\n",
        "d.py": "try:\n    from pkg.sub import c as cc\nexcept ImportError:\n    pass\n"
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
        "sub/__init__.py": "from .c import h\nfrom ..b import g\n",
        "sub/c.py": "from .. import d\nfrom ..missing_name import x\n",
    })
    graph = import_graph(pkg)
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b", "pkg.sub.c"},
        "pkg.b": {"pkg.sub.c", "pkg.d"},  # both function-level
        "pkg.d": {"pkg.sub.c", "pkg.a"},  # inside try and TYPE_CHECKING
        "pkg.sub": {"pkg.sub.c", "pkg.b"},  # an __init__'s level 1 is its own package
        "pkg.sub.c": {"pkg.d", "pkg"},  # an unknown submodule falls back on its package
    }


def test_cycles_finds_components_and_self_loops(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def lazy():\n    from .a import x\n",  # a lazy import closes the circle
        "c.py": "from .c import y\n",
        "d.py": "from . import a\n",  # imports into a cycle: not part of it
    })
    assert sorted(map(sorted, cycles(import_graph(pkg)))) == [["pkg.a", "pkg.b"], ["pkg.c"]]


def test_cycles_sees_long_indirect_cycles():
    graph = {f"m{i}": {f"m{i + 1}"} for i in range(50)}
    graph["m50"] = {"m0"}
    graph["x"] = {"m3"}
    assert cycles(graph) == [frozenset(f"m{i}" for i in range(51))]
    del graph["m50"]
    graph["m49"] = set()
    assert cycles(graph) == []


# -- the package ----------------------------------------------------------------------------------------------------


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the reader finds the package's imports
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(c, graph) for c in found)


def test_no_source_file_over_450_lines():
    found = long_files(PACKAGE)
    assert not found, f"source files over {MAX_LINES} lines: {found}"


def test_storage_and_policy_never_import_each_other_nor_the_caches():
    graph = import_graph(PACKAGE)
    rules = {"layers": ("selection", "caches"), "selection": ("layers", "caches"), "persist": ("caches", "layers")}
    broken = [
        f"{a} -> {b}" for a, targets in graph.items() for b in targets for folder, banned in rules.items()
        if a.startswith(f"kvcache_plugins.{folder}") and any(b.startswith(f"kvcache_plugins.{x}") for x in banned)
    ]
    assert not broken, broken


if __name__ == "__main__":
    graph = import_graph(PACKAGE)
    for component in cycles(graph):
        print("cycle", describe(component, graph))
    for path, n in long_files(PACKAGE).items():
        print(f"long file {path}: {n} lines")
