"""PBTScheduler: determinism, burn-in, resume, initial values, rejuvenation, plan invariants."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lightning_pbt.algorithm.exploit import BinaryTournament, TruncationSelection, WelchTTest
from lightning_pbt.algorithm.explore import Explorer
from lightning_pbt.algorithm.scheduler import MemberPlan, MemberSnapshot, PBTScheduler
from lightning_pbt.algorithm.space import Choice, IntUniform, LogUniform, Uniform

SPACE = {
    "lr": LogUniform(1e-4, 1.0),
    "dropout": Uniform(0.0, 0.5),
    "layers": IntUniform(1, 8),
    "optimizer": Choice(("adam", "sgd")),
}


def population(scheduler: PBTScheduler, n: int = 8, seed: int = 0, **overrides) -> list[MemberSnapshot]:
    g = np.random.default_rng(seed)
    return [
        MemberSnapshot(
            m,
            float(g.normal()),
            scheduler.initial_hyperparameters(m),
            tuple(float(v) for v in g.normal(size=5)),
            **overrides.get(m, {}),
        )
        for m in range(n)
    ]


def run(scheduler: PBTScheduler, steps: int = 5) -> list[dict[int, MemberPlan]]:
    return [scheduler.plan(10 * (i + 1), population(scheduler, seed=i)) for i in range(steps)]


def test_same_seed_same_plans_different_seed_differs() -> None:
    assert run(PBTScheduler(SPACE, seed=1)) == run(PBTScheduler(SPACE, seed=1))
    assert run(PBTScheduler(SPACE, seed=1)) != run(PBTScheduler(SPACE, seed=2))


def test_a_population_plan_draws_from_its_steps_own_stream() -> None:
    """Lockstep's plan at a step is a function of (seed, step, snapshots): an asynchronous member that sees
    the same population at that step computes it too, whatever it planned before."""
    planned_before, fresh = PBTScheduler(SPACE, seed=3), PBTScheduler(SPACE, seed=3)
    run(planned_before, steps=3)
    snaps = population(fresh, seed=9)
    assert planned_before.plan(40, snaps) == fresh.plan(40, snaps)
    assert fresh.plan(40, snaps) != fresh.plan(50, snaps)  # another step, other draws
    # A member's own running stream (asynchronous, deciding alone) moves on with every plan.
    member = PBTScheduler(SPACE, seed=3)
    member.use_member_stream(1)
    assert member.plan(40, snaps) != member.plan(40, snaps)
    assert member.plan(40, snaps, rng=member.population_stream(40)) == fresh.plan(40, snaps)


def test_a_resumed_member_keeps_drawing_from_its_own_stream() -> None:
    """An asynchronous member's state says it draws from its own running stream: a resumed member goes on
    with that stream (not its steps' shared one, which would correlate the members' decisions)."""
    member = PBTScheduler(SPACE, seed=3)
    member.use_member_stream(2)
    member.plan(40, population(member, seed=1))
    state = json.loads(json.dumps(member.state_dict()))
    snaps = population(member, seed=9)
    expected = [member.plan(50, snaps), member.plan(60, snaps)]
    resumed = PBTScheduler(SPACE, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.plan(50, snaps), resumed.plan(60, snaps)] == expected
    assert PBTScheduler(SPACE, seed=3).plan(50, snaps) != expected[0]  # the shared stream draws otherwise


def test_plan_covers_every_member_once_with_consistent_parents() -> None:
    scheduler = PBTScheduler(SPACE, exploit="truncation", quantile_fraction=0.25)
    snaps = population(scheduler, n=8)
    plans = scheduler.plan(10, snaps)
    assert sorted(plans) == list(range(8)) and all(plans[m].member == m for m in plans)
    by_member = {s.member: s for s in snaps}
    exploits = {m: p for m, p in plans.items() if p.event == "exploit"}
    assert len(exploits) == 2
    for m, p in plans.items():
        if p.event == "keep":
            assert p.parent == m and p.hyperparameters == dict(by_member[m].hyperparameters)
            assert p.mutations == ()
        else:
            assert p.parent != m and p.parent not in exploits
            assert all(SPACE[k].contains(v) for k, v in p.hyperparameters.items())
            assert len(p.mutations) == len(SPACE)


def test_burn_in_keeps_everyone_without_moving_the_rng() -> None:
    with_burn_in = PBTScheduler(SPACE, burn_in=20, seed=3)
    fresh = PBTScheduler(SPACE, seed=3)
    snaps = population(fresh)
    for step in (0, 10, 19):
        assert all(p.event == "keep" for p in with_burn_in.plan(step, snaps).values())
    assert with_burn_in.plan(20, snaps) == fresh.plan(20, snaps)


def test_state_dict_round_trip_continues_the_same_stream() -> None:
    scheduler = PBTScheduler(SPACE, seed=4)
    scheduler.plan(10, population(scheduler, seed=0))
    state = json.loads(json.dumps(scheduler.state_dict()))
    expected = scheduler.plan(20, population(scheduler, seed=1))
    resumed = PBTScheduler(SPACE, seed=4)
    resumed.plan(10, population(resumed, seed=7))  # a different history: the state must override it
    resumed.load_state_dict(state)
    assert resumed.plan(20, population(resumed, seed=1)) == expected

    def plain(value: object) -> bool:  # what torch.load(weights_only=True) accepts
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (int, float, str, bool)

    assert plain(scheduler.state_dict())


def test_load_state_dict_rejects_foreign_states() -> None:
    scheduler = PBTScheduler(SPACE)
    with pytest.raises(ValueError, match="not a PBTScheduler state_dict"):
        scheduler.load_state_dict({"epoch": 3})
    with pytest.raises(ValueError, match="version 99"):
        scheduler.load_state_dict({**scheduler.state_dict(), "version": 99})
    state = scheduler.state_dict()
    state["rng"]["bit_generator"] = "MT19937"
    with pytest.raises(ValueError, match="holds a 'MT19937' generator, expected 'PCG64'"):
        scheduler.load_state_dict(state)


def test_initial_hyperparameters_depend_on_seed_and_member_only() -> None:
    a, b = PBTScheduler(SPACE, seed=5), PBTScheduler(SPACE, seed=5)
    first = [a.initial_hyperparameters(m) for m in range(4)]
    b.plan(10, population(b, n=16))  # the plan stream and a bigger population change nothing
    assert [b.initial_hyperparameters(m) for m in range(4)] == first
    assert [b.initial_hyperparameters(m) for m in reversed(range(4))] == first[::-1]
    assert len({json.dumps(v, sort_keys=True) for v in first}) == 4
    assert PBTScheduler(SPACE, seed=6).initial_hyperparameters(0) != first[0]
    assert list(first[0]) == list(SPACE) and all(SPACE[k].contains(v) for k, v in first[0].items())


def test_start_values_override_and_are_validated() -> None:
    scheduler = PBTScheduler(SPACE, seed=5)
    values = scheduler.initial_hyperparameters(2, {"lr": 0.1, "layers": 3})
    sampled = scheduler.initial_hyperparameters(2)
    assert values == {**sampled, "lr": 0.1, "layers": 3}
    assert type(scheduler.initial_hyperparameters(0, {"dropout": 0})["dropout"]) is float
    with pytest.raises(ValueError, match=r"lr: start value 2.0 is outside LogUniform"):
        scheduler.initial_hyperparameters(0, {"lr": 2.0})
    with pytest.raises(ValueError, match="start value for unknown hyperparameter 'momentum'"):
        scheduler.initial_hyperparameters(0, {"momentum": 0.9})


@pytest.mark.parametrize(
    ("history", "mode", "expected"),
    [
        ((0.5, 0.6, 0.6, 0.55), "max", True),  # best before the last 2 is 0.6: not beaten
        ((0.5, 0.6, 0.6, 0.61), "max", False),
        ((0.5, 0.6, 0.61), "max", False),
        ((0.6, 0.6), "max", False),  # too short to judge
        ((math.nan, 0.6, 0.5), "max", False),  # nothing finite before the window
        ((0.7, math.nan, math.nan), "max", True),
        ((0.5, 0.4, 0.4, 0.45), "min", True),
        ((0.5, 0.4, 0.4, 0.39), "min", False),
    ],
)
def test_should_rejuvenate(history: tuple[float, ...], mode: str, expected: bool) -> None:
    assert PBTScheduler(SPACE, mode=mode, rejuvenate_patience=2).should_rejuvenate(history) is expected
    assert PBTScheduler(SPACE, mode=mode).should_rejuvenate(history) is False


def test_rejuvenation_in_plans() -> None:
    scheduler = PBTScheduler(SPACE, exploit=TruncationSelection(0.25), rejuvenate_patience=2)
    stale = (0.5, 0.6, 0.6, 0.55)
    hp = scheduler.initial_hyperparameters(0)
    snaps = [
        MemberSnapshot(0, 0.9, hp, stale),  # best: never rejuvenated
        MemberSnapshot(1, 0.6, hp, stale),  # stale: rejuvenated
        MemberSnapshot(2, 0.6, hp, stale, can_exploit=False),  # finished: never touched
        MemberSnapshot(3, 0.5, hp, (0.1, 0.2, 0.3, 0.4)),  # improving: kept
        MemberSnapshot(4, 0.1, hp, stale),  # worst: exploits instead
    ]
    plans = scheduler.plan(10, snaps)
    assert {m: p.event for m, p in plans.items()} == {
        0: "keep",
        1: "rejuvenate",
        2: "keep",
        3: "keep",
        4: "exploit",
    }
    assert plans[1].parent == 1 and plans[1].hyperparameters == hp
    assert plans[1].mutations == ("weights re-initialised",)


def test_can_exploit_false_members_donate_but_are_never_replaced() -> None:
    scheduler = PBTScheduler(SPACE, quantile_fraction=0.5)
    hp = scheduler.initial_hyperparameters(0)
    snaps = [
        MemberSnapshot(0, 1.0, hp, can_exploit=False),  # best, finished
        MemberSnapshot(1, 0.5, hp),
        MemberSnapshot(2, math.nan, hp, can_exploit=False),  # diverged but finished
        MemberSnapshot(3, 0.1, hp),
    ]
    for _ in range(10):
        plans = scheduler.plan(10, snaps)
        assert plans[0].event == "keep" and plans[2].event == "keep"
        assert plans[3].event == "exploit" and plans[3].parent in (0, 1)


def test_nan_member_is_replaced() -> None:
    scheduler = PBTScheduler(SPACE, exploit="tournament")
    hp = scheduler.initial_hyperparameters(0)
    snaps = [MemberSnapshot(0, math.nan, hp), MemberSnapshot(1, 0.2, hp), MemberSnapshot(2, None, hp)]
    plans = scheduler.plan(10, snaps)
    assert plans[0].event == plans[2].event == "exploit" and plans[0].parent == plans[2].parent == 1


def test_duplicate_member_ids_and_empty_population() -> None:
    scheduler = PBTScheduler(SPACE)
    hp = scheduler.initial_hyperparameters(0)
    with pytest.raises(ValueError, match="duplicate member id 1"):
        scheduler.plan(10, [MemberSnapshot(1, 0.1, hp), MemberSnapshot(1, 0.2, hp)])
    assert scheduler.plan(10, []) == {}


def test_member_plan_dict_round_trip() -> None:
    plan = MemberPlan(3, "exploit", 1, {"lr": 0.1, "optimizer": None}, ("lr: 0.2 -> 0.1 (x0.5)",))
    data = json.loads(json.dumps(plan.to_dict()))
    assert MemberPlan.from_dict(data) == plan
    with pytest.raises(ValueError, match="event must be one of"):
        MemberPlan(0, "swap", 0, {})
    with pytest.raises(ValueError, match="a 'keep' plan has parent = member"):
        MemberPlan(0, "keep", 1, {})


def test_exploit_options() -> None:
    assert PBTScheduler(SPACE, quantile_fraction=0.5).exploit == TruncationSelection(0.5)
    assert PBTScheduler(SPACE, exploit="tournament", quantile_fraction=0.5).exploit == BinaryTournament()
    assert PBTScheduler(SPACE, exploit=WelchTTest(window=3)).exploit == WelchTTest(window=3)
    with pytest.raises(ValueError, match="quantile_fraction must be in"):
        PBTScheduler(SPACE, quantile_fraction=0.7)


def test_space_from_config_and_explorer() -> None:
    scheduler = PBTScheduler({"lr": {"type": "loguniform", "low": 1e-3, "high": 1.0}, "act": ["a", "b"]})
    assert scheduler.space == {"lr": LogUniform(1e-3, 1.0), "act": Choice(("a", "b"))}
    explorer = Explorer(scheduler.space, resample_probability=1.0)
    assert PBTScheduler(scheduler.space, explorer=explorer).explorer is explorer
    with pytest.raises(ValueError, match="explorer space"):
        PBTScheduler(SPACE, explorer=explorer)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "maximize"}, "mode must be 'min' or 'max', got 'maximize'"),
        ({"burn_in": -1}, "burn_in must be an integer >= 0, got -1"),
        ({"rejuvenate_patience": 0}, "rejuvenate_patience must be None or an integer >= 1, got 0"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
        ({"exploit": "best"}, "unknown exploit rule 'best'"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PBTScheduler(SPACE, **kwargs)
