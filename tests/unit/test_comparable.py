"""The asynchronous decision compares members like with like (:mod:`lightning_pbt.algorithm.comparable`).

Hand-built populations where ranking the decider's fresh score against the others' latest records
picks the wrong loser and the wrong donor: a member that has just copied still shows the score of the
weights it threw away, and a member ahead shows a score from further in training. The rule leaves the
first out and compares the second at a progress not beyond the decider's. When the whole population has
scored at the decider's step, it carries out its part of lockstep's own plan instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from lightning_pbt.algorithm.comparable import Compared, Published, comparable_scores, decide_alone, in_step, score_at
from lightning_pbt.algorithm.exploit import TruncationSelection
from lightning_pbt.algorithm.explore import Explorer
from lightning_pbt.algorithm.scheduler import MemberPlan, PBTScheduler
from lightning_pbt.algorithm.space import LogUniform
from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed.ready_steps.base import PopulationBook
from lightning_pbt.distributed.ready_steps.lockstep import SynchronousReadySteps

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
    """Deciding alone (out of step: member 1 copied at an earlier ready step)."""
    others = {1: member(10, (10, 0.99), copied=True), 2: member(20, (20, 0.50))}
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


def population_at(step: int, n: int, seed: int) -> dict[int, Published]:
    """``n`` members that scored at ``step``, with different scores, histories and values; member ``n - 2``
    stopped at an earlier ready step, member ``n - 1`` diverged at this one."""
    g = np.random.default_rng(seed)
    hps = [{"lr": float(v)} for v in 10 ** g.uniform(-4, 0, size=n)]
    records = {}
    for m in range(n):
        history = tuple((at, float(g.uniform())) for at in range(step - 30, step + 1, 10))
        records[m] = Published(step, history[-1][1], hps[m], history)
    records[n - 2] = Published(step - 10, 0.99, hps[n - 2], records[n - 2].history[:-1], done=True)
    records[n - 1] = Published(step, None, hps[n - 1], records[n - 1].history[:-1])
    return records


def lockstep_plans(records: dict[int, Published], step: int, seed: int) -> dict[int, MemberPlan]:
    """What lockstep's own decision (``SynchronousReadySteps._decide``, population rank 0) plans for the same
    population: its book holds each member's history before this step, its all-gather this step's rows."""
    population, rows = {}, []
    for member, record in sorted(records.items()):
        stopped = record.done and record.step < step
        history = [score for _, score in record.history]
        if record.score is not None and not stopped:
            history = history[:-1]  # lockstep appends this step's score itself
        population[member] = {"hyperparameters": dict(record.hyperparameters), "history": history}
        score = math.nan if stopped or record.score is None else record.score
        rows.append([score, record.step, 0, 0, stopped, 0])  # a stopped member's row, as its finish() sends it
    steps = SynchronousReadySteps(
        population=None, topology=PopulationTopology(world_size=len(records), member_size=1, world_rank=0),
        namespace="ns", scheduler=PBTScheduler(SPACE, seed=seed), book=PopulationBook(population, {}),
        member=None, mode="max", monitor="val", seed=seed,
    )  # fmt: skip
    decision = steps._decide(dict(enumerate(torch.tensor(rows, dtype=torch.float64))))
    assert not decision.get("error"), decision
    return {int(member): MemberPlan.from_dict(plan) for member, plan in decision["plans"].items()}


@pytest.mark.parametrize("seed", range(5))
def test_every_member_that_sees_the_population_in_step_carries_out_lockstep_plan(seed: int) -> None:
    """Each member decides alone with its own stream (as AsynchronousReadySteps does), in any order: when
    all scored at its step (or stopped before), each carries out its part of the plan lockstep's own
    decision makes for the whole population. A member that copied at this step, or stopped right after it,
    still counts with the score it had while it serves the snapshot it scored with."""
    step, records = 40, population_at(40, n=8, seed=seed)
    lockstep = lockstep_plans(records, step, seed)
    assert any(plan.event == "exploit" for plan in lockstep.values())
    # The best member decides first and ends its run at this step (lockstep still ranks it, a donor, with
    # this step's score); member 6 has stopped before; member 7 diverged, and decides too.
    best = max(range(6), key=lambda m: records[m].score)
    for me in [best, 7, *(m for m in reversed(range(6)) if m != best)]:
        alone = PBTScheduler(SPACE, seed=seed)
        alone.use_member_stream(me)
        decision = decide_alone(alone, me, step, records[me], {m: r for m, r in records.items() if m != me})
        assert decision.in_step and decision.plan == lockstep[me]
        assert decision.compared[7] == Compared(step, None) and decision.compared[6].score is None
        copied = lockstep[me].event == "exploit"  # what the others see of it from now on
        records[me] = dataclasses.replace(records[me], copied=copied, done=me == best)


def test_out_of_step_the_member_decides_alone() -> None:
    records = population_at(40, n=4, seed=0)
    out_of_step = {
        "ahead": Published(50, 0.9, {"lr": 0.01}, ((40, 0.5), (50, 0.9))),
        "behind": Published(30, 0.9, {"lr": 0.01}, ((30, 0.9),)),
        # copied a snapshot 8 steps ahead of its own step once: its scores are further in training
        "ahead in progress": Published(40, 0.9, {"lr": 0.01}, ((48, 0.9),), progress=48, ready_progress=48),
        "no score yet": Published(0, None, {"lr": 0.01}, servable=False),
        # copied at step 40 and snapshotted since: it no longer serves what it scored with
        "copied, moved on": Published(40, 0.9, {"lr": 0.01}, ((40, 0.9),), progress=48, ready_progress=40, copied=True),
    }
    for record in out_of_step.values():
        others = {1: records[1], 2: record, 3: records[3]}
        assert not in_step(40, records[0], others)
        assert not decide_alone(scheduler(), 0, 40, records[0], others).in_step
    # Stopped right after scoring at step 40, or before it: lockstep sees it at step 40 too.
    for stopped in (Published(40, 0.9, {"lr": 0.01}, ((40, 0.9),), done=True), records[2]):
        assert in_step(40, records[0], {1: records[1], 2: stopped, 3: records[3]})


# -- a member ahead is never left without a comparison ------------------------------------------------


def _other_states(score: float) -> dict[str, Published]:
    """Every state another member's record can be in when the decider, far ahead at progress 400, decides;
    ``score`` is what it would count with where it counts at all."""
    hp = {"lr": 0.01}
    return {
        "scored": Published(100, score, hp, ((90, score - 1e-3), (100, score))),
        "scored, snapshot since": Published(100, score, hp, ((100, score),), progress=108, ready_progress=100),
        "stopped": Published(100, score, hp, ((100, score),), done=True),
        "copied, serves what it scored": Published(100, score, hp, ((100, score),), copied=True),
        "copied, snapshot since": Published(
            100, -5.0, hp, ((100, -5.0),), progress=140, ready_progress=100, copied=True, held=(130, score, 2)
        ),
        # counts with nothing: the decider's own weights, no snapshot yet, diverged, fresh weights snapshotted since
        "copied the decider, snapshot since": Published(
            100, -5.0, hp, ((100, -5.0),), progress=140, ready_progress=100, copied=True, held=(130, score, 0)
        ),
        "no snapshot": Published(0, None, hp, servable=False),
        "diverged": Published(100, None, hp, ((90, score),)),
        "rejuvenated, snapshot since": Published(
            100, score, hp, ((100, score),), progress=8, ready_progress=100, copied=True
        ),
    }


COUNTS = {"scored", "scored, snapshot since", "stopped", "copied, serves what it scored", "copied, snapshot since"}


@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("quantile", [0.25, 0.5])
def test_a_member_ahead_that_falls_behind_in_score_copies_whatever_state_the_others_are_in(
    mode: str, quantile: float
) -> None:
    """Exhaustive over the states of 3 other members (9^3 populations): the decider is far ahead (progress
    400 against 100-140) and its fresh score is worse than every score another member counts with. It
    copies one of those members at this very ready step whenever at least one of them counts with a score,
    even when every one of them copied since its last record (before, it then compared with nobody and kept
    its weights, however far its score fell); it keeps only when nobody has a score to compare with."""
    sign = 1.0 if mode == "max" else -1.0
    explorer = Explorer(SPACE, resample_probability=0.0)
    me = Published(400, sign * 0.1, {"lr": 0.6}, ((390, sign * 0.8), (400, sign * 0.1)))
    values = {1: sign * 0.5, 2: sign * 0.7, 3: sign * 0.6}
    states = {m: _other_states(values[m]) for m in values}
    for names in itertools.product(states[1], repeat=3):
        others = {m: states[m][name] for m, name in zip(values, names, strict=True)}
        rule = PBTScheduler(SPACE, mode=mode, seed=0, quantile_fraction=quantile, explorer=explorer)
        rule.use_member_stream(0)
        decision = decide_alone(rule, 0, 400, me, others)
        counted = {m for m, name in zip(values, names, strict=True) if name in COUNTS}
        kept_in = {m for m in counted if not others[m].copied}  # the members that copied come back only alone
        ranked = {m for m, seen in decision.compared.items() if m != 0 and seen.score is not None}
        assert not decision.in_step
        assert ranked == (kept_in or counted), names
        assert all(decision.compared[m].score == values[m] for m in ranked), names
        # A member without a score (no snapshot yet, diverged) ranks last, as in lockstep: it takes the
        # bottom places of truncation before the decider does.
        unscored = sum(seen.score is None for seen in decision.compared.values())
        if counted and unscored < TruncationSelection(quantile).quantile_size(len(decision.compared)):
            assert decision.plan.event == "exploit" and decision.plan.parent in ranked, names
        else:
            assert decision.plan.event == "keep", names


def test_the_first_member_to_run_ahead_copies_within_one_ready_step_of_falling_behind() -> None:
    """The digits run of issue 33, as records: member 0 runs 4x faster than the others and scores best at
    first, so each of them copies it at its ready step (and shows ``copied`` until its next one, 4 of member
    0's intervals later). Member 0's score falls below theirs at its step 50; it copies one of them at that
    very ready step, and not before."""
    hp = {"lr": 0.01}
    others = {m: Published(20, score, hp, ((20, score),), copied=True) for m, score in {1: 0.5, 2: 0.7, 3: 0.6}.items()}
    rule = scheduler()
    rule.use_member_stream(0)
    history: list[tuple[int, float]] = []
    events = {}
    for step in range(30, 90, 10):
        score = 0.9 if step < 50 else 0.05  # diverged between step 40 and 50
        history.append((step, score))
        me = Published(step, score, {"lr": 0.6}, tuple(history))
        decision = decide_alone(rule, 0, step, me, others)
        events[step] = (decision.plan.event, decision.plan.parent)
        if decision.plan.event == "exploit":
            break
    assert events == {30: ("keep", 0), 40: ("keep", 0), 50: ("exploit", 2)}
