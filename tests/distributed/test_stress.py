"""8 ranks (4 members x 2 and 8 x 1), ready steps every 2 steps, three fits each: no hang, full lineage."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.conftest import SCRIPTS, run_script

STEPS = 80


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("member_size", [2, 1])
def test_eight_ranks_many_ready_steps_three_times(member_size, tmp_path):
    proc = run_script(SCRIPTS / "stress.py", [str(tmp_path), str(member_size), str(STEPS)], nproc=8, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:]
    members = 8 // member_size
    for repetition in range(3):
        lines = (tmp_path / f"repetition_{repetition}" / "lineage.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        counts = Counter((r["step"], r["member"]) for r in records if r["event"] != "init")
        assert set(counts.values()) == {1}
        assert sorted({step for step, _ in counts}) == list(range(2, STEPS + 1, 2))
        assert all(sum(1 for s, _ in counts if s == step) == members for step in range(2, STEPS + 1, 2))
        for r in records:
            if r["event"] == "exploit":
                assert 1e-3 <= r["hyperparameters"]["lr"] <= 1.0
