"""Shared helpers: run a script as a multi-process job in a subprocess, with a hard timeout."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "distributed" / "scripts"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    for name in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "NODE_RANK",
        "PL_GLOBAL_SEED",
    ):
        env.pop(name, None)
    env.update(extra)
    return env


def start_job(args: list[str], cwd: Path | None = None, **env: str) -> subprocess.Popen:
    """Start ``args`` in its own process group (so that every rank it starts can be killed at once).

    ``env`` adds to (or overrides) :func:`child_env`, e.g. ``PYTHONWARNINGS="default"`` to see warnings.
    """
    return subprocess.Popen(
        args,
        cwd=cwd or REPO,
        env=child_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_job(args: list[str], timeout: float, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments) to completion; a hang fails the test at ``timeout``.

    The child gets its own process group so that a timeout kills every rank it started.
    """
    proc = start_job(args, cwd, **env)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        pytest.fail(f"{args} did not finish within {timeout}s (a hang?)\n{output[-4000:]}")
    orphans = _alive(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)  # never leave a rank behind, even when the test fails
    assert not orphans, f"{args} left processes running after it ended\n{output[-4000:]}"
    return subprocess.CompletedProcess(args, proc.returncode, output, None)


def _alive(group: int) -> bool:
    """Whether any process of the job's process group is still running (zombies excluded)."""
    for _ in range(50):  # ranks may take a moment to exit after the launcher returned
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        import time

        time.sleep(0.1)
    return True


def run_population(
    out: Path, timeout: float = 150, torchrun: bool = False, max_restarts: int = 0, launcher: str = "preloaded", **cfg
) -> subprocess.CompletedProcess:
    """Run tests/distributed/scripts/population_run.py with ``cfg``; results land in ``out``.

    ``launcher``: ``"preloaded"`` (ranks forked from a server that imported torch and Lightning once:
    tests/preloaded.py), ``"lightning"`` (``python script.py``: Lightning's launcher starts the other ranks,
    rank 0 hosts the store) or ``torchrun=True``.
    """
    out.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"out": str(out), **cfg})
    script = SCRIPTS / "population_run.py"
    return run_script(script, [payload], cfg["devices"], timeout, torchrun, max_restarts, launcher)


def run_script(
    script: Path,
    argv: list[str],
    nproc: int,
    timeout: float,
    torchrun: bool = False,
    max_restarts: int = 0,
    launcher: str = "preloaded",
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a test script on ``nproc`` ranks with one of the launchers of :func:`run_population`; ``env``
    adds to (or overrides) :func:`child_env`."""
    env = env or {}
    if torchrun:
        args = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}",
            str(script),
            *argv,
        ]
        return run_job(args, timeout, cwd, **env)
    if launcher == "lightning":
        return run_job([sys.executable, str(script), *argv], timeout, cwd, **env)
    if launcher != "preloaded":
        raise ValueError(f"launcher must be 'preloaded' or 'lightning', got {launcher!r}")
    from tests.preloaded import run_preloaded

    with tempfile.TemporaryDirectory(prefix="ranks_") as logs:
        try:
            return run_preloaded(str(script), argv, nproc, child_env(**env), timeout, cwd or REPO, Path(logs))
        except TimeoutError as hang:
            pytest.fail(f"{script.name} did not finish within {timeout}s (a hang?)\n{str(hang)[-4000:]}")


def load_ranks(out: Path) -> list[dict]:
    ranks = sorted(out.glob("rank_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    return [json.loads(p.read_text()) for p in ranks]


def rank_errors(out: Path) -> dict[int, str]:
    """``{world rank: its error}`` for every rank whose ``fit`` raised (population_run.py writes them)."""
    return {int(p.stem.split("_")[1]): p.read_text() for p in out.glob("error_*.txt")}


def load_lineage(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "pbt" / "lineage.jsonl").read_text().splitlines() if line.strip()]
