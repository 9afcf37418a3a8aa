"""``from lightning_pbt.results import load_best_model, best_checkpoint, load_results``: the public path of
what a finished population gives its user, kept where the docs and ``python -m lightning_pbt best`` name
it. The code lives in :mod:`lightning_pbt.algorithm.results`; the names here are the same objects, and
its ``__all__`` is this module's (one list to keep).
"""

from lightning_pbt.algorithm import results as _results
from lightning_pbt.algorithm.results import *  # noqa: F403

__all__ = list(_results.__all__)
