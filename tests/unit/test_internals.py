"""The list of private Lightning/torch internals (lightning_pbt/plugin/internals.py) is complete, current, and true
for the installed Lightning: a release that moved one fails here by name (``make test-versions``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lightning_pbt.plugin.internals import INTERNALS, check

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_pbt"
PRIVATE = re.compile(r"^_[a-z][a-z0-9_]*[a-z0-9]$")  # _name, not __dunder__
STDLIB = {"_exit"}  # os._exit


def _sources() -> dict[str, ast.AST]:
    return {
        str(path.relative_to(PACKAGE)): ast.parse(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "plugin" / "internals.py"
    }


def _ours(trees: dict[str, ast.AST]) -> set[str]:
    """Private names lightning_pbt defines itself: functions, classes, variables, its own attributes, modules."""
    names = {path.stem for path in PACKAGE.rglob("*.py")}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and getattr(node.value, "id", "") == "self"
            ):
                names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[-1])
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def _private_uses(trees: dict[str, ast.AST]) -> dict[str, set[str]]:
    """Private attribute names read or written (``x._name``, ``getattr(x, "_name")``), by file."""
    uses: dict[str, set[str]] = {}
    for filename, tree in trees.items():
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and PRIVATE.match(node.attr):
                name = node.attr
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and PRIVATE.match(node.value):
                name = node.value
            if name:
                uses.setdefault(name, set()).add(filename)
    return uses


def test_every_private_name_used_from_lightning_or_torch_is_listed():
    trees = _sources()
    listed = {token for internal in INTERNALS for token in internal.tokens}
    ours = _ours(trees) | STDLIB  # once: in the comprehension's condition it walked every tree for every name
    foreign = {name: files for name, files in _private_uses(trees).items() if name not in ours}
    unlisted = {name: sorted(files) for name, files in foreign.items() if name not in listed}
    assert not unlisted, f"list these in lightning_pbt/plugin/internals.py (with the versions checked): {unlisted}"


def test_every_listed_name_is_still_used():
    uses = _private_uses(_sources())
    stale = [(internal.name, token) for internal in INTERNALS for token in internal.tokens if token not in uses]
    assert not stale, f"no longer used; remove from lightning_pbt/plugin/internals.py: {stale}"


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_the_installed_lightning_has_every_internal_we_use(package):
    assert check(package) == []
