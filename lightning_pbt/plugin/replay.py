"""Re-train with a schedule PBT found: ``PBTReplay``, a callback for an ordinary single-process run.

PBT's result is a hyperparameter *schedule*: the values the best member's final weights were trained
with, and the global steps at which they changed (:func:`lightning_pbt.algorithm.lineage.member_schedule`).
``PBTReplay`` applies that schedule to a plain run (no :class:`~lightning_pbt.PopulationStrategy`, one
process or ordinary DDP), the way Ray Tune's ``PopulationBasedTrainingReplay`` does::

    from lightning_pbt.plugin.replay import PBTReplay

    trainer = pl.Trainer(max_epochs=12, callbacks=[PBTReplay("outputs/.../pbt/schedule.json")])
    trainer.fit(model, datamodule)

``schedule`` is one of:

- the ``schedule.json`` that ``python -m lightning_pbt.report`` writes (the best member's schedule);
- a ``lineage.jsonl`` file (or a run directory holding ``pbt/lineage.jsonl``) with ``member=`` (default:
  the best member, ``mode=`` telling whether higher scores are better);
- a list of ``(step, {name: value})`` pairs (or ``{"step": .., "hyperparameters": {..}}`` dicts).

An entry recorded at step ``s`` was decided after ``s`` optimizer steps, so it is in effect from the
``s + 1``-th optimizer step on: the callback applies it at the start of the first training batch with
``trainer.global_step >= s`` (and at the start of training, for entries at or before the current step, so
a resumed run picks up where it was). Values go where PBT put them
(:func:`lightning_pbt.plugin.apply.apply_hyperparameters`): optimizer param groups (``lr`` keeps an LR
scheduler's shape around the new base), otherwise ``module.hparams`` and the module's
``on_pbt_hyperparameters`` hook. Only hyperparameters are replayed, not the weights PBT copied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from typing_extensions import override

from lightning_pbt.plugin.apply import GroupRatios, apply_hyperparameters, capture_group_ratios, check_applicable

from ._lightning import Callback, pl

__all__ = ["PBTReplay", "load_schedule"]

Schedule = list[tuple[int, dict[str, Any]]]


def _entries(raw: Any, where: str) -> Schedule:
    if isinstance(raw, Mapping) and "schedule" in raw:
        raw = raw["schedule"]
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
        raise ValueError(f"{where}: expected a list of (step, hyperparameters) entries, got {type(raw).__name__}")
    schedule: Schedule = []
    for index, entry in enumerate(raw):
        if isinstance(entry, Mapping):
            step, values = entry.get("step"), entry.get("hyperparameters")
        elif isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)) and len(entry) == 2:
            step, values = entry
        else:
            raise ValueError(f"{where}[{index}]: expected (step, hyperparameters), got {entry!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}[{index}]: step must be an integer >= 0, got {step!r}")
        if not isinstance(values, Mapping) or not all(isinstance(k, str) for k in values):
            raise ValueError(f"{where}[{index}]: hyperparameters must be a mapping of names, got {values!r}")
        schedule.append((step, dict(values)))
    if not schedule:
        raise ValueError(f"{where}: the schedule is empty")
    schedule.sort(key=lambda pair: pair[0])
    steps = [step for step, _ in schedule]
    duplicates = sorted({s for s in steps if steps.count(s) > 1})
    if duplicates:
        raise ValueError(f"{where}: several entries for step(s) {duplicates}")
    return schedule


def _load(source: Any, member: int | None, mode: str | None) -> tuple[Schedule, int | None, float | None]:
    """The schedule (see :func:`load_schedule`), the member PBT found it with and that member's final score
    (both ``None`` when the source does not say)."""
    if not isinstance(source, (str, os.PathLike)):
        if member is not None:
            raise ValueError("PBTReplay: member= only goes with a lineage file")
        return _entries(source, "PBTReplay schedule"), None, None
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        if member is not None:
            raise ValueError(f"PBTReplay: {path} is one member's schedule; member= goes with a lineage file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"PBTReplay: {path} is not valid JSON: {err}") from None
        origin = data if isinstance(data, Mapping) else {}
        score = origin.get("score")
        return _entries(data, str(path)), origin.get("member"), None if score is None else float(score)
    from lightning_pbt.algorithm.lineage import best_member, final_records, member_schedule, read_lineage
    from lightning_pbt.algorithm.run_reading import find_lineage, infer_mode

    lineage = find_lineage(path)
    records = read_lineage(lineage)
    if member is None:
        if mode is None:
            run_dir = lineage.parent.parent if lineage.parent.name == "pbt" else lineage.parent
            mode, _ = infer_mode(records, run_dir)
        member = best_member(records, mode)
    if member not in {r.member for r in records}:
        raise ValueError(f"PBTReplay: member {member} is not in {lineage}")
    schedule = _entries(member_schedule(records, member), f"{lineage} (member {member})")
    return schedule, member, final_records(records)[member].score


def load_schedule(source: Any, member: int | None = None, mode: str | None = None) -> Schedule:
    """``[(step, hyperparameters), ...]`` sorted by step, from any form :class:`PBTReplay` accepts.

    Args:
        source: a ``schedule.json`` path (written by ``python -m lightning_pbt.report``), a lineage file
            or run directory, or the schedule itself (a list of ``(step, {name: value})``, or a mapping
            with a ``"schedule"`` key).
        member: with a lineage: whose schedule (default: the best member).
        mode: with a lineage and no ``member``: ``"max"`` or ``"min"`` to pick the best member
            (default: inferred from the run's configuration).

    Returns:
        The schedule, sorted by step.

    Raises:
        ValueError: ``member`` given with a schedule rather than a lineage, a member the lineage does not
            have, a file that is not valid JSON, or a malformed schedule.
    """
    return _load(source, member, mode)[0]


class PBTReplay(Callback):
    """Apply a recorded PBT schedule at its recorded global steps (see the module docstring).

    Args:
        schedule: a ``schedule.json`` path, a lineage path (file or run directory) or a list of
            ``(step, hyperparameters)``.
        member: with a lineage: whose schedule (default: the best member).
        mode: with a lineage and no ``member``: ``"max"`` or ``"min"`` (default: inferred, see
            :func:`lightning_pbt.tools.report.infer_mode`).
        log: log the numeric values in effect as ``replay/<name>`` to the Trainer's loggers.

    ``pbt_member`` and ``pbt_score`` say which member PBT found the schedule with and the score it reached
    (``None`` for a schedule given as a list), to compare with the replayed run's.

    Raises:
        ValueError: see :func:`load_schedule`; at fit start, a hyperparameter that nothing in the model
            or its optimizers applies.

    Examples:
        ```python
        trainer = pl.Trainer(max_epochs=20, callbacks=[PBTReplay("outputs/.../pbt/schedule.json")])
        trainer.fit(model, datamodule)
        ```
    """

    def __init__(self, schedule: Any, member: int | None = None, mode: str | None = None, log: bool = True) -> None:
        super().__init__()
        self.schedule, self.pbt_member, self.pbt_score = _load(schedule, member, mode)
        self.log_hyperparameters = log
        self.names = sorted({name for _, values in self.schedule for name in values})
        self.hyperparameters: dict[str, Any] = {}
        self.applied: list[tuple[int, dict[str, Any]]] = []  # (global step, values), for inspection
        self._next = 0
        self._group_ratios: GroupRatios | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_applicable(self.names, trainer.optimizers, pl_module)
        self._group_ratios = capture_group_ratios(trainer.optimizers)  # as PopulationBasedTraining does

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._next = 0
        self.hyperparameters = {}
        self._catch_up(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._catch_up(trainer, pl_module)

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        due = False
        while self._next < len(self.schedule) and self.schedule[self._next][0] <= step:
            self.hyperparameters.update(self.schedule[self._next][1])
            self._next += 1
            due = True
        if not due:
            return
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        apply_hyperparameters(dict(self.hyperparameters), trainer.optimizers, schedulers, pl_module, self._group_ratios)
        self.applied.append((step, dict(self.hyperparameters)))
        if self.log_hyperparameters:
            metrics = {
                f"replay/{name}": float(value)
                for name, value in self.hyperparameters.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"schedule": [[step, values] for step, values in self.schedule]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = _entries(state_dict.get("schedule", []), "PBTReplay checkpoint") if state_dict.get("schedule") else None
        if saved is not None and saved != self.schedule:
            raise ValueError("PBTReplay: the checkpoint was trained with another schedule than the one given")
