"""What the callback tells its user (a base class of ``PopulationBasedTraining``): the population as this
rank knows it, one console line per ready step, members that start alike, the results every rank learns
at the end of fit (``results``, ``best_member``, ``best_score``, ``best_checkpoint_path``; population rank
0 prints the summary and writes ``results.json``) and the hyperparameters each member's loggers record.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

from lightning_pbt.algorithm.results import RESULTS_FILE, MemberResult, PopulationResults, summary_text, write_results
from lightning_pbt.distributed.ready_steps.base import PopulationBook, ReadyStepResult
from lightning_pbt.plugin import console, fit_edges

from ._lightning import pl
from .readiness import idle_message, status_metrics
from .strategy import PopulationStrategy

__all__ = ["PopulationView"]

log = logging.getLogger(__name__)


class PopulationView:
    """What the callback tells its user: the population as this rank knows it, one line per ready step,
    identical starts, the results at the end of fit (on every rank) and the hyperparameters each member's
    loggers record."""

    _results: PopulationResults | None
    _hparams_warned: bool
    monitor: str
    mode: str
    verbose: bool
    synchronous: bool
    initial_weights: str
    book: PopulationBook
    every_n_train_steps: int | None
    every_n_epochs: int | None
    _validations: int
    _monitor_seen: bool
    _ready_at_start: int
    _fresh_start: bool

    def _require_strategy(self) -> PopulationStrategy:
        raise NotImplementedError

    @property
    def lineage_path(self) -> str:
        raise NotImplementedError

    # -- the population, as this rank knows it ---------------------------------------------------
    @property
    def population(self) -> dict[int, dict[str, Any]]:
        """``{member: {hyperparameters, score, history, parent, done}}``: identical on every rank after a
        synchronous ready step; this member's latest view in asynchronous mode."""
        return self.book.population

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The values in effect on this member."""
        return self.book.hyperparameters

    @property
    def ready_count(self) -> int:
        return self.book.ready_count

    @property
    def last_ready_step(self) -> int:
        return self.book.last_ready_step

    # -- the results, on every rank after fit -----------------------------------------------------
    @property
    def results(self) -> list[MemberResult]:
        """Every member at the end of the last fit, best first (score, step, values, checkpoint); empty
        before a fit has ended. The same on every rank."""
        return list(self._results.members) if self._results is not None else []

    @property
    def best_member(self) -> int | None:
        """The member with the best final score (``None``: no fit ended yet, or no finite score)."""
        best = self._results.best if self._results is not None else None
        return None if best is None else best.member

    @property
    def best_score(self) -> float | None:
        """The best member's final score."""
        best = self._results.best if self._results is not None else None
        return None if best is None else best.score

    @property
    def best_checkpoint_path(self) -> str | None:
        """Where the best member can be loaded from: its ``ModelCheckpoint``'s best checkpoint, else its
        last one, else the state PBT saved for it at the end of fit (``<dirpath>/member_<id>.ckpt``)."""
        best = self._results.best if self._results is not None else None
        return None if best is None else best.checkpoint_path

    def _warn_if_idle(self, trainer: pl.Trainer) -> None:
        """Say so (once, on population rank 0) when this fit gave PBT nothing to work with."""
        if self._require_strategy().world_rank != 0 or self.book.ready_count > self._ready_at_start:
            return
        interval = (
            f"every_n_train_steps={self.every_n_train_steps}"
            if self.every_n_train_steps is not None
            else f"every_n_epochs={self.every_n_epochs}"
        )
        message = idle_message(self._validations, self._monitor_seen, self.monitor, interval)
        warnings.warn(f"PopulationBasedTraining did nothing: {message}", UserWarning, stacklevel=2)

    # -- applying and reporting ------------------------------------------------------------------
    def _log_status(self, trainer: pl.Trainer, result: ReadyStepResult, last: bool) -> None:
        metrics = status_metrics(result, self.book.population, self.book.hyperparameters, self.mode)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        plan = result.plan
        if plan.event != "keep":
            mutations = "; ".join(plan.mutations)
            log.debug(
                "PBT step %s: member %d %s member %s; %s", result.step, plan.member, plan.event, plan.parent, mutations
            )
        if self.verbose and self.synchronous and self._require_strategy().world_rank == 0 and result.plans:
            # Population rank 0 knows every member's plan (in one hosted member's result when members take
            # turns); asynchronous decisions are announced as the lineage drain writes them (one line per
            # member that copied or got fresh weights).
            line = console.ready_step_line(result.step, result.plans, result.scores, self.monitor, self.mode, last)
            console.say(trainer, line)

    def _lane_pool(self) -> dict[str, Any]:
        """What the members of this process share to speak once for all of them: the members that take
        turns' ``MemberTurns.pooled``; a dict of its own with one member per process."""
        turns = self._require_strategy().lane.turns
        return turns.pooled if turns is not None else {}

    def _check_identical_starts(self, strategy: PopulationStrategy, pl_module: pl.LightningModule) -> None:
        assert strategy.population is not None and strategy.topology is not None
        warn = strategy.world_rank == 0 and self._fresh_start and self.initial_weights != "shared"
        seen = self._lane_pool().setdefault("digests", {})  # lanes that take turns gather one lane each
        message = fit_edges.identical_start_warning(strategy.population, strategy.topology, pl_module, warn,
                                                    self.initial_weights, seen)  # fmt: skip
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=2)

    def _gather_results(self, trainer: pl.Trainer, pool: dict[str, Any]) -> None:
        """Every member's result on every rank. The first member of a process to end gathers for all the
        members it hosts (``pool["hosted"]``), once; then each member's ranks save it if it is the best."""
        strategy = self._require_strategy()
        assert strategy.population is not None
        first = "results" not in pool
        if first:
            hosted = [(lane_trainer, member, book) for member, (lane_trainer, book) in sorted(pool["hosted"].items())]
            folder = os.path.dirname(self.lineage_path)
            pool["results"] = fit_edges.finish_results(
                strategy.population, hosted, self.monitor, self.mode, strategy.run_dir, folder
            )
        self._results, saved = pool["results"]
        fit_edges.save_if_best(trainer, strategy.member_id, self._results, saved)
        if first and strategy.world_rank == 0:
            write_results(self._results, os.path.join(os.path.dirname(self.lineage_path), RESULTS_FILE))
            if self.verbose:
                console.say(trainer, "\n" + summary_text(self._results))

    def _log_hyperparameters(self, trainer: pl.Trainer, values: Mapping[str, Any]) -> None:
        """The loggers' hyperparameters (``hparams.yaml``) follow the member's values in effect."""
        problem = fit_edges.log_hyperparameters(trainer.loggers, values)
        if problem is not None and not self._hparams_warned:  # e.g. MLflow refuses a changed param: say it once
            self._hparams_warned = True
            log.warning(problem)
