"""The main job, examples/digits.py, run as a user runs it: a subprocess, tiny budgets.

Each module-scoped fixture is one launch; the tests read what it left behind. The default launch runs
from an empty working directory without ``hydra.run.dir`` so that the run-directory agreement between
processes is tested too (Lightning's launcher here, torchrun below).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_job

APP = str(REPO / "examples" / "digits.py")
TINY = ["trainer.max_epochs=2", "pbt.every_n_epochs=1"]

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def app(*overrides: str, cwd: Path, nproc: int | None = None, timeout: float = 150):
    """``python examples/digits.py ...`` (or under ``torchrun --standalone`` with ``nproc`` processes)."""
    if nproc is None:
        args = [sys.executable, APP, *overrides]
    else:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                APP, *overrides]
    return run_job(args, timeout, cwd=cwd)


def lineage(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "pbt" / "lineage.jsonl").read_text().splitlines() if line]


def only_run_dir(cwd: Path) -> Path:
    """The one run directory under ``cwd/outputs`` (the one holding .hydra/), failing if there are more."""
    runs = sorted(p.parent for p in (cwd / "outputs").rglob(".hydra"))
    assert len(runs) == 1, f"the processes did not agree on one run directory: {runs}"
    return runs[0]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default config (4 CPU ranks = 4 members, Lightning's launcher), two epochs."""
    cwd = tmp_path_factory.mktemp("default")
    proc = app(*TINY, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc, only_run_dir(cwd)


@pytest.fixture(scope="module")
def custom_space_run(tmp_path_factory):
    """Bounds overridden, momentum added, dropout removed; 2 members; an explicit hydra.run.dir."""
    run_dir = tmp_path_factory.mktemp("custom") / "run"
    proc = app(
        "trainer.devices=2", "trainer.max_epochs=3", "pbt.every_n_epochs=1", "pbt.resample_probability=0.5",
        "pbt.hyperparameters.lr.low=0.01", "pbt.hyperparameters.lr.high=0.02",
        "+pbt.hyperparameters.momentum={type:uniform,low:0.5,high:0.6}", "~pbt.hyperparameters.dropout",
        "report=false", f"hydra.run.dir={run_dir}", cwd=run_dir.parent,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc, run_dir


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """The same app under torchrun: every process composes its own config, all must pick one dir, and
    trainer.devices follows --nproc_per_node."""
    cwd = tmp_path_factory.mktemp("torchrun")
    proc = app(*TINY, cwd=cwd, nproc=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc, only_run_dir(cwd)


@pytest.fixture(scope="module")
def turns_run(tmp_path_factory):
    """The default population (4 members) in one process: strategy.members_per_process=4."""
    cwd = tmp_path_factory.mktemp("turns")
    proc = app(*TINY, "trainer.devices=1", "strategy.members_per_process=4", cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc, only_run_dir(cwd)


# -- the default run ----------------------------------------------------------------------------------
def test_default_run_leaves_lineage_logs_checkpoints_and_plots(default_run):
    _, run_dir = default_run
    records = lineage(run_dir)
    assert sorted({r["member"] for r in records}) == [0, 1, 2, 3]
    assert [r["event"] for r in records[:4]] == ["init"] * 4
    assert len({r["step"] for r in records if r["event"] != "init"}) == 2  # one ready step per epoch
    assert all(set(r["hyperparameters"]) == {"lr", "weight_decay", "dropout"} for r in records)
    assert len({r["hyperparameters"]["lr"] for r in records[:4]}) == 4  # each member its own start
    for member in range(4):
        assert (run_dir / f"member_{member}" / "metrics.csv").stat().st_size > 0
        assert list((run_dir / f"member_{member}" / "checkpoints").glob("*.ckpt"))
    for name in ("hyperparameters.png", "scores.png", "lineage_tree.png"):
        data = (run_dir / "pbt" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    schedule = json.loads((run_dir / "pbt" / "schedule.json").read_text())
    assert schedule["schedule"][0]["step"] == 0
    assert (run_dir / "pbt" / "summary.md").read_text().startswith("# Population Based Training report")
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_default_run_prints_one_population_table_with_outputs(default_run):
    proc, run_dir = default_run
    out = proc.stdout
    assert out.count("| member | val_acc | step | dropout | lr | weight_decay | last copied from |") == 1  # rank 0 only
    assert out.count("Best member:") == 1
    assert f"Outputs in {run_dir}" in out
    assert "Traceback" not in out


def test_four_members_taking_turns_in_one_process_write_the_default_runs_lineage(default_run, turns_run):
    """strategy.members_per_process=4 on one process: the same members, decisions, scores and values as the
    default run's 4 processes."""

    def without_timing(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in record.items() if k != "timing"} for record in lineage(run_dir)]

    assert without_timing(turns_run[1]) == without_timing(default_run[1])
    assert {record["member"] for record in lineage(turns_run[1])} == {0, 1, 2, 3}


def _demo_block(text: str) -> list[str]:
    """The lines of the fenced block after the README's demo-output marker."""
    after = text.split("<!-- demo-output:", 1)[1].split("```\n", 1)[1]
    return after.split("\n```", 1)[0].splitlines()


def _layout(line: str) -> str:
    """A line with its numbers elided (and the run's own paths), keeping words, separators and columns."""
    line = re.sub(r"^.*?(PBT step)", r"\1", line)  # what the progress bar left before it on the same line
    line = re.sub(r"\S*outputs/\S+", "PATH", line)
    line = re.sub(r"\| - \|$", "| N |", line)  # "last copied from": a member id, or - for one that never copied
    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "N", line)


def test_the_readmes_demo_output_is_the_layout_of_a_real_run(default_run):
    """README.md shows `make demo`'s output (a real run at 20 epochs; this one has 2): the same lines, in the
    same order, with the same columns; the member column is the population's ids, best first by score."""
    proc, _ = default_run
    readme = _demo_block((REPO / "README.md").read_text())
    printed = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(printed) if line.startswith("Population at the end of fit"))
    ran = printed[start:start + len(readme) - 4]  # the README's table and what follows it
    table = readme[readme.index(next(r for r in readme if r.startswith("Population at the end of fit"))):]
    assert [_layout(line) for line in ran] == [_layout(line) for line in table]
    for rows in (ran, table):
        members = [row.split(" | ") for row in rows if re.match(r"^\| \d", row)]
        assert sorted(int(r[0][2:]) for r in members) == [0, 1, 2, 3]
        scores = [float(r[1]) for r in members]
        assert scores == sorted(scores, reverse=True)
        best = re.search(r"^Best member: (\d+) \(val_acc ([\d.]+)\)$", "\n".join(rows), flags=re.M)
        assert (int(best[1]), float(best[2])) == (int(members[0][0][2:]), scores[0])
    steps = [_layout(line) for line in printed if "PBT step" in line]
    assert len(steps) == 2 and all(line.startswith("PBT step N: best member N (val_acc N); ") for line in steps)
    assert _layout(readme[0]).startswith("PBT step N: best member N (val_acc N); member N copied member N, ")
    last = "PBT step N: best member N (val_acc N); every member kept (last ready step: no explore)"
    assert _layout(readme[2]) == steps[-1] == last


def test_members_start_from_different_weights(default_run):
    """configure_model runs after the strategy seeded each member: the initial losses differ."""
    _, run_dir = default_run
    first_losses = set()
    for member in range(4):
        rows = (run_dir / f"member_{member}" / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        column = header.index("val_loss")
        first = next(row.split(",") for row in rows[1:] if row.split(",")[column])
        first_losses.add(first[column])
    assert len(first_losses) == 4


def test_report_command_on_a_finished_run(default_run, tmp_path):
    _, run_dir = default_run
    proc = run_job([sys.executable, "-m", "lightning_pbt.report", str(run_dir), "--out", str(tmp_path)], 60)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "## Best member:" in proc.stdout
    assert "pbt.mode in" in proc.stdout  # the mode came from the run's Hydra config
    assert all((tmp_path / name).stat().st_size > 0 for name in ("scores.png", "schedule.json", "summary.md"))


def test_replay_of_the_best_schedule_in_one_process(default_run, tmp_path):
    """The replay command of docs/guides/reading-a-run.md: the app, one process, no population, PBTReplay."""
    _, run_dir = default_run
    schedule = json.loads((run_dir / "pbt" / "schedule.json").read_text())["schedule"]
    steps = [entry["step"] for entry in schedule]  # within the 2 epochs of the PBT run
    proc = app(f"replay={run_dir / 'pbt' / 'schedule.json'}", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path}",
               cwd=tmp_path, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"Replayed {len(schedule)} schedule entries (changes at steps {steps})" in proc.stdout
    results = json.loads((run_dir / "pbt" / "results.json").read_text())  # PBT's score beside the replayed one
    best = results["members"][0]
    assert f"(PBT's member {best['member']} reached {best['score']:.4g} with this schedule)" in proc.stdout
    assert (tmp_path / "replay" / "metrics.csv").is_file() and not (tmp_path / "pbt").exists()


# -- overrides ----------------------------------------------------------------------------------------
def test_overridden_bounds_added_and_removed_hyperparameters(custom_space_run):
    _, run_dir = custom_space_run
    records = lineage(run_dir)
    assert len({r["step"] for r in records if r["event"] != "init"}) == 3
    for record in records:
        values = record["hyperparameters"]
        assert set(values) == {"lr", "weight_decay", "momentum"}  # dropout removed, momentum added
        assert 0.01 <= values["lr"] <= 0.02
        assert 0.5 <= values["momentum"] <= 0.6
        assert 1e-6 <= values["weight_decay"] <= 1e-2
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "momentum:" in config and "dropout: {" not in config
    assert not (run_dir / "pbt" / "scores.png").exists()  # report=false


def test_added_optimizer_hyperparameter_reaches_the_optimizer(custom_space_run):
    """The final checkpoint's optimizer holds the momentum PBT decided last for that member."""
    _, run_dir = custom_space_run
    final = {r["member"]: r["hyperparameters"] for r in lineage(run_dir)}
    for member, values in final.items():
        (ckpt,) = (run_dir / f"member_{member}" / "checkpoints").glob("*.ckpt")
        group = torch.load(ckpt, map_location="cpu", weights_only=False)["optimizer_states"][0]["param_groups"][0]
        assert math.isclose(group["momentum"], values["momentum"])
        assert math.isclose(group["lr"], values["lr"])


# -- torchrun -----------------------------------------------------------------------------------------
def test_torchrun_processes_agree_on_one_run_directory(torchrun_run):
    proc, run_dir = torchrun_run
    assert run_dir.name.startswith("torchrun-")
    assert sorted(p.name for p in run_dir.glob("member_*")) == ["member_0", "member_1"]
    assert sorted({r["member"] for r in lineage(run_dir)}) == [0, 1]
    assert proc.stdout.count("Best member:") == 1
    assert f"Outputs in {run_dir}" in proc.stdout


# -- malformed overrides ------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("override", "nproc", "message"),
    [
        ("pbt.hyperparameters.lr.low=-1", None, "pbt.hyperparameters.lr: LogUniform: low (-1.0) must be > 0"),
        ("pbt.hyperparameters.lr.type=bogus", 2, "pbt.hyperparameters.lr: unknown type 'bogus'"),
    ],
    ids=["lightning-launcher", "torchrun"],
)
def test_malformed_space_fails_fast_naming_the_key(override, nproc, message, tmp_path):
    """Every process validates before a Trainer exists: a clear message, a non-zero exit, no hang."""
    proc = app(override, cwd=tmp_path, nproc=nproc, timeout=90)
    assert proc.returncode != 0
    reports = proc.stdout.count(f"digits.py: invalid configuration: {message}")
    # Every process validates; under torchrun the agent may kill a sibling before it gets to print.
    assert (reports >= 1 if nproc else reports == 1), proc.stdout[-3000:]
    if nproc is None:
        assert "Traceback" not in proc.stdout  # (torchrun's agent prints its own when a worker fails)
    assert not list(tmp_path.rglob("lineage.jsonl"))  # no Trainer ever started
