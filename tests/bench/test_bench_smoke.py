"""Every benchmark once at its smoke size (``python -m bench --smoke``, ~40 s on 2 cores).

Checks the shape of the results, never timings: each JSON has its record of where and how it was
measured, and every ratio is a positive finite number.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import run_job

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

BENCHMARKS = ("transfer", "ready_step", "overhead", "quality", "schedule", "asynchronous", "decisions",
              "pbt_function_plugin", "turns")


def positive_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_smoke")
    proc = run_job([sys.executable, "-m", "bench", "--smoke", "--out", str(out)], timeout=230)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return out


def load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.parametrize("name", BENCHMARKS)
def test_result_records_where_and_how(smoke: Path, name: str) -> None:
    result = load(smoke, name)
    assert result["benchmark"] == name
    assert result["smoke"] is True
    assert "-m bench" in result["command"] and "--smoke" in result["command"]
    assert result["date"][:2] == "20"
    assert positive_finite(result["wall_s"]) or result["wall_s"] == 0
    machine = result["machine"]
    assert isinstance(machine["cores"], int) and machine["cores"] >= 1
    assert machine["cpu_model"]
    assert "gpu" in machine
    for package in ("python", "torch", "pytorch_lightning"):
        assert result["versions"][package]
    assert "description" in result and "config" in result


def test_transfer(smoke: Path) -> None:
    result = load(smoke, "transfer")
    assert result["rows"]
    for row in result["rows"]:
        assert row["layout"] == "2x1"
        for key in ("ratio", "ratio_paired_median", "ratio_vs_same_group", "ours_ms", "raw_ms"):
            assert positive_finite(row[key]), (key, row[key])
        assert row["state_bytes"] > 0
        assert row["state_copied_exactly"] is True
        assert row["received_in_place"] is True  # equal models: the loser receives into its own tensors
    assert set(result["targets"]["ratio_at_10MB_and_above"]) >= {"target", "value", "met"}
    for profile in result["profiles"]["2x1"].values():
        assert positive_finite(profile["sender_ms"]["payload"]) and positive_finite(profile["receiver_ms"]["payload"])
        assert positive_finite(profile["receiver_ms"]["load"])


def test_ready_step(smoke: Path) -> None:
    result = load(smoke, "ready_step")
    assert [row["ranks"] for row in result["rows"]] == [2]
    for row in result["rows"]:
        for key in ("ours_ms", "raw_allgather_ms", "collectives_ms", "ratio", "ratio_vs_collectives", "ours_growth",
                    "raw_allgather_growth"):
            assert positive_finite(row[key]), (key, row[key])
        assert row["events"] == ["keep"]  # no transfer in this benchmark
        for phase in ("gather", "decide_and_broadcast", "lineage_submit", "lineage_write_background"):
            assert positive_finite(row["breakdown_ms"][phase]), (phase, row["breakdown_ms"])
    assert "grows_no_faster_than_allgather" in result["targets"]


def test_overhead(smoke: Path) -> None:
    result = load(smoke, "overhead")
    for row in result["rows"]:
        for key in ("ratio", "pbt_steps_per_s", "baseline_steps_per_s"):
            assert positive_finite(row[key]), (key, row[key])
        assert row["exploits_per_run"] >= 1  # exploits happen, so the transfer is part of what is timed
        breakdown = row["ready_step_breakdown"]
        assert breakdown["ready_steps"] >= 1
        for key in ("total_ms", "gather_ms", "gather_own_ms", "decide_ms", "exploit_transfer_ms",
                    "lineage_write_background_ms"):
            assert positive_finite(breakdown[key]), (key, breakdown)
        assert breakdown["gather_waiting_ms"] >= 0
    assert set(result["targets"]["ratio"]) >= {"target", "value", "met"}


def test_quality(smoke: Path) -> None:
    result = load(smoke, "quality")
    for row in result["toy"]:
        for arm in ("pbt", "grid", "random_search"):
            assert math.isfinite(row[arm]["median"])
        assert row["pbt"]["median"] > row["grid"]["median"]  # the paper's result, deterministic per seed
    digits = result["digits"]
    for arm in ("pbt", "random_search", "default"):
        assert 0.0 <= digits["summary"][arm]["test_acc"]["median"] <= 1.0
    for entry in digits["per_seed"]:
        assert entry["pbt"]["exploits"] >= 1
        assert 0.0 <= entry["pbt_async"]["test_acc"] <= 1.0 and entry["pbt_async"]["members"] == 2
    for row in result["toy"]:  # asynchronous arms, paired with lockstep by seed
        assert sum(row["vs_lockstep"]["pbt_async"].values()) == row["seeds"]
    pbt_function = result["pbt_function"]
    seeds = len(pbt_function["config"]["seeds"])
    for arm, summary in pbt_function["summary"].items():
        assert 0 <= summary["reached_target_seeds"] <= seeds and summary["final_best"]["n"] == seeds, arm


def test_schedule(smoke: Path) -> None:
    result = load(smoke, "schedule")
    for row in result["rows"]:
        for arm in ("pbt", "pb2", "random_search", "cosine", "grid"):
            assert positive_finite(row["summary"][arm]["excess_risk"]["median"]), arm
        assert sum(row["wins"]["pb2_vs_pbt"].values()) == len(result["config"]["seeds"])  # paired by seed
        for entry in row["per_seed"]:
            assert entry["pbt"]["exploits"] >= 1 and entry["random_search"]["exploits"] == 0
            assert entry["pb2"]["pb2_proposals"] >= 1 and entry["pbt"]["pb2_proposals"] == 0  # PB2 is what ran
            # Stragglers at equal wall time: the slow half trains the budget, the fast half 3x it.
            steps = result["config"]["steps"]
            assert entry["pbt_async"]["steps"] == [steps] * 4
            assert entry["pbt_async_stragglers"]["steps"] == [3 * steps, 3 * steps, steps, steps]
def test_asynchronous(smoke: Path) -> None:
    result = load(smoke, "asynchronous")
    assert set(result["arms"]) == {"sync_mixed", "async_mixed", "async_wait_mixed", "async_equal", "none_equal"}
    assert result["arms"]["sync_mixed"]["speeds"] == [1, 1, 3, 3]
    assert result["arms"]["async_equal"]["speeds"] == [1, 1, 1, 1]
    for run in result["runs"]:
        assert positive_finite(run["member_steps_per_s"])
        assert [m["member"] for m in run["members"]] == [0, 1, 2, 3]
        assert all(m["steps"] >= 1 and 0.0 <= m["test_acc"] <= 1.0 for m in run["members"])
        if run["arm"] != "none_equal":
            assert run["ready_steps"] >= 1
    for ratio in ("async_over_sync_mixed", "async_callback_over_none_equal"):
        assert positive_finite(result["ratios"][ratio])
        assert set(result["targets"][ratio]) >= {"target", "value", "met", "applies"}
    for ratio in ("async_wait_over_sync_mixed", "async_wait_over_async_mixed"):
        assert positive_finite(result["ratios"][ratio])
    assert "gather_waiting_ms" in result["arms"]["sync_mixed"]["ready_step_breakdown"]
    assert positive_finite(result["arms"]["async_mixed"]["ready_step_breakdown"]["snapshot_ms"])
    assert result["arms"]["none_equal"]["ready_step_breakdown"] is None


def test_turns(smoke: Path) -> None:
    """The smoke's two layouts of 2 members: 2 processes x 1 (no hand-over) and 1 process x 2 (turns)."""
    layouts = load(smoke, "turns")["layouts"]
    assert set(layouts) == {"2x1", "1x2"}
    for layout in layouts.values():
        assert (layout["processes"] * layout["lanes"], layout["members"]) == (2, 2)
        assert all(positive_finite(layout[key]) for key in ("wall_s", "startup_s", "fit_s", "peak_rss_gb",
                                                             "member_steps_per_s"))
        assert layout["startup_s"] < layout["wall_s"]
    assert layouts["2x1"]["switches"] == 0 and layouts["2x1"]["switch_fraction"] == 0.0
    assert layouts["1x2"]["switches"] >= 1 and 0.0 < layouts["1x2"]["switch_fraction"] < 1.0


def test_pbt_function_plugin(smoke: Path) -> None:
    result = load(smoke, "pbt_function_plugin")
    assert set(result["arms"]) == {"lockstep", "async", "async_wait"}
    for entry in result["per_seed"]:
        lockstep = entry["lockstep"]
        # lockstep decides with everyone at every ready step: 4 members x (40 / 5 - 1) ready steps before the last
        assert lockstep["decisions"] == 4 * 7 and lockstep["in_step"] is None
        for arm in ("lockstep", "async", "async_wait"):
            run = entry[arm]
            assert run["best"] >= run["final_best"] >= 0.0 and run["reached"] == (run["best"] > 200.0)
            assert 0 <= run["exploits"] <= run["decisions"]
        assert 0.0 <= entry["async_wait"]["in_step"] <= 1.0
    assert set(result["targets"]) == {"async_reached", "async_median", "async_wait_reached", "async_wait_in_step"}


def test_decisions(smoke: Path) -> None:
    from bench.decisions import ARMS

    result = load(smoke, "decisions")
    seeds = result["config"]["seeds"]
    assert set(result["tasks"]) == {"pbt_function", "toy_25", "schedule_4x50"}
    for task in result["tasks"].values():
        assert set(task["arms"]) == set(ARMS)
        for arm, entry in task["arms"].items():
            assert entry["value"]["n"] + entry["missing"] == seeds
            if arm != "lockstep":
                assert sum(entry["vs_lockstep"].values()) == seeds
                assert 0 < entry["sign_test_p"] <= 1
    assert 0 <= result["tasks"]["pbt_function"]["arms"]["async"]["reached_target_seeds"] <= seeds


def test_paired_seeds_tie_only_within_rounding() -> None:
    """The same run computed two ways rounds differently in the last bits: a tie, not a win; anything
    larger counts. Lower is better for losses; a missing (diverged) value loses."""
    from bench.decisions import paired

    lock = [0.0482932530087613, 0.5, 0.5, 0.5]
    other = [0.04829325300876133, 0.5 * (1 - 1e-6), 0.5 * (1 + 1e-6), None]
    assert paired(other, lock, higher_is_better=False) == {"wins": 1, "ties": 1, "losses": 2}
    assert paired(other, lock, higher_is_better=True) == {"wins": 1, "ties": 1, "losses": 2}


def test_sign_test_matches_the_binomial_distribution() -> None:
    from bench.decisions import sign_test_p

    assert sign_test_p(40, 60) == pytest.approx(0.056887933640981)  # scipy.stats.binomtest(40, 100).pvalue
    assert sign_test_p(50, 50) == 1.0
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert sign_test_p(0, 0) == 1.0


def test_markdown_table(smoke: Path) -> None:
    text = (smoke / "RESULTS.md").read_text()
    for heading in ("## Targets", "## 1. Exploit transfer", "## 2. Ready-step latency", "## 3. Training overhead",
                    "## 4. Search quality", "## 5. Schedules", "## 6. Asynchronous PBT",
                    "## Asynchronous vs lockstep decisions"):
        assert heading in text
    assert "| layout |" in text and "Machine:" in text


class _Tagged:
    """State = (the member whose training it started from, steps trained); member 0's line always ranks first."""

    def __init__(self) -> None:
        self.copies_received: list[int] = []
        self.trained = [0, 0]  # optimizer steps each member ran, whatever state it ran them on

    def start(self, member: int) -> tuple[int, int]:
        return (member, 0)

    def train(self, member: int, state: tuple[int, int], hyperparameters: dict, steps: int) -> tuple[int, int]:
        if member == 1 and state[0] == 0 and not self.copies_received:
            self.copies_received.append(state[1])  # the steps of the first copy member 1 trains from
        self.trained[member] += steps
        return (state[0], state[1] + steps)

    def score(self, state: tuple[int, int]) -> float:
        return (1000.0 if state[0] == 0 else 0.0) + state[1]

    def copy(self, state: tuple[int, int]) -> tuple[int, int]:
        return tuple(state)


@pytest.mark.parametrize("snapshot_every", [None, 5, 1])
def test_simulated_copy_takes_the_donors_latest_snapshot(snapshot_every: int | None) -> None:
    """Without snapshots between ready steps a copy is a ready step's snapshot; with them, the donor's state
    after the last multiple of ``snapshot_every`` steps of its interval, from which the donor goes on."""
    from bench.simulate import run_asynchronous
    from lightning_pbt.algorithm.scheduler import PBTScheduler
    from lightning_pbt.algorithm.space import Uniform

    ready, steps = 10, 200
    copied, trained = [], []
    for seed in range(5):
        task = _Tagged()
        result = run_asynchronous(task, lambda s=seed: PBTScheduler({"x": Uniform(0, 1)}, mode="max", seed=s),
                                  [{"x": 0.5}, {"x": 0.5}], ready, [steps, steps], [1.0, 1.0], seed,
                                  snapshot_every=snapshot_every)
        copied += task.copies_received
        trained.append(task.trained)
        assert result["steps"] == [steps, steps]
    assert copied
    # A donor copied mid-interval goes on from the snapshot it trained to: no step twice, none skipped.
    assert trained == [[steps, steps]] * 5
    assert all(c % (snapshot_every or ready) == 0 for c in copied)
    if snapshot_every is not None:
        assert any(c % ready for c in copied)  # a snapshot between ready steps


def test_simulated_members_that_wait_for_peers_decide_as_in_lockstep() -> None:
    """At equal speeds (each interval jittered) a member that waits for the others to score at its step
    sees the population in step and carries out lockstep's plan for it: the toy's result is lockstep's,
    seed for seed, where without waiting half the decisions see a stale score."""
    from bench import quality

    toy = quality._load_toy()
    waiting = [quality.run_toy_async(toy, seed, 25, "async", snapshot_every=1, wait=0.5) for seed in range(20)]
    lockstep = [toy.run_toy(pbt=True, steps=25, lr=toy.LR, ready=toy.READY, seed=seed) for seed in range(20)]
    assert waiting == pytest.approx(lockstep, abs=1e-12)
    assert [quality.run_toy_async(toy, seed, 25, "async") for seed in range(20)] != pytest.approx(lockstep)


def test_simulated_waits_are_bounded_and_stragglers_keep_their_budget() -> None:
    """With a member 3x slower the fast one waits ``wait`` of its first interval only (nobody is a straggler
    before anyone has scored); after that the straggler has not scored at the fast member's previous ready
    step, so it is not waited for. The fast member trains the steps that leaves it in the same wall time
    (``fast_budget``)."""
    from bench.simulate import fast_budget, run_asynchronous
    from lightning_pbt.algorithm.scheduler import PBTScheduler
    from lightning_pbt.algorithm.space import Uniform

    ready, wait = 10, 0.25
    budgets = [fast_budget(100, 3, ready, wait), 100]
    assert budgets[0] == 290 and fast_budget(100, 3, ready, None) == 300
    result = run_asynchronous(_Tagged(), lambda: PBTScheduler({"x": Uniform(0, 1)}, mode="max", seed=0),
                              [{"x": 0.5}, {"x": 0.5}], ready, budgets, [1.0, 3.0], 0, wait=wait)
    assert result["steps"] == budgets
    assert result["waited"] == pytest.approx(wait * ready)
    with pytest.raises(ValueError, match="waited for"):
        fast_budget(100, 2, ready, 1.0)
