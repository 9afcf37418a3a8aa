"""This rank's training state as the ready-step protocol sees it (its ``LocalMember``): what the trainer
holds that moves on an exploit (weights, optimizers, LR schedulers, precision plugin, weight averages), how
to load a donor's state into it, put hyperparameters into it and re-initialise its weights.

Which callbacks' state moves with the weights is decided here too: Lightning's weight averages hold model
state; every other callback is per-member bookkeeping and stays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lightning_pbt.distributed import transfer
from lightning_pbt.plugin.apply import GroupRatios, apply_hyperparameters, reset_weights

from ._lightning import Callback, StochasticWeightAveraging, WeightAveraging, pl

__all__ = ["TrainerMember", "averaging_state", "load_averaging_state", "weight_averages"]


class TrainerMember:
    """This rank's training state as the ready-step protocol sees it (``LocalMember``).

    Args:
        trainer: the member's Trainer.
        module: its LightningModule.
        group_ratios: returns the optimizers' param-group ratios taken at fit start (``None`` before).
        rejuvenate_modules: the submodules a rejuvenation re-initialises (``None``: all).
        on_apply: called with the values just applied (the callback gives them to the member's loggers).
    """

    def __init__(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        group_ratios: Callable[[], GroupRatios | None],
        rejuvenate_modules: Sequence[str] | None,
        on_apply: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.trainer = trainer
        self.module = module
        self.group_ratios = group_ratios  # taken at fit start, after this member is built
        self.rejuvenate_modules = rejuvenate_modules
        self.on_apply = on_apply

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device

    def training_state(self) -> dict[str, Any]:
        trainer = self.trainer
        return {
            "model": trainer.lightning_module.state_dict(),
            "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
            "lr_schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
            "lr_scheduler_types": [type(config.scheduler).__name__ for config in trainer.lr_scheduler_configs],
            "precision": trainer.precision_plugin.state_dict(),
            "callbacks": {key: averaging_state(callback) for key, callback in weight_averages(trainer.callbacks)},
        }

    def load_training_state(self, state: Mapping[str, Any], model_in_place: bool) -> None:
        trainer = self.trainer
        module = trainer.lightning_module
        averages = dict(weight_averages(trainer.callbacks))
        self._check_same_kind(state, averages)
        if not model_in_place:
            module.load_state_dict(state["model"])
        else:  # what arrived in the module's own parameters and buffers is there; the rest still needs loading
            rest = transfer.outside_module(module, state["model"])
            if rest:
                module.load_state_dict(rest, strict=False)
        for optimizer, optimizer_state in zip(trainer.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
        for config, scheduler_state in zip(trainer.lr_scheduler_configs, state["lr_schedulers"], strict=True):
            config.scheduler.load_state_dict(scheduler_state)
        if state["precision"]:
            trainer.precision_plugin.load_state_dict(state["precision"])
        for key, callback_state in state["callbacks"].items():
            load_averaging_state(averages[key], callback_state)

    def _check_same_kind(self, state: Mapping[str, Any], averages: Mapping[str, Callback]) -> None:
        """Before anything loads: the donor's LR schedulers and weight averages are this member's kinds."""
        schedulers = [type(config.scheduler).__name__ for config in self.trainer.lr_scheduler_configs]
        if state["lr_scheduler_types"] != schedulers:
            raise RuntimeError(
                f"PopulationBasedTraining: the donor's LR schedulers {state['lr_scheduler_types']} differ from this "
                f"member's {schedulers}, so their state cannot be copied (StochasticWeightAveraging swaps in its SWALR "
                "when it starts: with synchronous=False start it from the first epoch, swa_epoch_start=1)"
            )
        if sorted(averages) != sorted(state["callbacks"]):
            raise RuntimeError(
                f"PopulationBasedTraining: the donor's weight-averaging callbacks {sorted(state['callbacks'])} differ "
                f"from this member's {sorted(averages)}; every member must use the same callbacks"
            )

    def apply(self, hyperparameters: Mapping[str, Any]) -> None:
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        optimizers = self.trainer.optimizers
        apply_hyperparameters(hyperparameters, optimizers, schedulers, self.module, self.group_ratios())
        if self.on_apply is not None:
            self.on_apply(hyperparameters)

    def rejuvenate(self, seed: int) -> None:
        reset_weights(self.module, self.trainer.optimizers, seed=seed, modules=self.rejuvenate_modules)


# -- callbacks whose state moves with the weights ------------------------------------------------------
def weight_averages(callbacks: Sequence[Callback]) -> list[tuple[str, Callback]]:
    """The callbacks that hold model state, by ``state_key``: Lightning's weight averages
    (``WeightAveraging``, hence ``EMAWeightAveraging``, and ``StochasticWeightAveraging``). Their running
    average describes the weights a member holds, so it moves on an exploit with them; every other
    callback is per-member bookkeeping (checkpoint paths, loggers, early stopping) and stays.

    Args:
        callbacks: the Trainer's callbacks.
    """
    return [
        (callback.state_key, callback)
        for callback in callbacks
        if isinstance(callback, WeightAveraging | StochasticWeightAveraging)
    ]


def averaging_state(callback: Callback) -> dict[str, Any]:
    """The running average a weight-averaging callback holds: its averaged weights and how many updates
    they count (``WeightAveraging``: its ``AveragedModel``, whose state has both; SWA: its checkpoint
    state's average model and count). Its clock (the step or epoch of its last update) is not part of
    it: it follows the member's own steps, which an asynchronous exploit does not change.

    Args:
        callback: a weight-averaging callback (see :func:`weight_averages`).
    """
    if isinstance(callback, WeightAveraging):
        average = callback._average_model
        return {"average": None if average is None else average.state_dict()}
    state = callback.state_dict()
    return {"average": state["average_model_state"], "count": state["n_averaged"]}


def load_averaging_state(callback: Callback, state: Mapping[str, Any]) -> None:
    """Put a donor's running average (:func:`averaging_state`) into this member's callback; its clock stays.

    Args:
        callback: this member's weight-averaging callback.
        state: the donor's :func:`averaging_state` of the same callback.
    """
    if isinstance(callback, WeightAveraging):
        if callback._average_model is not None and state["average"] is not None:
            callback._average_model.load_state_dict(state["average"])
        return
    own = callback.state_dict()  # keeps this member's last update epoch and SWALR start state
    callback.load_state_dict({**own, "average_model_state": state["average"], "n_averaged": state["count"]})
    if callback.n_averaged is not None:  # SWA reads the count back only when it starts averaging
        callback.n_averaged.fill_(int(state["count"]))
