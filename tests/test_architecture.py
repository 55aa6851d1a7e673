"""Architecture guards: gradwatch's modules import each other without cycles, and the core without Lightning.

The import graph is read from the source with ``ast``, so it sees every import, wherever it stands: at
module level, inside functions (lazy imports still tie two modules together) and under
``if TYPE_CHECKING:`` (a type-only import is still a dependency). Relative imports are resolved, and
``from package import name`` counts as importing the submodule ``package.name`` when there is one,
else the package itself. A package's ``__init__`` running before its submodules is not an edge: the
graph is of what each module asks for.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Imports by which a module of the core would depend on a training framework.
FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")

#: Lazy framework imports (inside functions) the core had when this guard was written: ``(module, framework)``.
#: None: every framework adapter lives in ``integrations/``.
LAZY_FRAMEWORK_IMPORTS: frozenset[tuple[str, str]] = frozenset()

#: Module -> {imported module of the same package: line of its first import}.
Graph = dict[str, dict[str, int]]


def package_modules(root: Path, package: str, installed_as: str | None = None) -> dict[str, Path]:
    """Every module of ``package`` (a folder under ``root``), by dotted name; a package by its name.
    ``installed_as``: the name the folder is imported under (``integrations/`` is ``gradwatch.integrations``)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root / package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([installed_as or package, *parts])] = path
    return modules


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]) -> Iterator[str]:
    """The dotted names one import statement asks for, relative imports resolved."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        yield submodule if submodule in modules else base


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (``None``: not the package's)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, package: str, installed_as: str | None = None) -> Graph:
    """The import graph of ``package`` under ``root``: every import anywhere in a module, self-imports left out."""
    modules = package_modules(root, package, installed_as)
    graph: Graph = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in _imported_names(node, module, path.name == "__init__.py", modules):
                target = _owning_module(name, modules)
                if target is not None and target != module:
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe_cycle(graph: Graph, component: list[str]) -> str:
    """A shortest cycle through the component's first module, with the line of each import
    (``a -> b (line 3 of a) -> a (line 7 of b)``), then every other import within the component."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in graph[v]:
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                path.reverse()
                links = list(zip(path, [*path[1:], start], strict=True))
                hops = [f"{b} (line {graph[a][b]} of {a})" for a, b in links]
                others = [f"{a} -> {b} (line {line})" for a in component for b, line in sorted(graph[a].items())
                          if b in members and (a, b) not in links]
                return " -> ".join([start, *hops]) + "".join(f"\n    also {other}" for other in others)
            if w in members and w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"{component} is not a cycle of the graph")


# ----------------------------------------------------------------------------------------------
# gradwatch itself


@pytest.mark.parametrize(("folder", "installed_as"), [("gradwatch", None), ("integrations", "gradwatch.integrations")])
def test_no_import_cycles(folder: str, installed_as: str | None) -> None:
    graph = import_graph(ROOT, folder, installed_as)
    found = cycles(graph)
    assert not found, f"import cycles in {folder}/:\n" + "\n".join(describe_cycle(graph, c) for c in found)


def test_the_graph_sees_gradwatch_modules_and_their_imports() -> None:
    graph = import_graph(ROOT, "gradwatch")
    assert "gradwatch.models.registry" in graph["gradwatch.models"]
    assert "gradwatch.fixes.registry" in graph["gradwatch.models.case"]
    assert "gradwatch.tasks" in graph["gradwatch.models.recipe"]  # `from gradwatch import tasks`
    adapters = import_graph(ROOT, "integrations", "gradwatch.integrations")
    assert "gradwatch.integrations.lightning_distributed" in adapters["gradwatch.integrations.lightning_fixes"]


def _framework_imports(path: Path) -> Iterator[tuple[str, int, bool]]:
    """``(framework, line, lazy)`` for every framework import in a file; lazy: inside a function."""

    def walk(node: ast.AST, lazy: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
                names = [child.module]
            for name in names:
                if name.split(".")[0] in FRAMEWORKS:
                    yield name.split(".")[0], child.lineno, lazy
            yield from walk(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    yield from walk(ast.parse(path.read_text(), filename=str(path)), False)


def test_the_core_imports_no_training_framework_at_module_level() -> None:
    """``gradwatch/`` is torch-only; Lightning and Hugging Face adapters live in ``integrations/``."""
    eager, lazy = [], set()
    for module, path in package_modules(ROOT, "gradwatch").items():
        for framework, line, is_lazy in _framework_imports(path):
            if is_lazy:
                lazy.add((module, framework))
            else:
                eager.append(f"{module} (line {line}) imports {framework}")
    assert not eager, "the core must not import a training framework at module level:\n" + "\n".join(eager)
    unlisted = sorted(lazy - LAZY_FRAMEWORK_IMPORTS)
    assert not unlisted, f"new lazy framework imports in the core (move them to integrations/): {unlisted}"


# ----------------------------------------------------------------------------------------------
# the graph builder, on small synthetic packages


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


def test_a_known_cycle_is_found_through_relative_and_lazy_imports(tmp_path: Path) -> None:
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def late():\n    from pkg.c import thing\n",
        "pkg/c.py": "import pkg.a\nimport pkg.b\nthing = 1\n",
        "pkg/leaf.py": "import os\nimport pkg\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b": 1}
    assert graph["pkg.b"] == {"pkg.c": 2}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert describe_cycle(graph, ["pkg.a", "pkg.b", "pkg.c"]) == (
        "pkg.a -> pkg.b (line 1 of pkg.a) -> pkg.c (line 2 of pkg.b) -> pkg.a (line 1 of pkg.c)"
        "\n    also pkg.c -> pkg.b (line 2)"
    )


def test_a_type_checking_import_counts(tmp_path: Path) -> None:
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/model.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from pkg.view import View
            """,
        "pkg/view.py": "from pkg.model import Model\n",
    })
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg.model", "pkg.view"]]


def test_a_name_from_a_package_is_the_submodule_if_there_is_one_else_the_package(tmp_path: Path) -> None:
    _write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.sub import helper\n",
        "pkg/sub/__init__.py": "from .tool import helper\n",
        "pkg/sub/tool.py": "def helper(): ...\n",
        "pkg/user.py": "from pkg.sub import tool, helper\nfrom .sub.tool import helper as h\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg"] == {"pkg.sub": 1}
    assert graph["pkg.sub"] == {"pkg.sub.tool": 1}
    assert graph["pkg.user"] == {"pkg.sub.tool": 1, "pkg.sub": 1}


def test_an_acyclic_package_passes(tmp_path: Path) -> None:
    _write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.top import run\n",
        "pkg/top.py": "from pkg import base\nfrom pkg.base import CONSTANT\n\ndef run(): ...\n",
        "pkg/base.py": "import os\nCONSTANT = 1\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.top": 1}, "pkg.base": {}, "pkg.top": {"pkg.base": 1}}
    assert cycles(graph) == []


def test_framework_imports_are_told_apart_by_where_they_stand(tmp_path: Path) -> None:
    _write_package(tmp_path, {"core.py": """
        from typing import TYPE_CHECKING
        import torch
        import lightning.pytorch as pl
        if TYPE_CHECKING:
            from transformers import Trainer

        def adapter():
            from accelerate import Accelerator
        """})
    assert list(_framework_imports(tmp_path / "core.py")) == [
        ("lightning", 4, False), ("transformers", 6, False), ("accelerate", 9, True),
    ]


# ----------------------------------------------------------------------------------------------
# the newcomer's map


def test_every_module_the_architecture_map_names_exists() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:gradwatch|integrations)/[\w/]*?(?:\.py|/))`", text))
    assert len(named) >= 40, f"the map names only {len(named)} modules: the pattern no longer matches it"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {missing}"


def test_the_architecture_map_names_every_module_of_the_core_and_the_integrations() -> None:
    """A new module gets its line in the map (a package may be named as a whole, e.g. ``gradwatch/fixes/``)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:gradwatch|integrations)/[\w/]*?(?:\.py|/))`", text))
    unnamed = []
    for path in sorted([*(ROOT / "gradwatch").rglob("*.py"), *(ROOT / "integrations").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if path.name in ("__init__.py", "__main__.py") or rel in named:
            continue
        if any(rel.startswith(p) for p in named if p.endswith("/")):
            continue
        unnamed.append(rel)
    assert not unnamed, f"modules missing from docs/ARCHITECTURE.md: {unnamed}"
