"""PB2 explore: observations from snapshots, in-domain proposals, determinism, resume, fallback, the GP's
preferences, batches, and selection from the callback and Hydra."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_pbt.algorithm.explore import Explorer
from lightning_pbt.algorithm.pb2 import PB2, Observation, ObservationLog, continuous_names
from lightning_pbt.algorithm.scheduler import MemberSnapshot, PBTScheduler
from lightning_pbt.algorithm.space import Choice, IntUniform, LogUniform, Uniform

SPACE = {
    "lr": LogUniform(1e-4, 1.0),
    "dropout": Uniform(0.0, 0.5),
    "layers": IntUniform(1, 8),
    "optimizer": Choice(("adam", "sgd")),
}
NEVER = 10**9  # a burn-in nobody reaches: plans keep everyone, so only the observations are under test


def improvement(hp: dict, step: int) -> float:
    """A synthetic per-step gain: best at lr = 1e-2 and dropout = 0.1."""
    return math.exp(-((math.log10(hp["lr"]) + 2) ** 2)) * math.exp(-((hp["dropout"] - 0.1) ** 2) / 0.02)


def simulate(
    scheduler: PBTScheduler, members: int = 8, rounds: int = 6, interval: int = 10, noise: float = 0.01, seed: int = 0
) -> list[dict]:
    """A synchronous population on the synthetic objective; returns every plan."""
    g = np.random.default_rng(seed)
    hps = [scheduler.initial_hyperparameters(m) for m in range(members)]
    scores = [0.0] * members
    plans_seen = []
    for k in range(1, rounds + 1):
        scores = [
            s + interval * improvement(h, k * interval) + noise * float(g.normal())
            for s, h in zip(scores, hps, strict=True)
        ]
        plans = scheduler.plan(k * interval, [MemberSnapshot(m, scores[m], hps[m]) for m in range(members)])
        scores = [scores[plans[m].parent] for m in range(members)]
        hps = [dict(plans[m].hyperparameters) for m in range(members)]
        plans_seen.append(plans)
    return plans_seen


def pb2_mutations(plans_seen: list[dict]) -> list[str]:
    return [text for plans in plans_seen for p in plans.values() for text in p.mutations if text.endswith("(pb2)")]


# -- observations -------------------------------------------------------------------------------------------------
def test_synchronous_snapshots_make_one_observation_per_member_and_interval() -> None:
    scheduler = PBTScheduler({"lr": LogUniform(1e-3, 1.0)}, burn_in=NEVER, explore="pb2")
    a, b = {"lr": 0.01}, {"lr": 0.1}
    scheduler.plan(10, [MemberSnapshot(0, 1.0, a), MemberSnapshot(1, 2.0, b)])
    assert scheduler.pb2.log.observations == []  # a first snapshot only opens an interval
    scheduler.plan(20, [MemberSnapshot(0, 1.5, a), MemberSnapshot(1, 2.0, b)])
    assert scheduler.pb2.log.observations == [
        Observation(0, 10, 20, (0.01,), 0.05),
        Observation(1, 10, 20, (0.1,), 0.0),
    ]
    # Values changed behind the scheduler's back: that interval is not attributable, so no observation.
    scheduler.plan(30, [MemberSnapshot(0, 1.9, {"lr": 0.02}), MemberSnapshot(1, 1.0, b)])
    assert scheduler.pb2.log.observations[2:] == [Observation(1, 20, 30, (0.1,), pytest.approx(-0.1))]


def test_a_finished_member_makes_no_observation() -> None:
    scheduler = PBTScheduler({"lr": LogUniform(1e-3, 1.0)}, burn_in=NEVER, explore="pb2")
    for step in (10, 20, 30):  # the plan's step moves on; the finished member's score does not
        scheduler.plan(step, [MemberSnapshot(0, 1.0, {"lr": 0.01}, can_exploit=False)])
    assert scheduler.pb2.log.observations == []


def test_minimising_scores_are_oriented_so_larger_is_better() -> None:
    scheduler = PBTScheduler({"lr": LogUniform(1e-3, 1.0)}, mode="min", burn_in=NEVER, explore="pb2")
    scheduler.plan(10, [MemberSnapshot(0, 3.0, {"lr": 0.01})])
    scheduler.plan(30, [MemberSnapshot(0, 2.0, {"lr": 0.01})])
    assert scheduler.pb2.log.observations == [Observation(0, 10, 30, (0.01,), 0.05)]


def test_staggered_snapshots_use_each_members_own_steps() -> None:
    scheduler = PBTScheduler({"lr": LogUniform(1e-3, 1.0)}, burn_in=NEVER, explore="pb2")
    a, b = {"lr": 0.01}, {"lr": 0.1}
    scheduler.plan(25, [MemberSnapshot(0, 1.0, a, step=10), MemberSnapshot(1, 2.0, b, step=20)])
    scheduler.plan(30, [MemberSnapshot(0, 1.0, a, step=10), MemberSnapshot(1, 2.5, b, step=30)])
    assert scheduler.pb2.log.observations == [Observation(1, 20, 30, (0.1,), pytest.approx(0.05))]
    scheduler.plan(40, [MemberSnapshot(0, 1.6, a, step=25), MemberSnapshot(1, 2.5, b, step=30)])
    assert scheduler.pb2.log.observations[1:] == [Observation(0, 10, 25, (0.01,), pytest.approx(0.04))]


def test_an_asynchronous_decider_learns_from_members_it_cannot_replace() -> None:
    """Deciding alone, member 0 marks the others ``can_exploit=False``; they still train, so their
    intervals are observations (only ``training=False``, a stopped member, makes none)."""
    scheduler = PBTScheduler({"lr": LogUniform(1e-3, 1.0)}, burn_in=NEVER, explore="pb2")
    a, b, c = {"lr": 0.01}, {"lr": 0.1}, {"lr": 0.3}

    def view(step_b: int, score_b: float, step_c: int, score_c: float) -> list[MemberSnapshot]:
        return [
            MemberSnapshot(0, 1.0, a, step=10),
            MemberSnapshot(1, score_b, b, step=step_b, can_exploit=False, training=True),
            MemberSnapshot(2, score_c, c, step=step_c, can_exploit=False, training=False),
        ]

    scheduler.plan(10, view(20, 2.0, 20, 2.0))
    scheduler.plan(10, view(30, 3.0, 30, 3.0))
    assert scheduler.pb2.log.observations == [Observation(1, 20, 30, (0.1,), pytest.approx(0.1))]


def test_an_exploit_starts_the_losers_interval_from_the_donors_score() -> None:
    scheduler = PBTScheduler({"lr": LogUniform(1e-3, 1.0)}, explore="pb2")
    plans = scheduler.plan(10, [MemberSnapshot(0, 5.0, {"lr": 0.01}), MemberSnapshot(1, 1.0, {"lr": 0.1})])
    assert plans[1].event == "exploit" and plans[1].parent == 0
    new = dict(plans[1].hyperparameters)
    scheduler.plan(20, [MemberSnapshot(0, 6.0, {"lr": 0.01}), MemberSnapshot(1, 5.5, new)])
    # Member 1's 1.0 -> 5.5 jump came from the copy: its observation is 5.0 -> 5.5 with the explored value.
    assert Observation(1, 10, 20, (new["lr"],), pytest.approx(0.05)) in scheduler.pb2.log.observations
    assert all(o.improvement < 0.2 for o in scheduler.pb2.log.observations)


def test_a_rejuvenated_member_has_no_score_until_its_next_snapshot() -> None:
    log = ObservationLog({"lr": LogUniform(1e-3, 1.0)})
    log.observe(0, 10, 1.0, {"lr": 0.01})
    log.restart(0, 10, None, {"lr": 0.01})
    log.observe(0, 20, 0.2, {"lr": 0.01})  # fresh weights: the drop is not an observation
    log.observe(0, 30, 0.4, {"lr": 0.01})
    assert log.observations == [Observation(0, 20, 30, (0.01,), pytest.approx(0.02))]


def test_non_finite_scores_make_no_observation_and_the_window_is_bounded() -> None:
    log = ObservationLog({"lr": LogUniform(1e-3, 1.0)}, max_observations=3)
    log.observe(0, 10, 1.0, {"lr": 0.01})
    log.observe(0, 20, math.nan, {"lr": 0.01})
    log.observe(0, 30, 2.0, {"lr": 0.01})
    assert log.observations == []
    for k in range(4, 10):
        log.observe(0, 10 * k, float(k), {"lr": 0.01})
    assert [o.end for o in log.observations] == [70, 80, 90]


def test_choices_are_not_modelled() -> None:
    assert continuous_names(SPACE) == ["dropout", "layers", "lr"]
    with pytest.raises(ValueError, match="needs at least one continuous hyperparameter"):
        PBTScheduler({"optimizer": Choice(("adam", "sgd"))}, explore="pb2")


# -- proposals ----------------------------------------------------------------------------------------------------
def test_falls_back_to_perturb_until_enough_observations() -> None:
    pb2, perturb = PBTScheduler(SPACE, seed=3, explore="pb2"), PBTScheduler(SPACE, seed=3)
    assert pb2.pb2.min_observations == 8  # max(4, 2 * (3 continuous dimensions + 1))
    # 4 members: the first plan has no observation, the second 4, the third 8 (>= 8: PB2 takes over).
    early_pb2, early_perturb = simulate(pb2, members=4, rounds=2), simulate(perturb, members=4, rounds=2)
    assert early_pb2 == early_perturb and not pb2_mutations(early_pb2)
    assert len(pb2.pb2.log.observations) == 4
    later = simulate(pb2, members=4, rounds=3)
    assert pb2_mutations(later[2:])


def test_continuous_values_come_from_pb2_choices_from_the_explorer() -> None:
    plans = simulate(PBTScheduler(SPACE, seed=1, explore="pb2"), rounds=4)
    explored = [p for p in plans[-1].values() if p.event == "exploit"]
    assert explored
    for p in explored:
        how = {text.split(":")[0]: text.rsplit("(", 1)[1] for text in p.mutations}
        assert how["lr"] == how["dropout"] == how["layers"] == "pb2)"
        assert how["optimizer"] in ("x0.8)", "x1.2)", "resampled)")
        assert isinstance(p.hyperparameters["layers"], int)  # IntUniform: proposed as a float, then rounded


def test_same_seed_same_plans_different_seed_differs() -> None:
    def run(seed: int) -> list[dict]:
        return simulate(PBTScheduler(SPACE, seed=seed, explore="pb2"), rounds=4)

    first = run(5)
    assert pb2_mutations(first)
    assert first == run(5)
    assert first != run(6)


def test_state_round_trip_continues_with_the_same_plan() -> None:
    scheduler = PBTScheduler(SPACE, seed=2, explore="pb2")
    simulate(scheduler, rounds=3)
    state = json.loads(json.dumps(scheduler.state_dict()))
    assert len(state["pb2"]["observations"]) == 16 and len(state["pb2"]["open"]) == 8
    hps = [scheduler.initial_hyperparameters(m) for m in range(8)]
    snaps = [MemberSnapshot(m, 10.0 + m * improvement(hps[m], 40), hps[m]) for m in range(8)]
    expected = scheduler.plan(40, snaps)
    assert pb2_mutations([expected])
    resumed = PBTScheduler(SPACE, seed=2, explore="pb2")
    simulate(resumed, rounds=1, seed=9)  # another history: the state must replace it
    resumed.load_state_dict(state)
    assert resumed.plan(40, snaps) == expected

    def plain(value: object) -> bool:  # broadcast as JSON and saved for torch.load(weights_only=True)
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (int, float, str, bool)

    assert state["pb2"]["theta"] is not None and plain(scheduler.state_dict())


def test_the_last_fits_kernel_parameters_resume_too() -> None:
    """The next GP fit starts from the last fit's kernel parameters (``theta``), and where it starts can
    change where it ends: a resumed PB2 must propose what the uninterrupted one proposes, also when its
    last fit ended elsewhere than a fit from the fixed starting points would (here at a corner of the
    bounds: large signal, short length scale, no time decay, high noise)."""
    scheduler = PBTScheduler(SPACE, seed=4, explore="pb2")
    simulate(scheduler, rounds=3)
    assert scheduler.pb2 is not None
    scheduler.pb2.theta = [math.log(20.0), math.log(0.05), 1e-3, 0.0]
    state = json.loads(json.dumps(scheduler.state_dict()))
    hps = [scheduler.initial_hyperparameters(m) for m in range(8)]
    snaps = [MemberSnapshot(m, 10.0 + m * improvement(hps[m], 40), hps[m]) for m in range(8)]

    def resumed(pb2_state: dict) -> dict:
        fresh = PBTScheduler(SPACE, seed=4, explore="pb2")
        fresh.load_state_dict({**state, "pb2": pb2_state})
        return fresh.plan(40, snaps)

    expected = scheduler.plan(40, snaps)
    assert pb2_mutations([expected])
    assert resumed(state["pb2"]) == expected
    # The same window without theta proposes otherwise: the test can tell whether theta was restored.
    assert resumed({**state["pb2"], "theta": None}) != expected


def test_state_of_another_explore_or_version_is_refused() -> None:
    pb2, perturb = PBTScheduler(SPACE, explore="pb2"), PBTScheduler(SPACE)
    with pytest.raises(ValueError, match="saved with explore='pb2', this scheduler uses explore='perturb'"):
        perturb.load_state_dict(pb2.state_dict())
    old = {"version": 1, "seed": 0, "rng": perturb.state_dict()["rng"]}
    perturb.load_state_dict(old)  # a checkpoint from before PB2 existed still resumes with perturb
    with pytest.raises(ValueError, match="version 1 predates explore='pb2'"):
        pb2.load_state_dict(old)
    with pytest.raises(ValueError, match="not a PB2 observation state"):
        pb2.load_state_dict({**pb2.state_dict(), "pb2": None})
    other = PBTScheduler({"lr": LogUniform(1e-4, 1.0)}, explore="pb2")
    with pytest.raises(ValueError, match=r"PB2 state models \['dropout', 'layers', 'lr'\]"):
        other.load_state_dict(pb2.state_dict())


def observed(space: dict, points: list[tuple[int, float, float]]) -> PB2:
    """A PB2 whose window holds ``(start step, lr, improvement)`` observations of 10 steps each."""
    pb2 = PB2(space)
    pb2.log.observations = [Observation(i, s, s + 10, (lr,), y) for i, (s, lr, y) in enumerate(points)]
    return pb2


def unit_lr(value: float) -> float:
    return (math.log(value) - math.log(1e-4)) / (math.log(1.0) - math.log(1e-4))


def test_the_gp_proposes_the_clearly_better_region() -> None:
    space = {"lr": LogUniform(1e-4, 1.0)}
    g = np.random.default_rng(0)
    points = []
    for i in range(24):
        lr = float(10 ** g.uniform(-4, 0))
        points.append((10 * (i // 8), lr, math.exp(-((unit_lr(lr) - 0.75) ** 2) / 0.01) + 0.02 * float(g.normal())))
    pb2 = observed(space, points)
    proposals = [pb2.explore_batch([(30, {"lr": 1e-4})], [], np.random.default_rng(s))[0][0]["lr"] for s in range(3)]
    assert all(abs(unit_lr(p) - 0.75) < 0.1 for p in proposals), [unit_lr(p) for p in proposals]


def test_the_gp_follows_an_optimum_that_moves_with_time() -> None:
    space = {"lr": LogUniform(1e-4, 1.0)}
    g = np.random.default_rng(1)
    points = []
    for i in range(48):
        step, lr = 10 * (i // 4), float(10 ** g.uniform(-4, 0))
        best = 0.8 if step < 60 else 0.2  # large rates win early, small ones late
        points.append((step, lr, math.exp(-((unit_lr(lr) - best) ** 2) / 0.02) + 0.02 * float(g.normal())))
    pb2 = observed(space, points)
    ((values, mutations),) = pb2.explore_batch([(120, {"lr": 0.5})], [], np.random.default_rng(0))
    assert abs(unit_lr(values["lr"]) - 0.2) < 0.1, unit_lr(values["lr"])
    assert mutations == [f"lr: 0.5 -> {values['lr']:.4g} (pb2)"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_model_explains_a_moving_optimum_by_the_time_between_observations(seed: int) -> None:
    """The GP is fitted on the time between observations, as its predictions use it: where large rates
    won early and small ones win late (the optimum moves at step 60), the fitted model predicts each at its
    time, decisively (by more than one standard deviation of the gains), and forgets with time (a decay
    eps well above its floor); where the optimum stays put, it does not forget (eps at its floor). A fit
    blind to time sees the moving optimum as noise around an average of the two."""
    space = {"lr": LogUniform(1e-4, 1.0)}

    def fitted(moving: bool):
        g = np.random.default_rng(seed)
        points = []
        for i in range(48):
            step, u = 10 * (i // 4), float(g.uniform(0, 1))
            best = (0.8 if step < 60 else 0.2) if moving else 0.5
            points.append((step, 10 ** (-4 + 4 * u), math.exp(-((u - best) ** 2) / 0.02) + 0.02 * float(g.normal())))
        model = observed(space, points).model()
        assert model is not None
        return model

    (gp, unit), (steady, _) = fitted(moving=True), fitted(moving=False)
    early_winner, late_winner = np.array([[0.8]]), np.array([[0.2]])
    assert float(gp.mean(early_winner, 10 / unit)[0] - gp.mean(late_winner, 10 / unit)[0]) > 1.0
    assert float(gp.mean(late_winner, 120 / unit)[0] - gp.mean(early_winner, 120 / unit)[0]) > 1.0
    assert gp.theta[2] > 0.1 and steady.theta[2] < 0.01


def test_a_batch_of_losers_spreads_out() -> None:
    space = {"lr": LogUniform(1e-4, 1.0)}
    g = np.random.default_rng(2)
    points = [(10 * (i // 8), float(10 ** g.uniform(-4, 0)), float(g.normal())) for i in range(32)]
    pb2 = observed(space, points)
    out = pb2.explore_batch([(40, {"lr": 0.01})] * 4, [], np.random.default_rng(0))
    units = sorted(unit_lr(values["lr"]) for values, _ in out)
    assert min(np.diff(units)) > 0.02, units


@st.composite
def spaces(draw: st.DrawFn) -> dict:
    kinds = draw(st.lists(st.sampled_from(["uniform", "log", "int", "choice", "extreme"]), min_size=1, max_size=4))
    space: dict = {}
    for i, kind in enumerate(kinds):
        if kind == "uniform":
            low = draw(st.floats(-1e6, 1e6))
            space[f"u{i}"] = Uniform(low, low + draw(st.floats(1e-6, 1e6)))
        elif kind == "log":
            low = draw(st.floats(1e-12, 1e3))
            space[f"l{i}"] = LogUniform(low, low * draw(st.floats(1.001, 1e9)))
        elif kind == "int":
            low = draw(st.integers(-1000, 1000))
            space[f"i{i}"] = IntUniform(low, low + draw(st.integers(1, 1000)))
        elif kind == "extreme":  # the widest bounds each domain accepts
            space[f"e{i}"] = draw(
                st.sampled_from([Uniform(-1e308, 1e308), LogUniform(1e-300, 1e300), IntUniform(-(2**63), 2**63 - 1)])
            )
        else:
            space[f"c{i}"] = Choice(("a", "b", "c"))
    if not continuous_names(space):
        space["u"] = Uniform(0.0, 1.0)
    return space


# derandomize: the same 25 cases every run, so the time is the same every run (fresh draws once took a case of
# minutes under load); the cases still span every domain kind, scale and the widest bounds. 20-40 s alone, several
# minutes on a busy machine: CPU-bound in one process (no collective that could hang), so a longer timeout.
@pytest.mark.timeout(600)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(space=spaces(), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-9, 1.0, 1e9]))
def test_proposals_stay_inside_every_domain(space: dict, seed: int, scale: float) -> None:
    scheduler = PBTScheduler(space, seed=seed, explore="pb2", quantile_fraction=0.5)
    g = np.random.default_rng(seed)
    hps = [scheduler.initial_hyperparameters(m) for m in range(6)]
    scores = [0.0] * 6
    used_pb2 = False
    for k in range(1, 6):
        scores = [s + scale * float(g.normal()) for s in scores]  # arbitrary, noisy, any scale
        plans = scheduler.plan(10 * k, [MemberSnapshot(m, scores[m], hps[m]) for m in range(6)])
        for p in plans.values():
            assert set(p.hyperparameters) == set(space)
            for name, value in p.hyperparameters.items():
                assert space[name].contains(value), (name, value, space[name])
            used_pb2 |= any(text.endswith("(pb2)") for text in p.mutations)
        scores = [scores[plans[m].parent] for m in range(6)]
        hps = [dict(plans[m].hyperparameters) for m in range(6)]
    assert used_pb2


def test_pb2_and_a_custom_explore_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        PBTScheduler(SPACE, explore="pb2", explorer=Explorer(SPACE, custom_explore=lambda h, s, r: h))
    with pytest.raises(ValueError, match=r"explore must be one of \('perturb', 'pb2'\), got 'gp'"):
        PBTScheduler(SPACE, explore="gp")


# -- the callback and Hydra ---------------------------------------------------------------------------------------
def test_callback_and_hydra_select_pb2() -> None:
    from hydra import compose, initialize_config_dir

    from lightning_pbt import PopulationBasedTraining
    from lightning_pbt.tools.hydra_configs import build_callback, register_configs

    register_configs()
    configs = str(Path(__file__).resolve().parents[2] / "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        default = compose("digits")
        chosen = compose("digits", overrides=["pbt.explore=pb2"])
        wrong = compose("digits", overrides=["pbt.explore=gp"])
        both = compose("digits", overrides=["pbt.explore=pb2", "+pbt.custom_explore=math.floor"])
    assert default.pbt.explore == "perturb" and build_callback(default.pbt).scheduler.pb2 is None
    callback = build_callback(chosen.pbt)
    assert isinstance(callback, PopulationBasedTraining) and callback.explore == "pb2"
    assert isinstance(callback.scheduler.pb2, PB2) and callback.scheduler.pb2.names == ["dropout", "lr", "weight_decay"]
    with pytest.raises(ValueError, match=r"^pbt.explore: must be one of \('perturb', 'pb2'\), got 'gp'"):
        build_callback(wrong.pbt)
    with pytest.raises(ValueError, match=r"^pbt: explore='pb2' and custom_explore exclude each other"):
        build_callback(both.pbt)
