"""Members that take turns (``PopulationStrategy(members_per_process=K)``): a member that takes turns
trains exactly as it would in its own process.

Each fixture launches one population (tests/distributed/scripts/turns_run.py, preloaded ranks, gloo)
and the tests compare what its members recorded with the same population laid out one member per
process: the lineage, every member's state after every ready step, every training loss (they depend
on the data order, the weights and the dropout masks). 8 processes on 2 shared cores take minutes: the
two 8-member runs are the cost of the layout comparison that matters most.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import SCRIPTS, run_script

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

# 10 batches per epoch, a ready step every 5 optimizer steps: mid-epoch (5, 15, 25) and at epoch ends
# (10, 20, 30); member 5 stops early (EarlyStopping on a metric that never improves for it).
MID_EPOCH = {"train_size": 80, "val_check_interval": 5, "every_n_train_steps": 5, "max_epochs": 3, "stop_member": 5}
EVERY_EPOCH = {"train_size": 48, "every_n_epochs": 1, "max_epochs": 4}


def run_turns(out: Path, timeout: float = 600, max_restarts: int | None = None, **cfg) -> Path:
    """Run turns_run.py with ``cfg`` on preloaded ranks (tests/preloaded.py), or under torchrun with
    ``max_restarts``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = [json.dumps({"out": str(out), **cfg})]
    torchrun = max_restarts is not None
    proc = run_script(
        SCRIPTS / "turns_run.py", payload, cfg["devices"], timeout, torchrun, max_restarts or 0,
        env={"PYTHONWARNINGS": "default"},  # as in a user's shell: warnings shown
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    (out / "console.txt").write_text(proc.stdout)
    return out


def lineage(out: Path) -> list[dict]:
    """The lineage without its timings (wall-clock seconds differ from run to run)."""
    records = [json.loads(line) for line in (out / "pbt" / "lineage.jsonl").read_text().splitlines() if line.strip()]
    for record in records:
        record.pop("timing", None)
    return records


def members(out: Path) -> dict[int, dict]:
    return {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in out.glob("member_*.json")}


@pytest.fixture(scope="module")
def run_2x4(tmp_path_factory) -> Path:
    """8 members as 2 processes x 4 lanes."""
    return run_turns(tmp_path_factory.mktemp("turns_2x4"), devices=2, members_per_process=4, **MID_EPOCH)


@pytest.fixture(scope="module")
def run_8x1(tmp_path_factory) -> Path:
    """The same 8 members, one per process."""
    return run_turns(tmp_path_factory.mktemp("turns_8x1"), devices=8, members_per_process=1, **MID_EPOCH)


def test_eight_members_as_two_processes_of_four_write_the_lineage_of_eight_processes(run_2x4, run_8x1):
    turns, alone = lineage(run_2x4), lineage(run_8x1)
    assert turns == alone
    steps = sorted({record["step"] for record in turns if record["event"] != "init"})
    assert steps == [5, 10, 15, 20, 25, 30]  # mid-epoch ready steps and epoch ends
    assert sum(record["event"] == "exploit" for record in turns) >= 4
    assert len({record["member"] for record in turns}) == 8


def test_every_member_trains_bit_for_bit_as_in_its_own_process(run_2x4, run_8x1):
    """Same data order, dropout masks (the process-wide RNG, swapped at every turn), weights, optimizer
    state and scheduler position at every ready step, after its exploits."""
    turns, alone = members(run_2x4), members(run_8x1)
    assert sorted(turns) == sorted(alone) == list(range(8))
    for member in range(8):
        assert turns[member]["losses"] == alone[member]["losses"], member
        assert turns[member]["at_validation"] == alone[member]["at_validation"], member
        assert turns[member]["final"] == alone[member]["final"], member
    assert {turns[m]["world_rank"] for m in range(8)} == {0, 1}
    assert [turns[m]["thread"] == "MainThread" for m in range(8)] == [m % 4 == 0 for m in range(8)]


def test_exploits_within_a_process_and_across_processes_copy_the_full_state_bit_exactly(run_2x4):
    """After an exploit the loser holds the donor's weights, optimizer state and LR scheduler (position
    and schedule); members 0-3 share process 0 and members 4-7 process 1."""
    recorded = members(run_2x4)
    kinds = set()
    for record in lineage(run_2x4):
        if record["event"] != "exploit":
            continue
        loser, donor, step = record["member"], record["parent"], record["step"]
        after = {m: next(s for s in recorded[m]["at_validation"] if s["step"] == step) for m in (loser, donor)}
        for key in ("model", "optimizer", "schedulers"):
            assert after[loser][key] == after[donor][key], (step, loser, donor, key)
        assert after[loser]["dropout"] == record["hyperparameters"]["dropout"]
        kinds.add("within" if loser // 4 == donor // 4 else "across")
    assert kinds == {"within", "across"}


def test_a_member_that_stops_early_ends_only_its_own_turns(run_2x4):
    recorded = members(run_2x4)
    assert recorded[5]["stopped_early"] and recorded[5]["global_step"] == 10
    assert all(recorded[m]["global_step"] == 30 and not recorded[m]["stopped_early"] for m in range(8) if m != 5)
    fives = [record for record in lineage(run_2x4) if record["member"] == 5 and record["event"] != "init"]
    assert [record["extra"]["done"] for record in fives] == [False, False, True, True, True, True]
    assert all(record["parent"] == 5 for record in fives[2:])  # a stopped member is never replaced


def test_the_population_speaks_once_for_all_the_members_that_take_turns(run_2x4, run_8x1):
    """One console line per ready step, one summary with each of the 8 members once, and every member's own
    callback with the population's results, as with one member per process; the members, built in
    configure_model after the strategy seeded each, start apart: no identical-starts report."""
    console = (run_2x4 / "console.txt").read_text()
    steps = sorted({record["step"] for record in lineage(run_2x4) if record["event"] != "init"})
    assert re.findall(r"^PBT step (\d+):", console, flags=re.MULTILINE) == [str(step) for step in steps]
    assert console.count("Population at the end of fit (val_acc, best first):") == 1
    rows = re.findall(r"^\| (\d+) \| ", console, flags=re.MULTILINE)
    assert sorted(int(row) for row in rows) == list(range(8))
    assert "start from identical weights" not in console
    turns, alone = members(run_2x4), members(run_8x1)

    def comparable(results: list[dict], out: Path) -> list[dict]:  # the checkpoints lie in each run's folder
        return [{**r, "checkpoint_path": r["checkpoint_path"].replace(str(out), "RUN")} for r in results]

    assert sorted(r["member"] for r in turns[0]["results"]) == list(range(8))
    for member in range(8):
        assert comparable(turns[member]["results"], run_2x4) == comparable(alone[0]["results"], run_8x1), member
        assert turns[member]["best_member"] == alone[0]["best_member"] == turns[0]["results"][0]["member"]


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def test_each_member_logs_and_checkpoints_only_its_own_training(run_2x4):
    recorded = members(run_2x4)
    for member, record in recorded.items():
        assert Path(record["log_dir"]).is_relative_to(run_2x4 / f"member_{member}")
        with open(Path(record["log_dir"]) / "metrics.csv") as f:
            values = {row["member_const"] for row in csv.DictReader(f) if row["member_const"]}
        assert values == {f"{float(member)}"}, (member, values)
        # Every checkpoint this member's ModelCheckpoint saved holds its own weights of that step.
        at_step = {entry["step"]: entry["model"] for entry in record["at_validation"]}
        saved = sorted(Path(record["checkpoint_dir"]).glob("*.ckpt"))
        assert len(saved) >= 2, saved  # the best one and last.ckpt
        for path in saved:
            checkpoint = torch.load(path, weights_only=True)
            assert _digest(checkpoint["state_dict"].values()) == at_step[checkpoint["global_step"]], (member, path)


@pytest.mark.parametrize("members_per_process", [2])
def test_members_of_two_ranks_take_turns_as_they_train_on_their_own_ranks(tmp_path, members_per_process):
    """member_size=2: 2 members of 2 DDP ranks as 2 processes x 2 lanes and as 4 processes."""
    common = {"member_size": 2, **EVERY_EPOCH}
    turns = run_turns(tmp_path / "turns", devices=2, members_per_process=members_per_process, **common)
    alone = run_turns(tmp_path / "alone", devices=4, members_per_process=1, **common)
    assert lineage(turns) == lineage(alone)
    assert sum(record["event"] == "exploit" for record in lineage(turns)) >= 1
    assert members(turns).keys() == members(alone).keys() == {0, 1}
    for member, record in members(turns).items():
        other = members(alone)[member]
        assert (record["losses"], record["at_validation"], record["final"]) == (
            other["losses"],
            other["at_validation"],
            other["final"],
        )


def test_an_elastic_restart_of_a_crashed_run_restores_every_member_of_the_killed_process(tmp_path):
    """2 processes x 4 members under torchrun --max-restarts=1. Process 1 dies while member 6 (its third
    lane) saves its checkpoint of ready step 12, after members 4 and 5 (lanes before it) and member 0
    saved theirs: the members' newest checkpoints are of steps 12 and 6. The restarted processes resume
    every member with ``fit(ckpt_path="last")``, agree on step 6 (members ahead roll back to their
    checkpoint of step 6, lanes of one process included) and finish with the lineage, the training
    losses and the states of the same run never interrupted: each member's RNG travels in its checkpoint,
    so it draws the same dropout masks after the restart (resumed at epoch ends, where the data order is
    the sampler's).

    The crashed run also parks waiting members in fresh CPU storage (the stand-in for pinned host memory,
    ``park_stand_in``): every hand-over copies their weights, gradients and optimizer state out and back,
    and training stays bit for bit the reference's, which parks nothing (the CPU's choice)."""
    common = {"devices": 2, "members_per_process": 4, "resume": True, **EVERY_EPOCH, "max_epochs": 3}
    crash = {"kill_before_save": {"member": 6, "step": 12}, "park_stand_in": True}
    crashed = run_turns(tmp_path / "crashed", max_restarts=1, **crash, **common)
    reference = run_turns(tmp_path / "reference", max_restarts=0, **common)
    stdout = (crashed / "console.txt").read_text()
    for member in (0, 1):  # lanes 0 and 1 of process 0 (only population rank 0's process prints warnings)
        assert f"member {member} resumes from" in stdout and "(ready step 6, as the others)" in stdout, stdout[-3000:]
    assert lineage(crashed) == lineage(reference)
    assert sorted({r["step"] for r in lineage(crashed) if r["event"] != "init"}) == [6, 12, 18]
    after, before = members(crashed), members(reference)
    assert sorted(after) == sorted(before) == list(range(8))
    # after the restart, 2 ready steps (12, 18) at which each of a process's 4 members parked once
    assert [after[m]["parked"] for m in range(8)] == [8] * 8 and before[0]["parked"] == 0
    for member in range(8):
        resumed = after[member]
        assert [entry["step"] for entry in resumed["at_validation"]] == [12, 18], member  # trained again from 6
        assert resumed["at_validation"] == before[member]["at_validation"][1:], member
        assert resumed["losses"] == before[member]["losses"][6:], member
        assert resumed["final"] == before[member]["final"], member
