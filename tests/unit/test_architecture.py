"""The package's shape stays readable: every module belongs to one layer (pure core, apps' helpers,
transport, protocol, Lightning glue), imports only from its own layer or the ones below, only the glue
imports Lightning, and no class is longer than 300 lines nor any function longer than 80. Static (``ast``).

The apps' helpers (Hydra configs, reading a run) sit just above the pure core: they need neither torch
nor a process group, and the glue uses them (``PBTReplay`` reads a run with the report's functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_pbt"
LAYERS = {  # bottom to top; a module imports lightning_pbt modules of its own layer or below
    "pure core": ("space", "exploit", "explore", "pb2", "scheduler", "lineage", "comparable", "topology", "settings"),
    "apps' helpers": ("hydra_configs", "report"),
    "transport": ("transfer", "distributed", "serving"),
    "protocol": ("apply", "ready_steps", "resume", "console"),
    "Lightning glue": ("_lightning", "outputs", "strategy", "callback", "replay", "internals"),
}
LIGHTNING = ("pytorch_lightning", "lightning")
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 300, 80


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def _layer(module: str) -> int:
    return next(index for index, members in enumerate(LAYERS.values()) if module in members)


def _imports(tree: ast.Module) -> set[tuple[str, int]]:
    """(module, level) of every import, including those inside functions."""
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add((node.module or "", node.level))
            if node.module in (None, "lightning_pbt"):  # from . import x / from lightning_pbt.distributed import transfer
                found.update((f"lightning_pbt.{alias.name}", 0) for alias in node.names)
    return found


def test_every_module_has_one_layer():
    placed = [module for members in LAYERS.values() for module in members]
    assert len(placed) == len(set(placed))
    assert sorted(placed) == sorted(_modules()), "put the new module in a layer (and in code-organisation.md)"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_modules_import_only_their_layer_or_below_and_only_the_glue_imports_lightning(module: str):
    modules = _modules()
    for name, level in _imports(modules[module]):
        if level:  # relative: .strategy, ._lightning
            target = name.split(".")[0]
        elif name.startswith("lightning_pbt."):
            target = name.split(".")[1]
        else:
            target = ""
            if name.split(".")[0] in LIGHTNING:
                assert module in LAYERS["Lightning glue"], f"{module} imports {name}; only the Lightning glue may"
        if target in modules:
            assert _layer(target) <= _layer(module), f"{module} imports {target}, from a layer above its own"


def test_no_class_over_300_lines_and_no_function_over_80():
    limits = {ast.ClassDef: MAX_CLASS_LINES, ast.FunctionDef: MAX_FUNCTION_LINES, ast.AsyncFunctionDef: 80}
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = limits.get(type(node))
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not too_long, f"longer than {MAX_CLASS_LINES} (class) / {MAX_FUNCTION_LINES} (function) lines: {too_long}"
