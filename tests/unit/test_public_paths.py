"""The public contract does not move with the modules: every import path a user's script, a Hydra config
or a LightningCLI config names still works, and every ``python -m lightning_pbt...`` command the README,
the docs, the examples or the tests name still runs.

The imports run in a fresh interpreter, since this test process may already hold the modules.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env

PROBE = r"""
import json, importlib
from hydra.utils import get_class, get_method

import lightning_pbt
from lightning_pbt import PopulationBasedTraining, PopulationStrategy
from lightning_pbt.space import Choice, Domain, IntUniform, LogUniform, Uniform
from lightning_pbt.tools.hydra_configs import PopulationBasedTrainingConf, PopulationStrategyConf
import lightning_pbt.space as public_space
import lightning_pbt.results as public_results
import lightning_pbt.algorithm.results as results
import lightning_pbt.algorithm.space as space
import lightning_pbt.algorithm.space_config as space_config

top = {name: getattr(lightning_pbt, name) for name in lightning_pbt.__all__}
flavour = importlib.import_module("lightning_pbt.lightning")
unified = {name: getattr(flavour, name) for name in flavour.__all__}
homes = {**vars(space), **vars(space_config)}
print(json.dumps({
    "top": {name: f"{obj.__module__}.{obj.__qualname__}" for name, obj in top.items()},
    "space_same": {name: getattr(public_space, name) is homes[name] for name in public_space.__all__},
    "results_same": {name: getattr(public_results, name) is getattr(results, name) for name in results.__all__},
    "domains": [cls.__name__ for cls in (Choice, Domain, IntUniform, LogUniform, Uniform)],
    "unified_bases": {
        name: unified[name].__mro__[1].__module__
        for name in ("PBTReplay", "PopulationBasedTraining", "PopulationStrategy")
    },
    "unified_domains": all(unified[name] is getattr(space, name) for name in ("Choice", "LogUniform", "Uniform")),
    "unified_glue": unified["PopulationBasedTraining"].__module__,
    "hydra_targets": [
        get_class(PopulationBasedTrainingConf._target_) is PopulationBasedTraining,
        get_class(PopulationStrategyConf._target_) is PopulationStrategy,
        get_class("lightning_pbt.space.LogUniform") is LogUniform,
        get_class("lightning_pbt.lightning.PopulationStrategy") is unified["PopulationStrategy"],
        get_method("lightning_pbt.member_id_from_env") is top["member_id_from_env"],
    ],
}))
"""

TOP_LEVEL = {
    "Choice": "lightning_pbt.algorithm.space.Choice",
    "Domain": "lightning_pbt.algorithm.space.Domain",
    "IntUniform": "lightning_pbt.algorithm.space.IntUniform",
    "LogUniform": "lightning_pbt.algorithm.space.LogUniform",
    "PBTReplay": "lightning_pbt.plugin.replay.PBTReplay",
    "PopulationBasedTraining": "lightning_pbt.plugin.callback.PopulationBasedTraining",
    "PopulationStrategy": "lightning_pbt.plugin.strategy.PopulationStrategy",
    "PopulationTopology": "lightning_pbt.algorithm.topology.PopulationTopology",
    "Uniform": "lightning_pbt.algorithm.space.Uniform",
    "member_id_from_env": "lightning_pbt.plugin.strategy.member_id_from_env",
}


def test_every_public_import_path_resolves_to_its_object():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=child_env(), capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["top"] == TOP_LEVEL
    assert found["space_same"] and all(found["space_same"].values()), found["space_same"]
    assert {"Choice", "IntUniform", "LogUniform", "Uniform", "space_from_config"} <= set(found["space_same"])
    assert found["results_same"] and all(found["results_same"].values()), found["results_same"]
    assert {"best_checkpoint", "load_best_model", "load_results"} <= set(found["results_same"])
    assert found["domains"] == ["Choice", "Domain", "IntUniform", "LogUniform", "Uniform"]
    assert found["unified_glue"] == "lightning_pbt.lightning.callback"
    assert set(found["unified_bases"]) == {"PBTReplay", "PopulationBasedTraining", "PopulationStrategy"}
    assert all(base.startswith("lightning.pytorch.") for base in found["unified_bases"].values())
    assert found["unified_domains"]
    assert found["hydra_targets"] == [True] * 5


def named_commands() -> list[str]:
    """Every ``python -m lightning_pbt...`` module that the README, the docs, the examples or the tests name."""
    pattern = re.compile(r"""python3? -m (lightning_pbt[\w.]*)|["']-m["'],\s*["'](lightning_pbt[\w.]*)["']""")
    sources = [REPO / "README.md", REPO / "Makefile", *(REPO / "docs").rglob("*.md")]
    for folder in ("examples", "tests", "lightning_pbt"):
        sources += (REPO / folder).rglob("*.py")
    found = set()
    for path in sources:
        if path.suffix == ".orig" or path == REPO / "tests" / "unit" / "test_public_paths.py":
            continue
        for match in pattern.finditer(path.read_text()):
            found.add(match[1] or match[2])
    return sorted(found)


def test_the_named_commands_are_the_known_ones():
    assert named_commands() == ["lightning_pbt", "lightning_pbt.internals", "lightning_pbt.report"]


@pytest.mark.parametrize("module", named_commands())
def test_every_named_command_runs(module: str):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], env=child_env(), capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"python -m {module}" in proc.stdout
