"""Two Lightning flavours from one source: ``lightning_pbt`` (``pytorch_lightning``) and
``lightning_pbt.lightning`` (``lightning.pytorch``).

The import checks run in fresh interpreters, since this test process may hold both packages already.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env

PACKAGE = REPO / "lightning_pbt"
PLUGIN = PACKAGE / "plugin"
LIGHTNING_PACKAGES = {"pytorch_lightning", "lightning", "lightning_fabric"}


def _run(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_each_flavour_imports_only_its_own_lightning_package():
    probe = """
import json, sys
from lightning_pbt{suffix} import PBTReplay, PopulationBasedTraining, PopulationStrategy
print(json.dumps({{
    "loaded": sorted(m for m in ("pytorch_lightning", "lightning") if m in sys.modules),
    "glue": sorted(m for m in sys.modules if m.startswith("lightning_pbt.lightning.")),
    "bases": [c.__mro__[1].__module__ for c in (PBTReplay, PopulationBasedTraining, PopulationStrategy)],
}}))
"""
    classic = _run(probe.format(suffix=""))
    assert classic["loaded"] == ["pytorch_lightning"]
    assert classic["glue"] == []
    assert all(base.startswith("pytorch_lightning.") for base in classic["bases"])

    unified = _run(probe.format(suffix=".lightning"))
    assert unified["loaded"] == ["lightning"]
    assert all(base.startswith("lightning.pytorch.") for base in unified["bases"])
    # Only the glue is loaded twice; the algorithm and transport modules are shared.
    from lightning_pbt.lightning import GLUE_MODULES

    assert unified["glue"] == sorted(f"lightning_pbt.lightning.{name}" for name in GLUE_MODULES)


def test_the_two_lightning_shims_export_the_same_names():
    def exported(path: Path) -> list[str]:
        tree = ast.parse(path.read_text())
        node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
        return ast.literal_eval(node.value)

    assert exported(PLUGIN / "_lightning.py") == exported(PACKAGE / "lightning" / "_lightning.py")


@pytest.mark.parametrize(
    "name", ["callback", "outputs", "population_view", "readiness", "replay", "strategy", "trainer_member"]
)
def test_glue_reaches_lightning_and_other_glue_only_through_relative_imports(name):
    """An absolute ``import pytorch_lightning`` (or ``lightning_pbt.plugin.strategy``) in the glue would tie the
    ``lightning`` flavour to the other package or to the other flavour's classes."""
    from lightning_pbt.lightning import GLUE_MODULES

    tree = ast.parse((PLUGIN / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            assert parts[0] not in LIGHTNING_PACKAGES, f"{name}.py imports {module}; use `from ._lightning import`"
            if parts[:2] == ["lightning_pbt", "plugin"] and len(parts) > 2:
                assert parts[2] not in GLUE_MODULES, f"{name}.py imports {module}; use a relative import"


def test_the_callback_imports_and_runs_perturb_without_scipy():
    """Only PB2 needs scipy; ``make test-gpu`` promises torch, Lightning and pytest, no more. Lightning may
    import scipy itself where it is installed; here it then disappears, as on a machine without it."""
    result = _run(
        "import json, sys\n"
        "import pytorch_lightning\n"
        "for name in [n for n in sys.modules if n == 'scipy' or n.startswith('scipy.')]:\n"
        "    del sys.modules[name]\n"
        "sys.modules['scipy'] = None  # `import scipy` now fails\n"
        "from lightning_pbt import PopulationBasedTraining, PopulationStrategy\n"
        "from lightning_pbt.space import LogUniform\n"
        "import lightning_pbt.plugin.callback, lightning_pbt.distributed.ready_steps\n"
        "space = {'lr': LogUniform(1e-4, 1e-1)}\n"
        "PopulationBasedTraining(space, monitor='val_loss')\n"
        "try:\n"
        "    PopulationBasedTraining(space, monitor='val_loss', explore='pb2')\n"
        "    pb2 = None\n"
        "except ImportError as error:\n"
        "    pb2 = str(error)\n"
        "print(json.dumps({'pb2_module': 'lightning_pbt.algorithm.pb2' in sys.modules, 'pb2_error': pb2}))\n"
    )
    assert result["pb2_module"] is False
    assert result["pb2_error"] is not None and "explore='pb2' needs scipy" in result["pb2_error"]
