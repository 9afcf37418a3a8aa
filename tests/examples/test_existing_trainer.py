"""examples/existing_trainer.py: a plain Lightning script plus the callback and the strategy."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, run_job

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def test_existing_trainer_example_runs_a_population(tmp_path):
    script = str(REPO / "examples" / "existing_trainer.py")
    proc = run_job([sys.executable, script, "--devices", "2", "--max-epochs", "4", "--root-dir", str(tmp_path)],
                   150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    records = [json.loads(line) for line in (tmp_path / "pbt" / "lineage.jsonl").read_text().splitlines()]
    assert sorted({r["member"] for r in records}) == [0, 1]
    assert len({r["step"] for r in records if r["event"] != "init"}) == 2  # every 2 of 4 epochs
    assert sorted(p.name for p in tmp_path.glob("member_*")) == ["member_0", "member_1"]
    assert proc.stdout.count("lineage: ") == 1  # population rank 0 only
