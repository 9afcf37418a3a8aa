"""Asynchronous PBT (``synchronous=False``): members at their own pace, never waiting for each other.

The same functional guarantees as the synchronous mode (bit-exact copies of the full state, the
lineage contract, NaN members, stopping, resume), with members of unequal speed and step counts.
One run uses the unified ``lightning`` package, the other ``pytorch_lightning``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests.conftest import load_lineage, load_ranks, run_population

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

EVERY = 4


@pytest.fixture(scope="module")
def run_2x2(tmp_path_factory) -> Path:
    """2 members x 2 ranks, `lightning.pytorch`; member 1 is slower and stops at step 16, member 0 at 24.

    Scored on a constant per member (member 1 always better), so member 0 copies member 1 as soon as
    member 1 has a snapshot: copies from a slower donor whose step differs from the loser's.
    """
    out = tmp_path_factory.mktemp("async_2x2")
    proc = run_population(
        out,
        flavour="lightning",
        synchronous=False,
        devices=4,
        member_size=2,
        max_steps=24,
        member_max_steps={"1": 16},
        every=EVERY,
        slow_members=[1],
        slow_delay=0.05,
        monitor="member_const",
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out


@pytest.fixture(scope="module")
def run_4x1(tmp_path_factory) -> Path:
    """4 members (torchrun's environment): member 1 slow, member 2 diverges to NaN from step 6, member 3 stops at 8;
    no exploit before step 8 (burn-in), explore by a function named by import path."""
    out = tmp_path_factory.mktemp("async_4x1")
    proc = run_population(
        out,
        synchronous=False,
        devices=4,
        member_size=1,
        max_steps=24,
        every=EVERY,
        slow_members=[1],
        slow_delay=0.03,
        nan_member=2,
        nan_from=6,
        early_stop_member=3,
        early_stop_at=8,
        quantile=0.25,
        burn_in=8,
        custom_explore="tests.distributed.scripts.explore_fns:halve_lr",
        seed=5,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out


def ready_lines(out: Path) -> list[dict]:
    return [r for r in load_lineage(out) if r["event"] != "init"]


@pytest.mark.parametrize("layout", ["run_2x2", "run_4x1"])
def test_exploit_copies_the_donors_snapshot_bit_exactly(layout, request):
    """A loser's rank j holds, after its ready step, exactly what the donor's rank j held at the donor's
    ready step ``donor_step`` (model and optimizer); a member that keeps holds what it had."""
    out = request.getfixturevalue(layout)
    ranks = load_ranks(out)
    lines = ready_lines(out)
    exploits = [r for r in lines if r["event"] == "exploit"]
    assert exploits, "the run should exploit at least once"
    for rank in ranks:
        before = {r["step"]: r for r in rank["before"]}
        after = {r["step"]: r for r in rank["after"]}
        for rec in (r for r in lines if r["member"] == rank["member"]):
            mine = after[rec["step"]]
            if rec["event"] == "exploit":
                donor = next(
                    r for r in ranks if r["member"] == rec["parent"] and r["global_rank"] == rank["global_rank"]
                )
                donor_before = {r["step"]: r for r in donor["before"]}[rec["donor_step"]]
                assert (mine["model"], mine["optimizer"]) == (donor_before["model"], donor_before["optimizer"])
            else:
                assert "donor_step" not in rec
                assert (mine["model"], mine["optimizer"]) == (
                    before[rec["step"]]["model"],
                    before[rec["step"]]["optimizer"],
                )


def test_members_run_their_own_steps_and_the_lineage_has_each_ready_step_once(run_2x2):
    ranks = load_ranks(run_2x2)
    assert {r["package"] for r in ranks} == {"lightning"}
    assert {r["member"]: r["global_step"] for r in ranks} == {0: 24, 1: 16}
    lineage = load_lineage(run_2x2)
    assert sorted(r["member"] for r in lineage if r["event"] == "init") == [0, 1]
    steps = defaultdict(list)
    for rec in lineage:
        if rec["event"] != "init":
            steps[rec["member"]].append(rec["step"])
            assert set(rec) >= {"step", "epoch", "member", "score", "event", "parent", "hyperparameters", "timing"}
            assert set(rec["timing"]) == {"snapshot", "decide", "transfer"}
    assert sorted(steps[0]) == list(range(EVERY, 25, EVERY))
    assert sorted(steps[1]) == list(range(EVERY, 17, EVERY))
    # Member 1 scores higher at every step, so member 0 copies it whenever it has a snapshot, and never
    # a snapshot from the future: the donor's step was reached before the copy was made.
    exploits = [r for r in lineage if r["event"] == "exploit"]
    assert exploits and all(r["member"] == 0 and r["parent"] == 1 for r in exploits)
    assert all(r["donor_step"] in steps[1] for r in exploits)
    results = json.loads((run_2x2 / "pbt" / "results.json").read_text())  # the end-of-fit summary's facts
    assert {m["member"]: m["copied_from"] for m in results["members"]} == {0: 1, 1: None}
    # Each decision records the progress at which it compared each member (lightning_pbt.algorithm.comparable): never
    # beyond the decider's own. Member 1 never copies, so its progress is its step; member 0's is the step
    # of the member-1 snapshot it copied plus what it trained since. A member that copied since its last
    # record is left out; member 1 is never left out of member 0's decisions.
    for rec in (r for r in lineage if r["event"] != "init" and not r["extra"].get("last")):
        compared = rec["extra"]["compared"]
        me, other = compared[str(rec["member"])], compared.get(str(1 - rec["member"]))
        if rec["member"] == 1:
            assert me["progress"] == rec["step"]
        else:
            assert other is not None
        if other is not None and other["score"] is not None:
            assert other["progress"] <= me["progress"] and other["progress"] in steps[1]
    # At its last ready step a member keeps what it trained with: no decision, nothing compared.
    last = [r for r in lineage if r["extra"].get("last")]
    assert sorted((r["member"], r["step"]) for r in last) == [(0, 24), (1, 16)]
    assert all(r["event"] == "keep" and r["extra"]["compared"] == {} for r in last)
    # Member 0 copies at almost every ready step before its last: member 1 finds its record marked as
    # copied, and, having nobody else, still compares with it (the snapshot member 0 scored with): never
    # without a comparison.
    decisions = [r for r in lineage if r["member"] == 1 and r["event"] != "init" and not r["extra"].get("last")]
    assert all("0" in r["extra"]["compared"] for r in decisions)


def test_ranks_of_a_member_agree_after_every_ready_step(run_2x2):
    by_member = defaultdict(list)
    for rank in load_ranks(run_2x2):
        by_member[rank["member"]].append(rank)
    for ranks in by_member.values():
        assert len({r["final"]["model"] for r in ranks}) == 1
        for step in {r["step"] for r in ranks[0]["after"]}:
            assert len({next(x["model"] for x in r["after"] if x["step"] == step) for r in ranks}) == 1


def test_hyperparameters_in_effect_match_the_lineage(run_2x2):
    lineage = ready_lines(run_2x2)
    for rank in load_ranks(run_2x2):
        after = {r["step"]: r for r in rank["after"]}
        for rec in (r for r in lineage if r["member"] == rank["member"]):
            assert after[rec["step"]]["lr"] == pytest.approx(rec["hyperparameters"]["lr"])
            assert after[rec["step"]]["dropout"] == pytest.approx(rec["hyperparameters"]["dropout"])


def test_nan_member_is_replaced_and_never_copied(run_4x1):
    lines = ready_lines(run_4x1)
    by_key = {(r["member"], r["step"]): r for r in lines}
    diverged = [r for r in lines if r["member"] == 2 and r["score"] is None]
    assert diverged, "member 2 should have diverged"
    # It may keep while no finite member has a snapshot yet; once one has, it copies at every ready step
    # but its last (step 24), where no training follows and a member keeps what it has.
    first = next(i for i, r in enumerate(diverged) if r["event"] == "exploit")
    assert [r["step"] for r in diverged if r["extra"].get("last")] == [24]
    assert all(r["event"] == ("keep" if r["extra"].get("last") else "exploit") for r in diverged[first:])
    for rec in (r for r in lines if r["event"] == "exploit"):
        donor_line = by_key[(rec["parent"], rec["donor_step"])]
        assert donor_line["score"] is not None and math.isfinite(donor_line["score"])


def test_burn_in_and_custom_explore_apply_to_each_members_own_steps(run_4x1):
    lineage = load_lineage(run_4x1)
    exploits = [r for r in lineage if r["event"] == "exploit"]
    assert exploits and min(r["step"] for r in exploits) >= 8
    for rec in exploits:
        # The learning rate the donor's snapshot was trained with (set at its line before donor_step), halved.
        earlier = [r for r in lineage if r["member"] == rec["parent"] and r["step"] < rec["donor_step"]]
        trained_with = max(earlier, key=lambda r: r["step"])["hyperparameters"]["lr"]
        assert rec["hyperparameters"]["lr"] == pytest.approx(max(1e-3, trained_with / 2))
        assert all(m.endswith("(custom)") for m in rec["mutations"])


def test_a_stopped_member_stays_a_donor_and_nobody_waits_for_it(run_4x1):
    ranks = {r["member"]: r for r in load_ranks(run_4x1)}
    assert ranks[3]["global_step"] == 8
    assert all(ranks[m]["global_step"] == 24 for m in (0, 1, 2))
    lines = ready_lines(run_4x1)
    assert max(r["step"] for r in lines if r["member"] == 3) == 8
    for member in (0, 1, 2):
        assert sorted(r["step"] for r in lines if r["member"] == member) == list(range(EVERY, 25, EVERY))


def test_resume_continues_each_members_lineage(tmp_path):
    """Resume with ckpt_path="last", each member from its own step. Member 1 had already reached its
    max_steps: its training loop does not run again, yet it takes part (as a donor) instead of leaving
    the others waiting for it."""
    common = {"synchronous": False, "flavour": "lightning", "devices": 2, "member_size": 1, "every": EVERY}
    common["ckpt_every"] = EVERY
    first = run_population(tmp_path, max_steps=12, slow_members=[1], slow_delay=0.03, **common)
    assert first.returncode == 0, first.stdout[-4000:]
    before = load_lineage(tmp_path)
    second = run_population(tmp_path, timeout=100, max_steps=24, member_max_steps={"1": 12}, resume=True, **common)
    assert second.returncode == 0, second.stdout[-4000:]
    assert f"Restored all states from the checkpoint at {tmp_path}/ckpt/member_0/last.ckpt" in second.stdout
    assert not (tmp_path / "pbt" / "previous_1").exists()  # continued, not restarted
    lineage = load_lineage(tmp_path)
    assert lineage[: len(before)] == before
    for member, last in ((0, 24), (1, 12)):
        steps = sorted(r["step"] for r in lineage if r["member"] == member and r["event"] != "init")
        assert steps == list(range(EVERY, last + 1, EVERY)), member
    ranks = {r["member"]: r for r in load_ranks(tmp_path)}
    assert (ranks[0]["global_step"], ranks[1]["global_step"]) == (24, 12)
    restored = {r["member"]: r["hyperparameters"] for r in before if r["step"] == 12}
    first_after = {r["step"]: r for r in ranks[0]["before"]}[16]
    assert first_after["lr"] == pytest.approx(restored[0]["lr"])


def test_a_killed_two_rank_member_resumes_with_its_ranks_at_one_ready_step(tmp_path):
    """2 members x 2 ranks; member 1's second rank is killed at step 14, which ends the run. On resume with
    ckpt_path="last", member 0's second rank is given its member's checkpoint of ready step 8 (as a rank
    whose node keeps older files would be), its first rank the last one (12 or later). The ranks of one
    member must resume together: member 0 rolls back to step 8 on both ranks, while member 1 resumes at
    its own last ready step (members of an asynchronous run need not agree). Every ready step of each
    member is in the lineage once, and the ranks of each member hold the same weights after each of them."""
    common = {"synchronous": False, "devices": 4, "member_size": 2, "every": EVERY, "ckpt_every": EVERY}
    common["monitor"] = "member_const"  # member 0 copies member 1 whenever it can: copies are in the checkpoints
    # Member 1 is slower: member 0 is past step 8 when member 1's rank is killed (on a loaded machine a
    # snapshot costs up to 0.7 s, so member 1 waits 0.15 s a step, 2 s before the kill).
    killed = run_population(
        tmp_path, timeout=120, max_steps=400, kill_world_rank=3, kill_at=14, slow_members=[1], slow_delay=0.15, **common
    )
    assert killed.returncode != 0 and (tmp_path / "killed_at").exists(), killed.stdout[-4000:]
    last = {m: torch.load(tmp_path / "ckpt" / f"member_{m}" / "last.ckpt", weights_only=True) for m in (0, 1)}
    assert last[0]["global_step"] > 8 and last[1]["global_step"] >= 12, {m: c["global_step"] for m, c in last.items()}
    resumed = run_population(tmp_path, timeout=150, max_steps=24, resume=True, resume_step_by_rank={"1": 8}, **common)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "member 0 resumes from" in resumed.stdout and "step=8.ckpt (ready step 8, as the others)" in resumed.stdout
    assert "member 1 resumes from" not in resumed.stdout
    lineage = ready_lines(tmp_path)
    for member in (0, 1):
        steps = sorted(r["step"] for r in lineage if r["member"] == member)
        assert steps == list(range(EVERY, 25, EVERY)), (member, steps)
    by_member = defaultdict(list)
    for rank in load_ranks(tmp_path):
        by_member[rank["member"]].append(rank)
    assert sorted(by_member) == [0, 1] and all(len(ranks) == 2 for ranks in by_member.values())
    first_step = {}
    for member, ranks in by_member.items():
        assert all(r["global_step"] == 24 for r in ranks)
        first_step[member] = min(r["step"] for r in ranks[0]["after"])
        for step in {r["step"] for r in ranks[0]["after"]}:
            assert len({next(x["model"] for x in r["after"] if x["step"] == step) for r in ranks}) == 1, step
        assert ranks[0]["hyperparameters"] == [r for r in lineage if r["member"] == member][-1]["hyperparameters"]
    # Member 0 trained again from step 8 on both ranks; member 1 from its own last ready step.
    assert first_step == {0: 12, 1: last[1]["global_step"] + EVERY}


def test_a_donor_that_fails_while_serving_ends_the_run_with_its_error(tmp_path):
    """Member 1's snapshot server breaks when member 0 asks for a copy: every rank ends, naming it."""
    started = time.monotonic()
    proc = run_population(
        tmp_path,
        timeout=120,
        synchronous=False,
        devices=2,
        member_size=1,
        max_steps=400,
        every=EVERY,
        monitor="member_const",
        serve_fail_member=1,
    )
    assert proc.returncode != 0
    assert not list(tmp_path.glob("rank_*.json"))
    # Both ranks were ended by the abort flag, with the server's error, long before the 60 s group
    # timeout would have ended the loser's receive.
    # One line per rank says who failed (the server's error is not a member's traceback): the watchdog's, or
    # the error hook's where the training thread saw the flag first (under load it can).
    for rank in (0, 1):
        assert re.search(
            rf"\[(lightning_pbt rank {rank}|member \d+, rank {rank})\] stopped: lightning-pbt-snapshot-server-1 "
            "failed: RuntimeError: injected serving failure\n",
            proc.stdout,
        ), proc.stdout[-3000:]
    assert time.monotonic() - started < 45


def test_snapshots_between_ready_steps_are_copied_bit_exactly(tmp_path):
    """With ``snapshot_every_n_train_steps=2`` a member also snapshots 2, 4, 6 steps after each ready step
    (every 8). Member 1, always better, runs at 2/3 of member 0's speed: it has published its first ready
    step when member 0 decides at 16 but is behind it from then on, so member 0 copies in-between
    snapshots. Each of member 0's ranks then holds exactly what the donor's rank held after that
    optimizer step (both ranks of member 0 copied the same step: one lineage line per exploit)."""
    out = tmp_path / "snapshots_between"
    proc = run_population(
        out,
        flavour="lightning",
        synchronous=False,
        devices=4,
        member_size=2,
        max_steps=40,
        every=8,
        snapshot_every=2,
        member_delays={"0": 0.03, "1": 0.045},
        monitor="member_const",
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks, lines = load_ranks(out), ready_lines(out)
    exploits = [r for r in lines if r["event"] == "exploit"]
    assert exploits and all(r["member"] == 0 and r["parent"] == 1 for r in exploits)
    between = [r for r in exploits if r["donor_step"] % 8]
    assert between, f"no copy of an in-between snapshot: donor steps {[r['donor_step'] for r in exploits]}"
    assert all(r["donor_step"] % 2 == 0 for r in exploits)  # snapshots only every 2 steps after a ready step
    for rank in (r for r in ranks if r["member"] == 0):
        after = {r["step"]: r for r in rank["after"]}
        donor = next(r for r in ranks if r["member"] == 1 and r["global_rank"] == rank["global_rank"])
        donor_states = {r["step"]: r for r in donor["batches"]}
        for rec in exploits:
            mine, theirs = after[rec["step"]], donor_states[rec["donor_step"]]
            assert (mine["model"], mine["optimizer"], mine["schedulers"]) == (
                theirs["model"],
                theirs["optimizer"],
                theirs["schedulers"],
            )


def test_members_that_wait_for_peers_at_equal_speeds_make_lockstep_decisions(tmp_path):
    """4 members of equal speed (validation accuracy, which differs between members and moves): with
    ``wait_for_peers`` each member sees the whole population at its ready step, carries out its part of
    lockstep's plan, and the asynchronous run is the lockstep run, decision for decision and bit for bit."""
    runs = {}
    for mode, options in {
        "lockstep": {"synchronous": True},
        "waiting": {"synchronous": False, "wait_for_peers": 1.0},
    }.items():
        out = tmp_path / mode
        proc = run_population(
            out,
            devices=4,
            member_size=1,
            max_steps=20,
            every=EVERY,
            member_delays={str(m): 0.03 for m in range(4)},
            **options,
        )
        assert proc.returncode == 0, proc.stdout[-4000:]
        runs[mode] = out
    decided = {mode: [r for r in ready_lines(out) if not r["extra"]["done"]] for mode, out in runs.items()}

    def decisions(lines):
        return sorted(
            (r["step"], r["member"], r["event"], r["parent"], r["score"], r["hyperparameters"]) for r in lines
        )

    assert len(decided["waiting"]) == 4 * 5
    # Every decision in step; the last ready step (step 20) is no decision: every member keeps there.
    assert all(r["extra"]["in_step"] for r in decided["waiting"] if not r["extra"].get("last"))
    assert sorted(r["step"] for r in decided["waiting"] if r["extra"].get("last")) == [20] * 4
    assert decisions(decided["waiting"]) == decisions(decided["lockstep"])
    assert any(r["event"] == "exploit" for r in decided["lockstep"])
    final = {mode: {r["member"]: r["final"] for r in load_ranks(out)} for mode, out in runs.items()}
    assert final["waiting"] == final["lockstep"]
