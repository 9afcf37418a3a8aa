"""Faults and resume: corrupt or foreign files, all-NaN populations, SIGTERM. Nothing hangs or is lost."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import SCRIPTS, load_lineage, load_ranks, rank_errors, run_population, start_job

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """Two members, 12 steps, a checkpoint after every ready step: the starting point to resume from."""
    out = tmp_path_factory.mktemp("finished")
    proc = run_population(out, devices=2, member_size=1, max_steps=12, every=4, ckpt_every=4)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out


def every_rank_raised(out: Path, message: str, proc) -> bool:
    """Both ranks raised ``message`` themselves (not ended by a peer's abort)."""
    errors = rank_errors(out)
    assert sorted(errors) == [0, 1], proc.stdout[-3000:]
    return all(message in error for error in errors.values())


def resume_copy(finished_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


def test_corrupt_lineage_stops_every_rank_on_resume(finished_run, tmp_path):
    run = resume_copy(finished_run, tmp_path)
    lines = (run / "pbt" / "lineage.jsonl").read_text().splitlines()
    lines[3] = lines[3][:20]  # a torn line in the middle of the file
    (run / "pbt" / "lineage.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_population(run, timeout=90, devices=2, member_size=1, max_steps=24, every=4, ckpt_every=4, resume=True)
    assert proc.returncode != 0
    assert every_rank_raised(tmp_path / "run", "cannot continue the lineage: ValueError", proc)
    assert "corrupt lineage line" in proc.stdout


def test_lineage_of_another_run_is_refused(finished_run, tmp_path):
    run = resume_copy(finished_run, tmp_path)
    records = load_lineage(run)
    records[0]["hyperparameters"]["lr"] = 0.123456  # another run's init values
    (run / "pbt" / "lineage.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = run_population(run, timeout=90, devices=2, member_size=1, max_steps=24, every=4, ckpt_every=4, resume=True)
    assert proc.returncode != 0
    assert every_rank_raised(run, "belongs to another run", proc)


def test_checkpoint_of_another_run_is_refused(finished_run, tmp_path):
    run = resume_copy(finished_run, tmp_path)
    proc = run_population(
        run, timeout=90, devices=2, member_size=1, max_steps=24, every=4, ckpt_every=4, resume=True, seed=7
    )
    assert proc.returncode != 0
    assert "comes from a run with another search space or seed" in proc.stdout, proc.stdout[-3000:]


def test_unreadable_checkpoint_of_one_member_stops_every_rank(finished_run, tmp_path):
    run = resume_copy(finished_run, tmp_path)
    (run / "ckpt" / "member_1" / "last.ckpt").write_bytes(b"not a checkpoint")
    proc = run_population(run, timeout=90, devices=2, member_size=1, max_steps=24, every=4, ckpt_every=4, resume=True)
    assert proc.returncode != 0
    assert every_rank_raised(run, "world ranks [1] cannot read the checkpoint", proc)


def test_every_member_non_finite_is_a_clear_error(tmp_path):
    proc = run_population(tmp_path, timeout=90, devices=2, member_size=1, max_steps=40, every=4, nan_all=True)
    assert proc.returncode != 0
    assert every_rank_raised(tmp_path, "is NaN or infinite at this ready step", proc)


def test_sigterm_checkpoints_and_a_restart_resumes(tmp_path):
    """SIGTERM to the job (a preemption): each member saves, the job exits, ckpt_path='last' resumes."""
    cfg = {
        "out": str(tmp_path),
        "devices": 2,
        "member_size": 1,
        "max_steps": 100_000,
        "every": 4,
        "ckpt_every": 4,
        "on_exception_checkpoint": True,
    }
    proc = start_job([sys.executable, str(SCRIPTS / "population_run.py"), json.dumps(cfg)])
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("ckpt/member_*/last.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    # Lightning's SIGTERMException is a SystemExit: the job ends cleanly once every member has saved.
    saved = list(tmp_path.glob("ckpt/member_*/on_exception.ckpt"))
    assert len(saved) == 2, output[-3000:]
    stopped_at = max(torch.load(path, weights_only=True)["global_step"] for path in saved)
    target = (stopped_at // 4 + 2) * 4  # two more ready steps
    resumed = run_population(
        tmp_path, timeout=150, devices=2, member_size=1, max_steps=target, every=4, ckpt_every=4, resume=True
    )
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert all(r["global_step"] == target for r in load_ranks(tmp_path))
    ready = sorted((r["step"], r["member"]) for r in load_lineage(tmp_path) if r["event"] != "init")
    assert ready == [(s, m) for s in range(4, target + 1, 4) for m in (0, 1)]  # each ready step once, none missing
