"""Population Based Training for PyTorch Lightning: a callback and a DDP strategy, no restarts.

The search-space domains import nothing heavy; the callback and strategy (torch, Lightning) load on
first use, so ``from lightning_pbt.algorithm.space import Uniform`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_pbt.algorithm.space import Choice, Domain, IntUniform, LogUniform, Uniform

__all__ = [
    "Choice",
    "Domain",
    "IntUniform",
    "LogUniform",
    "PBTReplay",
    "PopulationBasedTraining",
    "PopulationStrategy",
    "PopulationTopology",
    "Uniform",
    "member_id_from_env",
]
__version__ = "0.1.0.dev0"

_LAZY = {
    "PopulationBasedTraining": "lightning_pbt.plugin.callback",
    "PBTReplay": "lightning_pbt.plugin.replay",
    "PopulationStrategy": "lightning_pbt.plugin.strategy",
    "member_id_from_env": "lightning_pbt.plugin.strategy",
    "PopulationTopology": "lightning_pbt.algorithm.topology",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_pbt' has no attribute {name!r}")
