"""The Lightning package this copy of the Lightning glue is built on: ``pytorch_lightning``.

The glue modules (``strategy``, ``callback``, ``replay``) take every Lightning name from a module
called ``_lightning`` *relative to their package*. Here that is this file; in
:mod:`lightning_pbt.lightning` the same glue source is loaded again beside a ``_lightning`` that imports
``lightning.pytorch``. One source, two sets of classes, and neither flavour imports the other package.
"""

import pytorch_lightning as pl
from lightning_fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning_fabric.utilities.seed import seed_everything
from pytorch_lightning.callbacks import (
    Callback,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    ProgressBar,
    StochasticWeightAveraging,
    WeightAveraging,
)
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_only

PACKAGE = "pytorch_lightning"

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
