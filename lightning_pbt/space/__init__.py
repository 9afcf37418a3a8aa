"""``from lightning_pbt.space import Uniform, LogUniform, IntUniform, Choice``: the public path of the
search-space domains, kept where every user's script and Hydra config names it. The code lives in
:mod:`lightning_pbt.algorithm.space` (the config forms in :mod:`lightning_pbt.algorithm.space_config`);
the names here are the same objects.
"""

from lightning_pbt.algorithm.space import (
    Choice,
    Domain,
    IntUniform,
    LogUniform,
    Uniform,
    validate_hyperparameters,
)
from lightning_pbt.algorithm.space_config import domain_from_config, space_from_config, space_to_config

__all__ = [
    "Choice",
    "Domain",
    "IntUniform",
    "LogUniform",
    "Uniform",
    "domain_from_config",
    "space_from_config",
    "space_to_config",
    "validate_hyperparameters",
]
