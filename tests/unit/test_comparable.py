"""The asynchronous decision compares members like with like (:mod:`lightning_pbt.comparable`).

Hand-built populations where ranking the decider's fresh score against the others' latest (older or
newer) records picks the wrong loser or the wrong donor; the rule compares each member at a step not
beyond the decider's, shifted by the decider's own progress since.
"""

from __future__ import annotations

import math

import pytest

from lightning_pbt.comparable import Compared, Published, comparable_scores, decide_alone, score_at
from lightning_pbt.explore import Explorer
from lightning_pbt.scheduler import PBTScheduler
from lightning_pbt.space import LogUniform

SPACE = {"lr": LogUniform(1e-4, 1.0)}


def scheduler(quantile: float = 0.25) -> PBTScheduler:
    explorer = Explorer(SPACE, resample_probability=0.0)
    return PBTScheduler(SPACE, mode="max", seed=0, quantile_fraction=quantile, explorer=explorer)


def member(step: int, *history: tuple[int, float], lr: float = 0.01, **kwargs) -> Published:
    return Published(step, history[-1][1] if history else None, {"lr": lr}, tuple(history), **kwargs)


# The decider, member 0, at step 20: 0.60 at step 10, 0.70 now.
ME = member(20, (10, 0.60), (20, 0.70))


def test_a_decider_ahead_of_a_stale_member_is_the_loser_at_comparable_progress() -> None:
    """Member 1 lags at step 10 with 0.69: below the decider's fresh 0.70 (so the old rule makes member 1
    the loser and the decider keeps), but at step 10 it led the decider by 0.09."""
    others = {
        1: member(10, (10, 0.69)),
        2: member(30, (20, 0.80), (30, 0.85), lr=0.1),  # at step 20: 0.80
        3: member(20, (10, 0.50), (20, 0.75)),
    }
    old = decide_alone(scheduler(), 0, 20, ME, others, like_with_like=False)
    assert old.plan.event == "keep"
    new = decide_alone(scheduler(), 0, 20, ME, others)
    assert (new.plan.event, new.plan.parent) == ("exploit", 2)
    assert new.compared[1].step == 10 and new.compared[1].ranked == pytest.approx(0.79)
    assert new.compared[2].step == 20 and new.compared[2].score == 0.80  # not its step-30 score


def test_the_donor_is_the_best_at_comparable_progress_not_the_member_furthest_ahead() -> None:
    """Member 2 is ahead (0.80 at step 30) but scored 0.60 at the decider's step 20; member 1 lags at step
    10 with 0.70, 0.25 above the decider then. Both rules make the decider the loser; the donor differs."""
    me = member(20, (10, 0.45), (20, 0.50))
    others = {1: member(10, (10, 0.70)), 2: member(30, (20, 0.60), (30, 0.80)), 3: member(20, (20, 0.55))}
    assert decide_alone(scheduler(), 0, 20, me, others, like_with_like=False).plan.parent == 2
    new = decide_alone(scheduler(), 0, 20, me, others)
    assert (new.plan.event, new.plan.parent) == ("exploit", 1)
    assert {m: c.step for m, c in new.compared.items()} == {0: 20, 1: 10, 2: 20, 3: 20}
    assert {m: c.ranked for m, c in new.compared.items()} == pytest.approx({0: 0.50, 1: 0.75, 2: 0.60, 3: 0.55})


def test_a_donor_whose_latest_snapshot_scores_below_the_decider_is_not_copied() -> None:
    """Member 1 led at step 10 but its snapshot (0.62, step 10) is worse than what the decider holds (0.70):
    copying it would throw away the decider's progress."""
    others = {1: member(10, (10, 0.62)), 2: member(10, (10, 0.58)), 3: member(10, (10, 0.60))}
    me = member(20, (10, 0.50), (20, 0.70))
    decision = decide_alone(scheduler(), 0, 20, me, others)
    assert decision.compared[1].ranked == pytest.approx(0.82)  # the decider is last at comparable progress
    assert decision.plan.event == "keep"
    assert decision.plan.mutations == ("member 1's latest snapshot scores below this member's; kept",)


def test_a_member_whose_latest_score_is_nan_ranks_last_and_is_never_a_donor() -> None:
    nan_now = Published(20, None, {"lr": 0.9}, ((10, 0.99),))  # finite before, diverged since
    others = {1: nan_now, 2: member(20, (20, 0.80)), 3: member(20, (20, 0.75))}
    decision = decide_alone(scheduler(0.5), 0, 20, member(20, (20, 0.10)), others)
    assert decision.compared[1] == Compared(20, None, None)
    assert (decision.plan.event, decision.plan.parent) in {("exploit", 2), ("exploit", 3)}
    # A diverged decider copies whatever its history said: no shift, no donor check.
    diverged = decide_alone(scheduler(), 0, 20, Published(20, None, {"lr": 0.5}, ((10, 0.9),)), others)
    assert (diverged.plan.event, diverged.plan.parent) == ("exploit", 2)


def test_a_member_without_a_snapshot_yet_is_compared_as_no_score() -> None:
    others = {1: member(0, servable=False), 2: member(20, (20, 0.8))}
    assert comparable_scores(0, 20, ME, others)[1].ranked is None


def test_steps_beyond_the_kept_history_fall_back_to_the_nearest_score_without_shift() -> None:
    far_ahead = member(500, (400, 0.9), (500, 0.95))  # nothing kept at or before step 20
    no_own_past = member(20, (20, 0.7))  # the decider knows nothing of itself at step 10
    seen = comparable_scores(0, 20, no_own_past, {1: far_ahead, 2: member(10, (10, 0.6))})
    assert (seen[1].step, seen[1].ranked) == (400, 0.9)
    assert (seen[2].step, seen[2].ranked) == (10, 0.6)


def test_score_at_takes_the_latest_entry_not_beyond_the_step() -> None:
    history = ((10, 0.1), (20, 0.2), (20, 0.25), (30, 0.3))
    assert score_at(history, 9) is None
    assert score_at(history, 10) == (10, 0.1)
    assert score_at(history, 29) == (20, 0.25)  # two scores at one step (an old checkpoint): the last
    assert score_at(history, 100) == (30, 0.3)


def test_min_mode_shifts_by_the_deciders_own_change() -> None:
    me = Published(20, 1.0, {"lr": 0.01}, ((10, 2.0), (20, 1.0)))  # a loss, falling
    seen = comparable_scores(0, 20, me, {1: Published(10, 1.5, {"lr": 0.01}, ((10, 1.5),))})
    assert seen[1].ranked == pytest.approx(0.5) and math.isclose(seen[0].ranked, 1.0)
