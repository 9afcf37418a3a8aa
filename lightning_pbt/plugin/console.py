"""One console per population: the progress bar, info messages and warnings on population rank 0 only.

Every member's rank 0 is a rank 0 for Lightning (``rank_zero_only``), so Lightning's rank-zero messages
would otherwise appear once per member instead of once per run. Errors (logged at ERROR, exceptions and
tracebacks) still appear from every rank; loggers stay member-scoped (``rank_zero_only.rank`` is not
touched here).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

__all__ = ["QUIET_LOGGERS", "QUIET_WARNING_MODULES", "quiet_console"]

# Set to ERROR on population ranks != 0.
QUIET_LOGGERS = (
    "pytorch_lightning",
    "lightning.pytorch",
    "lightning_fabric",
    "lightning.fabric",
    "lightning_utilities",
    "lightning_pbt",
)
# Warnings attributed to these packages (rank_zero_warn points at its Lightning caller) are dropped there.
QUIET_WARNING_MODULES = r"(pytorch_lightning|lightning_fabric|lightning_utilities|lightning_pbt|lightning)(\.|$)"


def quiet_console(trainer: Any, world_rank: int) -> None:
    """On population ranks other than 0: disable the progress bar, raise the Lightning and lightning_pbt
    loggers to ERROR and ignore their warnings (changes process-wide logging and warning state).

    Args:
        trainer: the Trainer (its ``progress_bar_callback``).
        world_rank: this rank in the whole population; rank 0 keeps everything.
    """
    if world_rank == 0:
        return
    progress_bar = trainer.progress_bar_callback
    if progress_bar is not None:
        progress_bar.disable()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=QUIET_WARNING_MODULES)
