"""When the callback has a ready step, and what it says when a fit gave it none (no process group)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest

from lightning_pbt import LogUniform, PopulationBasedTraining


def callback(**kwargs) -> PopulationBasedTraining:
    pbt = PopulationBasedTraining({"lr": LogUniform(1e-3, 0.1)}, monitor="val_acc", **kwargs)
    pbt._strategy = SimpleNamespace(world_rank=0)
    return pbt


def validations(pbt: PopulationBasedTraining, ends: list[tuple[int, int, bool]]) -> list[int]:
    """The global steps of ``ends`` (global step, epoch, at the epoch's last batch) that are ready steps."""
    ready = []
    for step, epoch, last in ends:
        trainer = SimpleNamespace(global_step=step, current_epoch=epoch, is_last_batch=last)
        if pbt._is_ready(trainer):
            ready.append(step)
            pbt.book.last_ready_step = step
            pbt.book.last_ready_epochs = epoch + int(last)
    return ready


# val_check_interval=5 in epochs of 20 steps: validation every 5 steps, an epoch end every 20.
EVERY_5 = [(s, (s - 1) // 20, s % 20 == 0) for s in range(5, 101, 5)]


def test_without_an_interval_every_validation_end_is_a_ready_step():
    assert validations(callback(), EVERY_5) == list(range(5, 101, 5))
    # Two validations at one global step (e.g. at an epoch's end) are one ready step.
    assert validations(callback(), [(5, 0, False), (5, 0, True), (10, 0, False)]) == [5, 10]


def test_every_n_epochs_counts_completed_epochs_at_validation_ends():
    assert validations(callback(every_n_epochs=1), EVERY_5) == [20, 40, 60, 80, 100]
    assert validations(callback(every_n_epochs=2), EVERY_5) == [40, 80]
    # check_val_every_n_epoch=3 with every_n_epochs=2: the first validation at least 2 epochs later.
    every_third_epoch = [(60 * k, 3 * k - 1, True) for k in range(1, 5)]
    assert validations(callback(every_n_epochs=2), every_third_epoch) == [60, 120, 180, 240]


def test_every_n_train_steps_takes_the_first_validation_far_enough():
    assert validations(callback(every_n_train_steps=12), EVERY_5) == [15, 30, 45, 60, 75, 90]


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
