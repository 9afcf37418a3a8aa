"""lightning_pbt for the unified ``lightning`` package (``import lightning.pytorch as L``).

``from lightning_pbt.lightning import PopulationBasedTraining, PopulationStrategy, PBTReplay`` gives
the same classes as ``from lightning_pbt import ...``, built on ``lightning.pytorch`` instead of
``pytorch_lightning``, so that ``L.Trainer`` accepts them.

How: this package's search path also holds ``lightning_pbt/plugin/``, so ``lightning_pbt.lightning.callback``
is ``lightning_pbt/plugin/callback.py`` loaded a second time. The glue modules import Lightning only through
``._lightning`` and each other through relative imports, which here resolve to this package; the pure
modules (space, exploit, transfer, ...) are imported absolutely and shared by both flavours.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from lightning_pbt.algorithm.space import Choice, Domain, IntUniform, LogUniform, Uniform

__path__.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin"))

__all__ = [
    "Choice",
    "Domain",
    "IntUniform",
    "LogUniform",
    "PBTReplay",
    "PopulationBasedTraining",
    "PopulationStrategy",
    "Uniform",
    "member_id_from_env",
]

# The modules loaded a second time for this flavour; every other lightning_pbt module is shared.
GLUE_MODULES = (
    "_lightning", "callback", "outputs", "population_view", "readiness", "replay", "strategy", "trainer_member"
)

_LAZY = {
    "PopulationBasedTraining": "callback",
    "PBTReplay": "replay",
    "PopulationStrategy": "strategy",
    "member_id_from_env": "strategy",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
