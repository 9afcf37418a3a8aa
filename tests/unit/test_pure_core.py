"""The algorithm core stays pure: stdlib + numpy (+ scipy for PB2's GP), no torch / Lightning, ``__all__``.

Checked statically (by parsing the sources) because importing ``lightning_pbt`` itself runs the
package ``__init__``, which brings in the Lightning glue.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_pbt" / "algorithm"
CORE = tuple(sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"))
ALLOWED_THIRD_PARTY = {"numpy"}
EXTRA_THIRD_PARTY = {
    "pb2": {"scipy"},  # its linear algebra and acquisition optimisation
    "run_reading": {"omegaconf"},  # a finished Hydra run's .hydra/config.yaml, read lazily
}


def imported_modules(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("name", CORE)
def test_core_module_imports_only_stdlib_numpy_and_core(name: str) -> None:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    allowed = ALLOWED_THIRD_PARTY | EXTRA_THIRD_PARTY.get(name, set())
    for module in imported_modules(tree):
        top = module.split(".")[0]
        if top == "lightning_pbt":
            assert module.split(".")[1:2] == ["algorithm"], f"{name}.py imports {module}"
        else:
            assert top in sys.stdlib_module_names or top in allowed, f"{name}.py imports {module}"


@pytest.mark.parametrize("name", CORE)
def test_core_module_declares_all(name: str) -> None:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    exported = [
        node
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
    ]
    assert exported, f"{name}.py has no __all__"
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
    }
    names = ast.literal_eval(exported[0].value)
    assert set(names) <= defined, f"{name}.__all__ names undefined {sorted(set(names) - defined)}"
