"""Multi-process runs of a tiny model (gloo, CPU): PopulationStrategy and PopulationBasedTraining.

Each module-scoped fixture launches one population and many tests read its outputs, so the cost of
starting processes is paid once per layout.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import load_lineage, load_ranks, run_population

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

STEPS, EVERY = 24, 4
# run_2x2's PBT settings, shared by the runs compared with it (the tournament rule, a start value).
RUN_2X2 = {"exploit": "tournament", "start": {"dropout": 0.2}}


@pytest.fixture(scope="module")
def run_2x2(tmp_path_factory) -> Path:
    """4 ranks as 2 members x 2 ranks, Lightning's own launcher, validate() after fit."""
    out = tmp_path_factory.mktemp("run_2x2")
    proc = run_population(out, devices=4, member_size=2, max_steps=STEPS, every=EVERY, validate_after=True, **RUN_2X2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out


@pytest.fixture(scope="module")
def run_4x1(tmp_path_factory) -> Path:
    """4 ranks as 4 members, torchrun's environment, one member diverging to NaN, a step LR scheduler, the
    t-test rule; two ranks per device (``processes_per_device=2``: Trainer(devices=2) on 4 ranks)."""
    out = tmp_path_factory.mktemp("run_4x1")
    proc = run_population(
        out,
        devices=4,
        processes_per_device=2,
        member_size=1,
        max_steps=STEPS,
        every=EVERY,
        nan_member=2,
        nan_from=6,
        lr_scheduler="step",
        quantile=0.25,
        exploit="ttest",
        seed=3,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out


def by_member(ranks: list[dict]) -> dict[int, list[dict]]:
    members = defaultdict(list)
    for rank in ranks:
        members[rank["member"]].append(rank)
    return members


# -- the member-as-world view ----------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["run_2x2", "run_4x1"])
def test_member_view_of_lightning(layout, request):
    out = request.getfixturevalue(layout)
    ranks = load_ranks(out)
    assert len(ranks) == 4
    member_size = 2 if layout == "run_2x2" else 1
    for rank in ranks:
        assert rank["member"] == rank["world_rank"] // member_size
        assert rank["global_rank"] == rank["world_rank"] % member_size
        assert rank["world_size"] == member_size
        assert rank["is_global_zero"] == (rank["global_rank"] == 0)
        assert rank["gathered"] == member_size  # self.all_gather spans the member only
        # sync_dist=True averages over the member's ranks, not the world's.
        expected = sum(r["world_rank"] for r in ranks if r["member"] == rank["member"]) / member_size
        assert rank["rank_value"] == pytest.approx(expected)
        assert rank["torchmetric_mean"] == pytest.approx(expected)  # torchmetrics stay inside the member


@pytest.mark.parametrize("layout", ["run_2x2", "run_4x1"])
def test_ranks_of_a_member_hold_identical_weights_and_members_differ(layout, request):
    members = by_member(load_ranks(request.getfixturevalue(layout)))
    for ranks in members.values():  # DDP inside the member: identical at every ready step and at the end
        assert len({r["final"]["model"] for r in ranks}) == 1
        for step in {r["step"] for r in ranks[0]["before"]}:
            assert len({next(x["model"] for x in r["before"] if x["step"] == step) for r in ranks}) == 1
    # Every member starts from weights of its own (the same on the member's ranks).
    assert len({ranks[0]["initial"]["model"] for ranks in members.values()}) == len(members)
    for ranks in members.values():
        assert len({r["initial"]["model"] for r in ranks}) == 1


def test_each_member_sees_its_share_of_the_data(run_2x2):
    """Inside a member the ranks split each epoch's 256 samples; members shuffle in orders of their own."""
    members = by_member(load_ranks(run_2x2))
    orders = []
    for ranks in members.values():
        shares = [r["first_epoch_indices"] for r in ranks]
        assert all(len(share) == 128 for share in shares)  # 256 samples, 2 ranks
        assert sorted(shares[0] + shares[1]) == list(range(256))  # disjoint halves covering the data
        orders.append(shares[0])
    assert orders[0] != orders[1] and sorted(orders[0]) != sorted(orders[1])


def test_member_outputs_in_their_own_directories(run_2x2):
    for rank in load_ranks(run_2x2):
        assert f"member_{rank['member']}" in rank["log_dir"]
    for member in (0, 1):
        assert list((run_2x2 / f"member_{member}").rglob("metrics.csv"))
        assert list((run_2x2 / f"member_{member}").rglob("*.ckpt"))


def test_validate_after_fit_keeps_every_members_weights(run_2x2):
    assert all(rank["validate_kept_weights"] for rank in load_ranks(run_2x2))


# -- PBT: exploit, explore, lineage -----------------------------------------------------------------
@pytest.mark.parametrize("layout", ["run_2x2", "run_4x1"])
def test_exploit_copies_the_donors_state_bit_exactly(layout, request):
    out = request.getfixturevalue(layout)
    ranks = load_ranks(out)
    lineage = [r for r in load_lineage(out) if r["event"] != "init"]
    exploits = [r for r in lineage if r["event"] == "exploit"]
    assert exploits, "the run should exploit at least once"
    for rank in ranks:
        before = {r["step"]: r for r in rank["before"]}
        after = {r["step"]: r for r in rank["after"]}
        for rec in lineage:
            if rec["member"] != rank["member"]:
                continue
            j = rank["global_rank"]
            donor_rank = next(r for r in ranks if r["member"] == rec["parent"] and r["global_rank"] == j)
            donor_before = {r["step"]: r for r in donor_rank["before"]}[rec["step"]]
            mine = after[rec["step"]]
            moved = ("model", "optimizer", "schedulers", "precision")
            if rec["event"] == "exploit":
                assert [mine[k] for k in moved] == [donor_before[k] for k in moved]
            else:
                assert [mine[k] for k in moved] == [before[rec["step"]][k] for k in moved]


def test_lineage_has_init_and_one_line_per_member_per_ready_step(run_2x2):
    lineage = load_lineage(run_2x2)
    inits = [r for r in lineage if r["event"] == "init"]
    assert sorted(r["member"] for r in inits) == [0, 1]
    steps = defaultdict(list)
    for rec in lineage:
        if rec["event"] != "init":
            steps[rec["step"]].append(rec["member"])
    assert sorted(steps) == list(range(EVERY, STEPS + 1, EVERY))
    assert all(sorted(members) == [0, 1] for members in steps.values())
    for rec in lineage:
        assert set(rec) >= {
            "step",
            "epoch",
            "member",
            "score",
            "event",
            "parent",
            "hyperparameters",
            "timing",
        }
        if rec["event"] != "init":
            assert set(rec["timing"]) == {"gather", "decide", "transfer"}


def test_lineage_parents_and_hyperparameters_are_consistent(run_2x2):
    lineage = load_lineage(run_2x2)
    current = {r["member"]: r["hyperparameters"] for r in lineage if r["event"] == "init"}
    for step in sorted({r["step"] for r in lineage if r["event"] != "init"}):
        records = [r for r in lineage if r["step"] == step and r["event"] != "init"]
        for rec in records:
            if rec["event"] == "keep":
                assert rec["parent"] == rec["member"]
                assert rec["hyperparameters"] == current[rec["member"]]
            else:
                assert rec["event"] == "exploit"
                assert rec["parent"] != rec["member"]
                assert rec["mutations"]
                assert set(rec["hyperparameters"]) == set(current[rec["parent"]])
            assert 1e-3 <= rec["hyperparameters"]["lr"] <= 0.5
            assert 0.0 <= rec["hyperparameters"]["dropout"] <= 0.5
        current.update({rec["member"]: rec["hyperparameters"] for rec in records})


def test_hyperparameters_in_effect_match_the_lineage(run_2x2):
    lineage = load_lineage(run_2x2)
    for rank in load_ranks(run_2x2):
        mine = [r for r in lineage if r["member"] == rank["member"]]
        after = {r["step"]: r for r in rank["after"]}
        for rec in mine:
            if rec["event"] == "init":
                continue
            seen = after[rec["step"]]
            assert seen["lr"] == pytest.approx(rec["hyperparameters"]["lr"])
            assert seen["dropout"] == pytest.approx(rec["hyperparameters"]["dropout"])  # via the hook
            assert seen["hparams_dropout"] == pytest.approx(rec["hyperparameters"]["dropout"])
        assert rank["hyperparameters"] == mine[-1]["hyperparameters"]


def test_nan_member_is_replaced_and_never_wins(run_4x1):
    lineage = load_lineage(run_4x1)
    ready = [r for r in lineage if r["event"] != "init"]
    nan_steps = sorted({r["step"] for r in ready if r["member"] == 2 and r["score"] is None})
    assert nan_steps, "member 2 should have diverged"
    for rec in ready:
        if rec["event"] == "exploit":
            donor = next(r for r in ready if r["step"] == rec["step"] and r["member"] == rec["parent"])
            assert donor["score"] is not None and math.isfinite(donor["score"])
        if rec["member"] == 2 and rec["step"] in nan_steps:
            # replaced at every ready step but its last, where nobody exploits any more (nothing trains after it)
            last = rec["step"] == STEPS
            assert (rec["event"], rec["extra"].get("last", False)) == (("keep", True) if last else ("exploit", False))


def test_step_lr_scheduler_keeps_its_shape_after_explore(run_4x1):
    """StepLR halves the rate each epoch (8 steps); the rate in effect = base * 0.5**epochs."""
    lineage = load_lineage(run_4x1)
    for rank in load_ranks(run_4x1):
        for seen in rank["after"]:
            rec = next(r for r in lineage if r["member"] == rank["member"] and r["step"] == seen["step"])
            base = rec["hyperparameters"]["lr"]
            epochs_done = seen["step"] // 16  # 256 samples / batch 16 = 16 steps per epoch (one rank)
            assert seen["lr"] == pytest.approx(base * 0.5**epochs_done, rel=1e-6)


def test_same_seed_gives_identical_lineage_and_a_fresh_run_keeps_the_old_lineage(run_2x2, tmp_path):
    """The same run again, in a folder that already holds a lineage (a fresh run, not a resume)."""
    (tmp_path / "pbt").mkdir()
    old = (run_2x2 / "pbt" / "lineage.jsonl").read_text()
    (tmp_path / "pbt" / "lineage.jsonl").write_text(old)
    proc = run_population(tmp_path, devices=4, member_size=2, max_steps=STEPS, every=EVERY, **RUN_2X2)
    assert proc.returncode == 0, proc.stdout[-4000:]

    def decisions(out):
        return [{k: v for k, v in r.items() if k != "timing"} for r in load_lineage(out)]

    assert decisions(tmp_path) == decisions(run_2x2)
    assert (tmp_path / "pbt" / "previous_1" / "lineage.jsonl").read_text() == old  # moved aside, not overwritten


def test_start_hyperparameters_are_every_members_first_values(run_2x2):
    inits = [r for r in load_lineage(run_2x2) if r["event"] == "init"]
    assert [r["hyperparameters"]["dropout"] for r in inits] == [0.2, 0.2]
    assert len({r["hyperparameters"]["lr"] for r in inits}) == 2  # the rest is sampled per member


@pytest.mark.skipif(os.cpu_count() is None, reason="needs os.cpu_count")
def test_member_stopping_early_ends_without_hang(tmp_path):
    """Member 1 stops at step 8; member 0 goes on to max_steps; nothing hangs. Both members share one
    device: Lightning's launcher starts Trainer(devices=1) x processes_per_device=2 processes. No ready
    interval is given: a ready step at every validation end (every EVERY steps).

    The same run trains in 16-mixed on CPU with a GradScaler of each member's own (initial scale
    2**(10 + member)): an exploit must leave the loser with the donor's scaler state."""
    proc = run_population(
        tmp_path,
        devices=2,
        processes_per_device=2,
        default_interval=True,
        member_size=1,
        max_steps=STEPS,
        every=EVERY,
        early_stop_member=1,
        early_stop_at=8,
        quantile=0.25,
        scaler_per_member=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = {r["member"]: r for r in load_ranks(tmp_path)}
    assert len(ranks) == 2 and {r["population_backend"] for r in ranks.values()} == {"gloo"}
    assert ranks[1]["global_step"] == 8
    assert ranks[0]["global_step"] == STEPS
    lineage = load_lineage(tmp_path)
    for rec in lineage:
        if rec["member"] == 1 and rec["step"] > 8:
            assert rec["event"] == "keep" and rec["extra"]["done"]
    steps = sorted({r["step"] for r in lineage if r["event"] != "init"})
    assert steps == list(range(EVERY, STEPS + 1, EVERY))
    exploits = [r for r in lineage if r["event"] == "exploit"]
    assert exploits, "member 0 should copy member 1 before member 1 stops"
    scalers_differed = False
    for rec in exploits:
        loser = {r["step"]: r for r in ranks[rec["member"]]["before"]}[rec["step"]]
        donor = {r["step"]: r for r in ranks[rec["parent"]]["before"]}[rec["step"]]
        after = {r["step"]: r for r in ranks[rec["member"]]["after"]}[rec["step"]]
        assert '"scale"' in donor["precision"] and after["precision"] == donor["precision"]
        scalers_differed |= loser["precision"] != donor["precision"]
    assert scalers_differed  # else a scaler that did not move could not show


def test_an_exception_in_one_rank_ends_the_whole_run(tmp_path):
    proc = run_population(
        tmp_path,
        timeout=90,
        devices=4,
        member_size=2,
        max_steps=400,
        every=EVERY,
        raise_in_rank=1,
        raise_at=6,
    )
    assert proc.returncode != 0
    assert "injected failure" in proc.stdout
    assert not list(tmp_path.glob("rank_*.json"))


def test_max_time_stops_members_independently_without_hang(tmp_path):
    proc = run_population(tmp_path, devices=2, member_size=1, max_steps=100_000, every=EVERY, max_time={"seconds": 4})
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = load_ranks(tmp_path)
    assert len(ranks) == 2 and all(0 < r["global_step"] < 100_000 for r in ranks)
    lineage = [r for r in load_lineage(tmp_path) if r["event"] != "init"]
    per_step = defaultdict(list)
    for rec in lineage:
        per_step[rec["step"]].append(rec["member"])
    assert all(sorted(m) == [0, 1] for m in per_step.values())


def test_resume_from_checkpoints_continues_the_lineage(tmp_path):
    first = run_population(tmp_path, devices=2, member_size=1, max_steps=12, every=EVERY, ckpt_every=EVERY)
    assert first.returncode == 0, first.stdout[-4000:]
    assert (tmp_path / "ckpt" / "member_1" / "last.ckpt").exists()
    before = load_lineage(tmp_path)
    second = run_population(
        tmp_path, devices=2, member_size=1, max_steps=STEPS, every=EVERY, ckpt_every=EVERY, resume=True
    )
    assert second.returncode == 0, second.stdout[-4000:]
    # ckpt_path="last" found the member's own checkpoint (only population rank 0 prints info messages).
    assert f"Restored all states from the checkpoint at {tmp_path}/ckpt/member_0/last.ckpt" in second.stdout
    assert not (tmp_path / "pbt" / "previous_1").exists()  # continued, not restarted
    lineage = load_lineage(tmp_path)
    assert lineage[: len(before)] == before
    assert sorted(r["member"] for r in lineage if r["event"] == "init") == [0, 1]
    steps = [(r["step"], r["member"]) for r in lineage if r["event"] != "init"]
    assert sorted(steps) == [(s, m) for s in range(EVERY, STEPS + 1, EVERY) for m in (0, 1)]
    assert all(r["global_step"] == STEPS for r in load_ranks(tmp_path))
    # The restored members carry on with the hyperparameters the lineage says they had.
    restored = {r["member"]: r["hyperparameters"] for r in before if r["step"] == 12}
    for rank in load_ranks(tmp_path):
        first_after = {r["step"]: r for r in rank["before"]}[16]
        assert first_after["lr"] == pytest.approx(restored[rank["member"]]["lr"])


def test_rejuvenation_is_recorded_and_resets_weights(tmp_path):
    """Partial rejuvenation of the head (``body.3``) in a 2x2 layout. Every member scores the same flat
    metric, so the tournament never exploits and member 1 (not the best-ranked) is rejuvenated."""
    proc = run_population(
        tmp_path,
        devices=4,
        member_size=2,
        max_steps=10,
        every=2,
        rejuvenate_patience=1,
        rejuvenate_modules=["body.3"],
        exploit="tournament",
        monitor="flat",
        lr_scheduler="cosine",
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    lineage = load_lineage(tmp_path)
    rejuvenated = [r for r in lineage if r["event"] == "rejuvenate"]
    assert rejuvenated, "a plateaued member should have been rejuvenated"
    ranks = load_ranks(tmp_path)
    for rec in rejuvenated:
        assert rec["parent"] == rec["member"]
        step = rec["step"]
        member_ranks = [r for r in ranks if r["member"] == rec["member"]]
        assert len(member_ranks) == 2
        afters = [{r["step"]: r for r in rank["after"]}[step] for rank in member_ranks]
        # Both ranks of the member drew the same fresh weights (the seed depends on seed, member, step only).
        assert afters[0]["model"] == afters[1]["model"]
        assert afters[0]["submodules"] == afters[1]["submodules"]
        for rank, after in zip(member_ranks, afters, strict=True):
            before = {r["step"]: r for r in rank["before"]}[step]
            assert after["model"] != before["model"]
            # Only the named submodule was re-initialised; the others keep weights and optimizer state.
            assert after["submodules"]["body.3"]["weights"] != before["submodules"]["body.3"]["weights"]
            assert after["submodules"]["body.3"]["optimizer"] is None
            assert after["submodules"]["body.0"] == before["submodules"]["body.0"]
            assert before["submodules"]["body.0"]["optimizer"] is not None
            # The LR scheduler is left where it is: the same (decayed) rate as just before.
            assert after["lr"] == before["lr"] != rec["hyperparameters"]["lr"]


def test_a_killed_rank_ends_the_run_and_leaves_no_process(tmp_path):
    """SIGKILL of population rank 0 (which also hosts the launch's store) under Lightning's launcher: the
    other rank ends within seconds (its next collective or store call fails, or the watchdog notices the
    store is gone), long before the 60 s collective timeout would end it."""
    proc = run_population(
        tmp_path,
        timeout=90,
        launcher="lightning",
        devices=2,
        member_size=1,
        max_steps=100_000,
        every=EVERY,
        kill_world_rank=0,
        kill_at=6,
    )
    ended = time.time()
    assert proc.returncode != 0
    assert ended - float((tmp_path / "killed_at").read_text()) < 20, proc.stdout[-3000:]
    assert "Timed out" not in proc.stdout


def test_a_killed_rank_ends_a_torchrun_job(tmp_path):
    proc = run_population(
        tmp_path,
        timeout=90,
        torchrun=True,
        devices=4,
        member_size=1,
        max_steps=100_000,
        every=EVERY,
        kill_world_rank=2,
        kill_at=6,
    )
    ended = time.time()
    assert proc.returncode != 0
    assert not list(tmp_path.glob("rank_*.json"))
    assert ended - float((tmp_path / "killed_at").read_text()) < 20, proc.stdout[-3000:]


def test_elastic_restart_rolls_members_back_to_a_common_ready_step(run_2x2, tmp_path):
    """torchrun --max-restarts=1; member 1's rank 0 dies while saving its checkpoint of ready step 12,
    after member 0 saved its own: a crash between two members' saves of one ready step.

    After the restart member 0's newest checkpoint is of step 12 and member 1's of step 8, so member 0
    rolls back to its checkpoint of step 8 and every member resumes from there. The finished lineage has
    every ready step exactly once and, up to step 8, is the one of the same run never interrupted
    (``run_2x2``); after it, training is not bit-identical (see docs/guides/faults.md).
    """
    proc = run_population(
        tmp_path,
        timeout=200,
        torchrun=True,
        max_restarts=1,
        devices=4,
        member_size=2,
        max_steps=STEPS,
        every=EVERY,
        ckpt_every=EVERY,
        resume=True,
        kill_before_save={"world_rank": 2, "step": 12},
        **RUN_2X2,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "member 0 resumes from" in proc.stdout and "(ready step 8, as the others)" in proc.stdout
    ranks = load_ranks(tmp_path)
    assert len(ranks) == 4 and all(r["global_step"] == STEPS for r in ranks)
    lineage = load_lineage(tmp_path)
    assert sorted(r["member"] for r in lineage if r["event"] == "init") == [0, 1]
    ready = sorted((r["step"], r["member"]) for r in lineage if r["event"] != "init")
    assert ready == [(s, m) for s in range(EVERY, STEPS + 1, EVERY) for m in (0, 1)]
    finals = by_member(ranks)
    for member, member_ranks in finals.items():
        assert len({r["final"]["model"] for r in member_ranks}) == 1, member
        assert (
            member_ranks[0]["hyperparameters"] == [r for r in lineage if r["member"] == member][-1]["hyperparameters"]
        )

    def prefix(records):
        return [{k: v for k, v in r.items() if k != "timing"} for r in records if r["step"] <= 8]

    assert prefix(lineage) == prefix(load_lineage(run_2x2))
