"""What each member of an applications arm does besides training, inside its own fit: take its grid
point, and measure itself at the end.

With members that take turns (``strategy.members_per_process=K``) a process hosts K members, each an
ordinary ``Trainer.fit`` of its own copies of the Trainer, the module and the data (plugin/turns.py).
Three things the benchmark used to do from the launching script therefore have to happen inside
each member's fit, through callbacks that every lane copies:

- the grid arm's point: a script builds one model for the whole process, so ``model.lr=...`` overrides
  would give all K members one point; :class:`GridPoint` applies member ``m``'s point at its train
  start, through the same code path the PBT callback uses for its samples;
- the final validation and test: ``Trainer.validate`` / ``Trainer.test`` are refused with K > 1, so
  :class:`FinalEvaluation` measures the member's final weights at its train end with the app's own
  forward pass (the same numbers as the app's ``validation_step`` / ``test_step``;
  tests/bench/test_app_members.py checks that against Lightning's loops);
- the record: one ``member_<id>.json`` per member, not one per process, with the member's validation
  score at every validation of its fit (``history``: the learning curves of the report; the lineage has
  only the ready steps, and only for the arms with the PBT callback).

Members are one rank each here (``member_size=1``): the evaluation is a local computation, no collective.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.nn import functional as F

__all__ = ["FinalEvaluation", "GridPoint", "evaluate"]


def _image_batch(module: Any, batch: Any) -> tuple[float, int]:
    x, y = batch
    return float((module(x).argmax(-1) == y).sum()), int(y.shape[0])


def _language_batch(module: Any, batch: Any) -> tuple[float, int]:
    x, y = batch
    loss = F.cross_entropy(module(x).flatten(0, 1), y.flatten())
    return float(loss) * int(x.shape[0]), int(x.shape[0])  # Lightning weights a batch's mean by its size


def _episode(module: Any, seed: Any) -> tuple[float, int]:
    return module.episode_return_for(int(seed)), 1


# app -> (per-batch sum and count, what the validation mean becomes in the test metric)
METRICS: dict[str, tuple[Callable[[Any, Any], tuple[float, int]], Callable[[float], float]]] = {
    "image_classification": (_image_batch, lambda mean: mean),  # val_acc, test_acc
    "language_model": (_language_batch, math.exp),  # val_loss, test_perplexity = exp(test loss)
    "reinforcement_learning": (_episode, lambda mean: mean),  # eval_return, test_return
}


def evaluate(app: str, module: pl.LightningModule, batches: Iterable[Any], *, test: bool) -> float:
    """The app's validation score (``test=False``) or test metric of ``module``'s current weights."""
    per_batch, to_test = METRICS[app]
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                value, n = per_batch(module, batch)
                total, count = total + value, count + n
    finally:
        module.train(was_training)
    mean = total / count if count else math.nan
    return to_test(mean) if test else mean


def _loaders(trainer: pl.Trainer, module: pl.LightningModule) -> tuple[Any, Any]:
    source = trainer.datamodule if trainer.datamodule is not None else module
    return source.val_dataloader(), source.test_dataloader()


class GridPoint(pl.Callback):
    """Member ``m`` trains with ``points[m]`` (the grid arm): applied at train start, as PBT applies its
    samples, so optimizer keys reach the param groups (and LR schedulers) and the others ``hparams``."""

    def __init__(self, points: list[dict[str, Any]]) -> None:
        self.points = points

    def point(self, trainer: pl.Trainer) -> dict[str, Any]:
        member = trainer.strategy.member_id
        if member >= len(self.points):
            raise ValueError(f"member {member} has no grid point: the grid has {len(self.points)} points")
        return self.points[member]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_pbt.plugin.apply import apply_hyperparameters

        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        apply_hyperparameters(self.point(trainer), trainer.optimizers, schedulers, pl_module)


class FinalEvaluation(pl.Callback):
    """At the member's train end: validate and test its final weights, write ``member_<id>.json``; on the
    way, note ``monitor`` after every validation of the fit (``history``: ``[[global step, score], ...]``,
    the score of the weights the member had then, before any copy that ready step decided: this
    callback runs after PBT's, which does not touch ``callback_metrics``)."""

    def __init__(self, app: str, arm: str, out: str | Path, fixed: Mapping[str, Any] | None = None,
                 monitor: str | None = None) -> None:
        if app not in METRICS:
            raise ValueError(f"no evaluation for app {app!r} (known: {sorted(METRICS)})")
        self.app, self.arm, self.out, self.fixed = app, arm, Path(out), dict(fixed or {})
        self.monitor = monitor
        self.started = math.nan
        self.history: list[list[Any]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.monitor)
        self.history.append([trainer.global_step, None if value is None else _finite(float(value))])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit_s = time.perf_counter() - self.started  # with turns: includes the other members' turns
        strategy = trainer.strategy
        if strategy.member_size != 1:
            raise ValueError("the applications benchmark evaluates members of one rank (member_size=1)")
        val_loader, test_loader = _loaders(trainer, pl_module)
        val = evaluate(self.app, pl_module, val_loader, test=False)
        test = evaluate(self.app, pl_module, test_loader, test=True)
        values = self.hyperparameters(trainer, strategy.member_id)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"member_{strategy.member_id}.json").write_text(json.dumps({
            "arm": self.arm, "member": strategy.member_id, "val": _finite(val), "test": _finite(test),
            "fit_s": fit_s, "steps": trainer.global_step, "monitor": self.monitor, "history": self.history,
            "hyperparameters": {k: float(v) if isinstance(v, int | float) else v for k, v in values.items()},
        }))

    def hyperparameters(self, trainer: pl.Trainer, member: int) -> dict[str, Any]:
        """The values in effect at the end: PBT's (when the arm has the callback), else the grid point's."""
        from lightning_pbt.plugin.callback import PopulationBasedTraining

        for callback in trainer.callbacks:
            if isinstance(callback, PopulationBasedTraining):
                return dict(callback.hyperparameters)
            if isinstance(callback, GridPoint):
                return callback.point(trainer)
        return dict(self.fixed)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
