"""When a validation end is a ready step (by the interval the user set), the score it brings, and what a
fit with no ready step or a ready step with a result tells the user and the loggers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lightning_pbt.distributed.ready_steps.base import PopulationBook, ReadyStepResult

from ._lightning import pl

__all__ = ["epochs_completed", "epochs_done", "idle_message", "is_ready", "monitored_score", "status_metrics"]


def idle_message(validations: int, monitor_seen: bool, monitor: str, interval: str) -> str:
    """Why a fit had no ready step, and what to change.

    Args:
        validations: the validation ends of the fit.
        monitor_seen: whether any of them logged the monitored metric.
        monitor: its name.
        interval: the ready interval, as the user set it (``"every_n_epochs=2"``).
    """
    if not validations:
        return (
            "no validation ran during this fit, so PopulationBasedTraining never had a ready step (a ready step "
            "happens at a validation end; check limit_val_batches, check_val_every_n_epoch and val_check_interval)"
        )
    if not monitor_seen:
        return (
            f"validation ran {validations} time(s) but never logged {monitor!r}, and no ready step "
            "happened; log the monitored metric in validation_step"
        )
    return (
        f"validation ran {validations} time(s) but no ready step happened ({interval} was never "
        "reached at a validation end); lower the interval or validate more often"
    )


def status_metrics(
    result: ReadyStepResult, population: Mapping[int, Mapping[str, Any]], hyperparameters: Mapping[str, Any], mode: str
) -> dict[str, float]:
    """What a ready step logs: its timing, the best member, its score and values, and this member's values.

    Args:
        result: the ready step's result (scores, timing).
        population: the population's status after it.
        hyperparameters: this member's values in effect.
        mode: ``"max"`` or ``"min"``.
    """
    scored = {m: s for m, s in result.scores.items() if s is not None}
    metrics: dict[str, float] = {f"pbt/time_{name}": value for name, value in result.timing.items()}
    if scored:
        best = max(scored, key=lambda m: (scored[m] if mode == "max" else -scored[m], -m))
        metrics["pbt/best_member"] = float(best)
        metrics["pbt/best_score"] = float(scored[best])
        for name, value in population[best]["hyperparameters"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"pbt/best_{name}"] = float(value)
    for name, value in hyperparameters.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[f"pbt/{name}"] = float(value)
    return metrics


def is_ready(
    trainer: pl.Trainer, book: PopulationBook, every_n_train_steps: int | None, every_n_epochs: int | None
) -> bool:
    """Whether this validation end is a ready step, by the interval the user set.

    Args:
        trainer: the member's Trainer, at a validation end.
        book: what this rank knows of the population (its last ready step and epochs).
        every_n_train_steps: the interval in optimizer steps (``None``: not set).
        every_n_epochs: the interval in epochs (``None``: not set); with neither, every validation end.
    """
    if trainer.global_step == book.last_ready_step:  # e.g. several validations in one step
        return False
    if every_n_train_steps is not None:
        return trainer.global_step - max(book.last_ready_step, 0) >= every_n_train_steps
    if every_n_epochs is not None:
        return epochs_done(trainer) - book.last_ready_epochs >= every_n_epochs
    return True


def monitored_score(trainer: pl.Trainer, monitor: str) -> tuple[float, bool]:
    """The monitored metric at this validation end, and whether it was missing (NaN then).

    Args:
        trainer: the member's Trainer, at a validation end.
        monitor: the metric's name in ``trainer.callback_metrics``.
    """
    value = trainer.callback_metrics.get(monitor)
    if value is None:
        return math.nan, True
    return float(value.item() if isinstance(value, torch.Tensor) else value), False


def epochs_done(trainer: pl.Trainer) -> int:
    """Completed epochs at this validation end, as :func:`epochs_completed` counts them.

    Args:
        trainer: the member's Trainer, at a validation end.
    """
    return epochs_completed(
        trainer.current_epoch,
        bool(trainer.is_last_batch),
        trainer.fit_loop.epoch_loop.batch_idx + 1,
        trainer.num_training_batches,
        trainer.val_check_batch,
    )


def epochs_completed(
    epoch: int, last_batch: bool, batches_done: int, batches_per_epoch: Any, validate_every: Any
) -> int:
    """Completed epochs at a validation end, after ``batches_done`` batches of epoch ``epoch``.

    The current epoch counts once no later batch of it will validate: its last batch ran, or the next
    validation (``validate_every`` batches on, whether Lightning counts batches per epoch or per run)
    falls beyond its ``batches_per_epoch``. So ``every_n_epochs=1`` with ``val_check_interval=0.5`` is
    ready at each epoch's last validation, never at a mid-epoch one. Where the next validation cannot be
    known (an epoch of unknown length, time-based validation), only the last batch ends an epoch.

    Args:
        epoch: the current epoch.
        last_batch: whether the batch just done is the epoch's last.
        batches_done: the batches done in this epoch.
        batches_per_epoch: the epoch's length in batches (``inf`` or unknown for an iterable of no length).
        validate_every: the batches between validations (Lightning's ``val_check_batch``).
    """
    if last_batch:
        return epoch + 1
    known = all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (batches_per_epoch, validate_every))
    return epoch + 1 if known and batches_done + validate_every > batches_per_epoch else epoch
