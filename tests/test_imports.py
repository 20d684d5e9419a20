"""The import rules of the first-party packages (README, Architecture, "Imports"), read from the source with ``ast``.

1. No import cycle between first-party modules, counting the imports inside functions too (a lazy import only hides
   a cycle until the function runs).
2. At most ``MAX_LAZY`` first-party imports inside functions, each with a comment on its line (or the line above)
   saying why it must be lazy. Lazy imports of third-party packages (torch, onnx, tensorrt, onnxruntime, ...) are not
   counted: keeping heavy optional packages out of light commands is what lazy imports are for.
3. The modules in ``LIGHT`` import neither torch nor numpy nor onnx in a fresh interpreter (what the lazy imports
   that remain are for).

An edge goes to the module an import names, as Python resolves it: ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``. The parent packages Python runs before a submodule are not
edges (a package's ``__init__`` importing its own submodules is not a cycle). Imports under ``if TYPE_CHECKING:``
never run and are not edges. Imports by name at run time (``importlib.import_module``: the package's lazy
attributes in ``dfmpc_deploy/__init__.py``, optional packages through ``_deps.require``) are not seen. Run
``python tests/test_imports.py`` for the graph's numbers and the lazy imports.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dfmpc_deploy", "calib_free")
MAX_LAZY = 10


@dataclass(frozen=True)
class Import:
    """One first-party import statement's edge: ``source`` imports ``target`` (both dotted module names)."""
    source: str
    target: str
    line: int
    lazy: bool  # inside a function body
    comment: str  # the comment on the import's line, else on the line above ("" if none)


def _module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(tree: ast.AST):
    """Yield ``(node, lazy)`` for every import that can run (skipping ``if TYPE_CHECKING:`` bodies)."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, lazy = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
            continue
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend((child, lazy) for child in node.orelse)
            continue
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def _comment(lines: list[str], line: int) -> str:
    here = lines[line - 1]
    if "#" in here:
        return here.split("#", 1)[1].strip()
    above = lines[line - 2].strip() if line >= 2 else ""
    return above[1:].strip() if above.startswith("#") else ""


def first_party_imports() -> list[Import]:
    """Every first-party import edge in ``PACKAGES``."""
    files = _module_files()
    found = []
    for module, path in files.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, lazy in _walk_imports(ast.parse(source, filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in files else stem
                           for alias in node.names]
            for target in dict.fromkeys(targets):
                if target.split(".")[0] not in PACKAGES:
                    continue
                while target not in files:  # ``import a.b.c`` where c is a name: the edge goes to a.b
                    target = target.rpartition(".")[0]
                found.append(Import(module, target, node.lineno, lazy, _comment(lines, node.lineno)))
    return found


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself), sorted."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:  # Tarjan; the graph has ~100 nodes, recursion depth is no concern
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _describe(cycle: list[str], imports: list[Import]) -> str:
    members = set(cycle)
    edges = [f"  {imp.source}:{imp.line} -> {imp.target}{' (lazy)' if imp.lazy else ''}"
             for imp in imports if imp.source in members and imp.target in members]
    return "\n".join([" <-> ".join(cycle)] + sorted(edges))


def test_no_first_party_import_cycle():
    imports = first_party_imports()
    cycles = import_cycles(imports)
    assert not cycles, "import cycles (move the shared piece to a lower module):\n" + "\n".join(
        _describe(cycle, imports) for cycle in cycles)


def test_few_lazy_first_party_imports_each_with_its_reason():
    lazy = [imp for imp in first_party_imports() if imp.lazy]
    listing = "\n".join(f"  {imp.source}:{imp.line} -> {imp.target}  # {imp.comment}" for imp in lazy)
    assert len(lazy) <= MAX_LAZY, f"{len(lazy)} first-party imports inside functions (at most {MAX_LAZY}):\n{listing}"
    unexplained = [imp for imp in lazy if not imp.comment]
    assert not unexplained, "a first-party import inside a function needs a comment saying why it is lazy:\n" + \
        "\n".join(f"  {imp.source}:{imp.line} -> {imp.target}" for imp in unexplained)


def test_checker_sees_cycles_through_function_level_imports(tmp_path, monkeypatch):
    """The checker itself: a cycle closed by an import inside a function is found, a TYPE_CHECKING one is not."""
    package = tmp_path / "dfmpc_deploy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import x  # closes the circle\n    return x\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("dfmpc_deploy",))
    imports = first_party_imports()
    assert import_cycles(imports) == [["dfmpc_deploy.a", "dfmpc_deploy.b"]]
    lazy = [imp for imp in imports if imp.lazy]
    assert [(imp.source, imp.target, imp.comment) for imp in lazy] == [
        ("dfmpc_deploy.b", "dfmpc_deploy.a", "closes the circle")]
    assert not any(imp.source == "dfmpc_deploy.c" for imp in imports)


#: modules that import no heavy package (what the lazy imports above keep so): the package itself (its stages load
#: on first use), the report (read, render, validate reports without torch) and the sweep package (grids, store, pages;
#: a cell's build loads torch in the worker). ``dfmpc_deploy.cli`` is not among them: its ``build`` parser lists the
#: pass flags, which live on the pass classes.
LIGHT = ("dfmpc_deploy", "dfmpc_deploy.report", "dfmpc_deploy.sweep")
HEAVY = ("torch", "numpy", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx", "ray")


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_no_heavy_package(module):
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    heavy = sorted(name for name in out.stdout.split() if name.split(".")[0] in HEAVY)
    assert not heavy, f"import {module} loaded {heavy[:5]}"


if __name__ == "__main__":
    every = first_party_imports()
    lazy_ones = [imp for imp in every if imp.lazy]
    print(f"{len(every)} first-party import edges, {len(lazy_ones)} inside functions")
    for found_cycle in import_cycles(every):
        print("cycle:", _describe(found_cycle, every))
    for imp in lazy_ones:
        print(f"lazy {imp.source}:{imp.line} -> {imp.target}  # {imp.comment}")
