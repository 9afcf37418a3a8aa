"""The package's shape stays readable.

The layers (tools -> plugin -> distributed -> algorithm, each importing only its own layer or those
below) and the purity of the algorithm are import-linter contracts in ``pyproject.toml``, checked by
``lint-imports`` in ``make test``; a test here runs them too, so that ``pytest`` alone catches a broken
contract. What import-linter does not check stays here: no import circle between any two modules of
lightning_pbt or bench (grimp's graph, including imports inside functions), and no module longer than 500
lines, no class longer than 300, no function longer than 80 (static, ``ast``).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "lightning_pbt"
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 500, 300, 80
LAYERS = ("algorithm", "distributed", "plugin", "tools")  # bottom to top


def test_the_import_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint_imports, "import-linter is not installed (pip install -e '.[test]')"
    proc = subprocess.run([lint_imports], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_cycle_finder_finds_a_circle():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph, set(graph.modules)) == [["p.a", "p.b", "p.c"]]


@pytest.mark.parametrize("package", ["lightning_pbt", "bench"])
def test_no_import_circle(package: str):
    sys.path.insert(0, str(REPO))
    try:
        graph = grimp.build_graph(package, cache_dir=None)
    finally:
        sys.path.remove(str(REPO))
    assert _cycles(graph, set(graph.modules)) == []


def test_every_layer_is_a_subpackage_with_a_docstring_saying_what_it_may_import():
    for layer in LAYERS:
        init = PACKAGE / layer / "__init__.py"
        docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "may import" in docstring, f"{init} says nothing of what the layer may import"
    # __main__.py is the public command `python -m lightning_pbt`, like report/__main__.py: it only calls tools/.
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert flat == [], f"modules belong in a layer subpackage, not at the top: {flat}"


def test_no_module_over_500_lines_no_class_over_300_and_no_function_over_80():
    limits = {ast.ClassDef: MAX_CLASS_LINES, ast.FunctionDef: MAX_FUNCTION_LINES, ast.AsyncFunctionDef: 80}
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            limit = limits.get(type(node))
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not too_long, (
        f"longer than {MAX_MODULE_LINES} (module) / {MAX_CLASS_LINES} (class) / {MAX_FUNCTION_LINES} (function) "
        f"lines: {too_long}"
    )
