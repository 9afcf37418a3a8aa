"""The preloaded launcher most distributed tests use (tests/preloaded.py) gives each rank what a fresh
``python script.py`` under torchrun would have: its own rank, argv and random state, a working rendezvous,
Lightning's rank-zero filter for its rank, and its exit code."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SCRIPTS, run_script

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


def test_each_preloaded_rank_runs_the_script_as_a_fresh_torchrun_rank(tmp_path):
    argv = [str(tmp_path), "3"]
    proc = run_script(SCRIPTS / "launch_probe.py", argv, nproc=3, timeout=100, env={"PYTHONWARNINGS": "error"})
    probes = [json.loads((tmp_path / f"probe_{rank}.json").read_text()) for rank in range(3)]
    assert [p["rank"] for p in probes] == [0, 1, 2]
    assert all(p["world"] == [0, 1, 2] for p in probes)
    assert all(p["argv"] == [str(tmp_path), "3"] and p["main"] == "__main__" for p in probes)
    assert all(p["path0"] == str(SCRIPTS) for p in probes)
    assert [p["rank_zero_only"] for p in probes] == [0, 1, 2]
    assert len({p["random"] for p in probes}) == 3  # not the fork server's one random state
    assert all(p["warnings"] == ["error"] for p in probes)  # PYTHONWARNINGS applies as at start-up
    assert proc.returncode == 3  # rank 1's exit code, the first failing one
