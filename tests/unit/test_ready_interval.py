"""When the callback has a ready step (its real hook, in single-process fits), and what it says when a fit
gave it none (no process group)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_pbt import LogUniform, PopulationBasedTraining
from lightning_pbt.algorithm.scheduler import MemberPlan
from lightning_pbt.distributed.ready_steps.base import Observation, ReadyStepResult
from lightning_pbt.plugin.readiness import epochs_completed


def callback(**kwargs) -> PopulationBasedTraining:
    pbt = PopulationBasedTraining({"lr": LogUniform(1e-3, 0.1)}, monitor="val_acc", **kwargs)
    pbt._strategy = SimpleNamespace(world_rank=0)
    return pbt


class ReadyStepsOnRecord:
    """Stands in for the ready-step protocol: records the steps the callback's hook calls it at and, as
    every protocol does, moves the book on."""

    def __init__(self, book) -> None:
        self.book, self.steps = book, []

    def step(self, observation: Observation) -> ReadyStepResult:
        self.steps.append(observation.step)
        self.book.ready_count += 1
        self.book.last_ready_step = observation.step
        return ReadyStepResult(observation.step, {}, MemberPlan(0, "keep", 0, {}), {})


class Forward(pl.Callback):
    """Lightning refuses PopulationBasedTraining without PopulationStrategy at setup: call its real
    validation hook from here, in a single-process fit."""

    def __init__(self, pbt: PopulationBasedTraining) -> None:
        self.pbt = pbt

    def on_validation_end(self, trainer, pl_module) -> None:
        self.pbt.on_validation_end(trainer, pl_module)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", float(self.global_step))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Stream(IterableDataset):
    """A dataset without a length: Lightning cannot know where an epoch ends before it does."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def __iter__(self):
        return iter([(torch.zeros(2),)] * self.batches)


def ready_steps(pbt: PopulationBasedTraining, batches: int, stream: bool = False, **trainer_kwargs) -> list[int]:
    """The global steps at which a real ``fit`` (``batches`` training batches per epoch) reaches a ready
    step through the callback's own ``on_validation_end``."""
    protocol = ReadyStepsOnRecord(pbt.book)
    pbt._protocol = protocol
    data = DataLoader(Stream(batches) if stream else TensorDataset(torch.zeros(batches, 2)), batch_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[Forward(pbt)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few workers, small batches: Lightning's advice is not the point
        trainer.fit(Tiny(), data, data)
    return protocol.steps


def test_without_an_interval_every_validation_end_is_a_ready_step():
    steps = ready_steps(callback(), 20, max_steps=40, val_check_interval=5, check_val_every_n_epoch=None)
    assert steps == list(range(5, 41, 5))


def test_every_n_epochs_is_ready_at_an_epochs_last_validation_never_a_mid_epoch_one():
    # 41 batches, val_check_interval=0.5: validations after batches 20 and 40 of each epoch, none at its
    # last batch. Counting the epoch only at its last batch would ready at the next epoch's first
    # validation instead (steps 61, 102).
    assert ready_steps(callback(every_n_epochs=1), 41, max_epochs=3, val_check_interval=0.5) == [40, 81, 122]
    assert ready_steps(callback(every_n_epochs=2), 41, max_epochs=4, val_check_interval=0.5) == [81, 163]
    # One validation per epoch, after batch 21 of 41: the next (batch 42) is beyond the epoch.
    assert ready_steps(callback(every_n_epochs=1), 41, max_epochs=3, val_check_interval=21) == [21, 62, 103]


def test_every_n_epochs_counts_completed_epochs_at_validation_ends():
    every_5 = {"val_check_interval": 5, "check_val_every_n_epoch": None}
    assert ready_steps(callback(every_n_epochs=1), 20, max_steps=60, **every_5) == [20, 40, 60]
    assert ready_steps(callback(every_n_epochs=2), 20, max_steps=80, **every_5) == [40, 80]
    # check_val_every_n_epoch=3 with every_n_epochs=2: the first validation at least 2 epochs later.
    every_third = ready_steps(callback(every_n_epochs=2), 4, max_epochs=12, check_val_every_n_epoch=3)
    assert every_third == [12, 24, 36, 48]
    # An epoch of unknown length validates at its last batch, which completes it.
    assert ready_steps(callback(every_n_epochs=1), 7, stream=True, max_epochs=3) == [7, 14, 21]


def test_every_n_train_steps_takes_the_first_validation_far_enough():
    steps = ready_steps(
        callback(every_n_train_steps=12), 20, max_steps=60, val_check_interval=5, check_val_every_n_epoch=None
    )
    assert steps == [15, 30, 45, 60]


def test_the_first_every_n_train_steps_ready_step_is_n_steps_after_the_start():
    """Validation every 3 steps, ``every_n_train_steps=10``: the first ready step is the first validation at
    least 10 steps after the start (12), not the validation at step 9 (counting from the "no ready step
    yet" marker, -1, would make 9 - (-1) = 10 enough and shift the whole schedule: 9, 21, ...)."""
    steps = ready_steps(
        callback(every_n_train_steps=10), 40, max_steps=36, val_check_interval=3, check_val_every_n_epoch=None
    )
    assert steps == [12, 24, 36]


def test_epochs_completed_when_the_next_validation_is_unknown():
    # An epoch of unknown length (an iterable dataset) or time-based validation: only its last batch ends it.
    assert epochs_completed(2, False, 40, float("inf"), 20) == 2
    assert epochs_completed(2, False, 40, 41, None) == 2
    assert epochs_completed(2, True, 41, float("inf"), None) == 3
    assert epochs_completed(2, False, 21, 41, 20) == 2  # a validation at batch 41 follows
    assert epochs_completed(2, False, 22, 41, 20) == 3  # the next would be at batch 42: none follows


@pytest.mark.parametrize(
    ("seen", "monitor", "ready", "message"),
    [
        (0, False, 0, "no validation ran during this fit"),
        (3, False, 0, "never logged 'val_acc'"),
        (3, True, 0, "no ready step happened (every_n_epochs=50"),
    ],
)
def test_a_fit_without_ready_steps_says_why_once_on_population_rank_0(seen, monitor, ready, message):
    pbt = callback(every_n_epochs=50)
    pbt._validations, pbt._monitor_seen = seen, monitor
    with pytest.warns(UserWarning, match="PopulationBasedTraining did nothing") as caught:
        pbt._warn_if_idle(None)
    assert len(caught) == 1 and message in str(caught[0].message)
    pbt._strategy = SimpleNamespace(world_rank=1)  # any other rank: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pbt._warn_if_idle(None)


def test_a_fit_with_a_ready_step_is_silent():
    pbt = callback()
    pbt._validations, pbt._monitor_seen = 4, True
    pbt.book.ready_count = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pbt._warn_if_idle(None)
