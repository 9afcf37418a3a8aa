"""The asynchronous decision compares members like with like (:mod:`lightning_pbt.comparable`).

Hand-built populations where ranking the decider's fresh score against the others' latest records
picks the wrong loser and the wrong donor: a member that has just copied still shows the score of the
weights it threw away, and a member ahead shows a score from further in training. The rule leaves the
first out and compares the second at a progress not beyond the decider's.
"""

from __future__ import annotations

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


def test_stale_records_pick_the_wrong_loser_and_donor() -> None:
    """Member 1 copied a donor at its last ready step: its record still shows the 0.30 it threw away.
    Member 2 is ahead: 0.95 at step 30, but 0.72 at the decider's step 20. Ranked on the latest records,
    member 1 is the loser (the decider keeps) and member 2 the donor; at comparable progress, with member 1
    left out, the decider is last of three and member 3 (0.80 at step 20) is the donor."""
    others = {
        1: member(20, (20, 0.30), copied=True),
        2: member(30, (20, 0.72), (30, 0.95)),
        3: member(20, (10, 0.50), (20, 0.80)),
    }
    old = decide_alone(scheduler(), 0, 20, ME, others, like_with_like=False)
    assert old.plan.event == "keep"
    assert old.compared[1].score == 0.30 and old.compared[2].score == 0.95
    new = decide_alone(scheduler(), 0, 20, ME, others)
    assert (new.plan.event, new.plan.parent) == ("exploit", 3)
    assert new.compared == {0: Compared(20, 0.70), 2: Compared(20, 0.72), 3: Compared(20, 0.80)}


def test_the_donor_is_the_best_at_comparable_progress_not_the_member_furthest_ahead() -> None:
    me = member(20, (10, 0.45), (20, 0.50))
    others = {1: member(20, (20, 0.70)), 2: member(30, (20, 0.60), (30, 0.80)), 3: member(20, (20, 0.55))}
    assert decide_alone(scheduler(), 0, 20, me, others, like_with_like=False).plan.parent == 2
    new = decide_alone(scheduler(), 0, 20, me, others)
    assert (new.plan.event, new.plan.parent) == ("exploit", 1)


def test_progress_counts_the_steps_a_copied_snapshot_had_trained() -> None:
    """Member 1 copied a step-30 snapshot at its own step 10: its history is on the donor's progress, so
    the decider (progress 20) compares its 0.60 at progress 20, not its step-30 0.80."""
    copied_ahead = Published(10, 0.80, {"lr": 0.01}, ((20, 0.60), (30, 0.80)), progress=30)
    assert comparable_scores(0, ME, {1: copied_ahead})[1] == Compared(20, 0.60)
    # The decider's own progress counts too: at progress 30 it sees member 1's latest.
    ahead_me = Published(20, 0.70, {"lr": 0.01}, ((30, 0.70),), progress=30)
    assert comparable_scores(0, ahead_me, {1: copied_ahead}) == {0: Compared(30, 0.70), 1: Compared(30, 0.80)}


def test_a_member_that_copied_is_neither_loser_nor_donor_until_it_publishes_again() -> None:
    others = {1: member(20, (20, 0.99), copied=True), 2: member(20, (20, 0.50))}
    decision = decide_alone(scheduler(0.5), 0, 20, ME, others)
    assert set(decision.compared) == {0, 2} and decision.plan.event == "keep"


def test_a_member_whose_latest_score_is_nan_ranks_last_and_is_never_a_donor() -> None:
    nan_now = Published(20, None, {"lr": 0.9}, ((10, 0.99),))  # finite before, diverged since
    others = {1: nan_now, 2: member(20, (20, 0.80)), 3: member(20, (20, 0.75))}
    decision = decide_alone(scheduler(0.5), 0, 20, member(20, (20, 0.10)), others)
    assert decision.compared[1] == Compared(20, None)
    assert (decision.plan.event, decision.plan.parent) in {("exploit", 2), ("exploit", 3)}
    # A diverged decider is replaced by the best member.
    diverged = decide_alone(scheduler(), 0, 20, Published(20, None, {"lr": 0.5}, ((10, 0.9),)), others)
    assert (diverged.plan.event, diverged.plan.parent) == ("exploit", 2)


def test_a_member_without_a_snapshot_yet_is_compared_as_no_score() -> None:
    others = {1: member(0, servable=False), 2: member(20, (20, 0.8))}
    assert comparable_scores(0, ME, others)[1].score is None


def test_a_member_ahead_beyond_its_kept_history_gives_its_oldest_kept_score() -> None:
    far_ahead = member(500, (400, 0.9), (500, 0.95))  # nothing kept at or before progress 20
    assert comparable_scores(0, ME, {1: far_ahead})[1] == Compared(400, 0.9)


def test_score_at_takes_the_latest_entry_not_beyond_the_step() -> None:
    history = ((10, 0.1), (20, 0.2), (20, 0.25), (30, 0.3))
    assert score_at(history, 9) is None
    assert score_at(history, 10) == (10, 0.1)
    assert score_at(history, 29) == (20, 0.25)  # two scores at one step (an old checkpoint): the last
    assert score_at(history, 100) == (30, 0.3)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_both_modes_rank_the_comparable_scores(mode: str) -> None:
    sign = 1 if mode == "max" else -1
    me = Published(20, sign * 0.5, {"lr": 0.01}, ((20, sign * 0.5),))
    others = {1: Published(30, sign * 0.9, {"lr": 0.01}, ((20, sign * 0.4), (30, sign * 0.9)))}
    plan = decide_alone(PBTScheduler(SPACE, mode=mode, seed=0), 0, 20, me, others).plan
    assert plan.event == "keep"  # at step 20 member 1 was worse; its 0.9 at step 30 does not count
