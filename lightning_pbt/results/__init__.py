"""``from lightning_pbt.results import load_best_model, best_checkpoint, load_results``: the public path of
what a finished population gives its user, kept where the docs and ``python -m lightning_pbt best`` name
it. The code lives in :mod:`lightning_pbt.algorithm.results`; the names here are the same objects.
"""

from lightning_pbt.algorithm.results import (
    RESULTS_FILE,
    RUN_OUTPUTS,
    MemberResult,
    PopulationResults,
    best_checkpoint,
    load_best_model,
    load_results,
    rank_results,
    results_from_gathered,
    set_aside_previous_run,
    summary_text,
    write_results,
)

__all__ = [
    "RESULTS_FILE",
    "RUN_OUTPUTS",
    "MemberResult",
    "PopulationResults",
    "best_checkpoint",
    "load_best_model",
    "load_results",
    "rank_results",
    "results_from_gathered",
    "set_aside_previous_run",
    "summary_text",
    "write_results",
]
