"""A population trained as a user would (tests/distributed/scripts/realistic_run.py): a model of a few MB,
AdamW with two param groups, a per-step warm-up, bf16-mixed on CPU, gradient accumulation and clipping,
members of unequal speed and a weight average beside PBT. One launch per mode:

- lockstep (``synchronous=True``) with ``StochasticWeightAveraging``;
- asynchronous (``synchronous=False``) with ``EMAWeightAveraging``, the loser slower than its donor.

Every exploit is checked bit-exactly against the donor's state at the step its snapshot was taken
(``donor_step`` in asynchronous lineage lines): weights, optimizer state, LR-scheduler position and the
weight average. Members sit at different scheduler positions and hold averages of their own, so a part
of the state that did not move shows.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tests.conftest import SCRIPTS, load_lineage, load_ranks, run_script

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

EVERY, EPOCHS = 8, 4  # 8 optimizer steps per epoch: ready steps 8, 16, 24, 32
MOVED = ("model", "optimizer", "schedulers", "averages")


@pytest.fixture(scope="module", params=["lockstep", "asynchronous"])
def run(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"realistic_{request.param}")
    synchronous = request.param == "lockstep"
    cfg = {
        "out": str(out),
        "synchronous": synchronous,
        "average": "swa" if synchronous else "ema",
        "every": EVERY,
        "epochs": EPOCHS,
        "slow_members": [0],  # the loser: its donor runs ahead of it in asynchronous mode
        # asynchronous: enough for the donor to get a whole ready interval ahead even on a loaded machine,
        # where a snapshot costs it up to 0.7 s
        "slow_delay": 0.015 if synchronous else 0.25,
    }
    proc = run_script(SCRIPTS / "realistic_run.py", [json.dumps(cfg)], nproc=2, timeout=200)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return request.param, out


def exploits(out: Path) -> list[tuple[dict, dict, dict, dict]]:
    """``(lineage line, loser before, loser after, donor at its snapshot step)`` for every exploit."""
    ranks = {rank["member"]: rank for rank in load_ranks(out)}
    found = []
    for line in load_lineage(out):
        if line["event"] != "exploit":
            continue
        loser, donor = ranks[line["member"]], ranks[line["parent"]]
        donor_step = line.get("donor_step") or line["step"]
        found.append(
            (
                line,
                {r["step"]: r for r in loser["before"]}[line["step"]],
                {r["step"]: r for r in loser["after"]}[line["step"]],
                {r["step"]: r for r in donor["before"]}[donor_step],
            )
        )
    return found


def test_every_exploit_copies_the_donors_state_at_its_snapshot_step_bit_exactly(run):
    mode, out = run
    found = exploits(out)
    assert len(found) >= 2, f"{mode}: member 0 should copy member 1 at most ready steps"
    for line, _, after, donor in found:
        assert {k: after[k] for k in MOVED} == {k: donor[k] for k in MOVED}, line
    if mode == "asynchronous":  # the lineage names the donor's snapshot step, ahead of the slower loser
        assert all(line["donor_step"] is not None for line, *_ in found)
        assert any(line["donor_step"] != line["step"] for line, *_ in found)


def test_loser_and_donor_differ_in_every_part_before_some_exploit(run):
    """Otherwise a part that did not move could not show: e.g. members at one LR-scheduler position."""
    _, out = run
    found = exploits(out)
    for part in MOVED:
        assert any(before[part] != donor[part] for _, before, _, donor in found), part


def test_the_weight_average_goes_on_after_an_exploit(run):
    """The loser's average keeps averaging its own further training: its clock (the step or epoch of its
    last update) stays the loser's, even when the donor's snapshot is from a later step."""
    mode, out = run
    ranks = {rank["member"]: rank for rank in load_ranks(out)}
    loser = ranks[0]
    after = {r["step"]: r["averages"] for r in loser["after"]}
    before = {r["step"]: r["averages"] for r in loser["before"]}
    steps = sorted(after)
    # EMA updates at every step; SWA at each epoch start (ready step 8 ends the epoch before SWA starts).
    changed = [before[b] != after[a] for a, b in itertools.pairwise(steps) if mode == "asynchronous" or a >= 16]
    assert changed and all(changed), (mode, changed)
