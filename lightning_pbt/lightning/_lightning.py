"""The Lightning package this copy of the Lightning glue is built on: ``lightning.pytorch``.

Mirrors :mod:`lightning_pbt.plugin._lightning` name for name (a test compares the two).
"""

import lightning.pytorch as pl
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import (
    Callback,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    ProgressBar,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only

PACKAGE = "lightning.pytorch"

__all__ = [
    "PACKAGE",
    "Callback",
    "DDPStrategy",
    "ModelCheckpoint",
    "OnExceptionCheckpoint",
    "ProgressBar",
    "StochasticWeightAveraging",
    "TrainerFn",
    "WeightAveraging",
    "fabric_rank_zero_only",
    "pl",
    "rank_zero_only",
    "seed_everything",
]
