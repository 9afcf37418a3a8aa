"""examples/cli: a LightningCLI (``lightning.pytorch``) population configured from YAML, run as a user runs it.

Two launches: Lightning's launcher with ``logger: false`` and overrides from a second ``--config`` and
the command line; torchrun with a CSV logger. Both are 2-member populations on CPU.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_job

SCRIPT = str(REPO / "examples" / "cli" / "train.py")
CONFIG = str(REPO / "examples" / "cli" / "config.yaml")
SPACE = "--trainer.callbacks.init_args.hyperparameters"

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def lineage(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "pbt" / "lineage.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def run_without_logger(tmp_path_factory):
    """``logger: false``: every member's rank 0 is a LightningCLI rank 0 writing into one run directory."""
    tmp = tmp_path_factory.mktemp("cli_no_logger")
    overlay = tmp / "short.yaml"
    overlay.write_text("trainer:\n  max_epochs: 2\n  enable_progress_bar: false\n")
    run_dir = tmp / "run"
    args = [
        sys.executable, SCRIPT, "fit", "--config", CONFIG, "--config", str(overlay),
        "--trainer.logger=false", f"--trainer.default_root_dir={run_dir}",
        f"{SPACE}.lr.init_args.low=0.01", f"{SPACE}.lr.init_args.high=0.02",  # one bound of a domain
        f"{SPACE}.momentum={{type: uniform, low: 0.5, high: 0.6}}",  # a hyperparameter added
    ]  # fmt: skip
    proc = run_job(args, 150, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc, run_dir


def test_two_members_taking_turns_in_one_process_write_the_two_process_lineage(run_without_logger, tmp_path):
    """``--trainer.strategy.init_args.members_per_process=2`` on one process: the run without a logger's
    2 members, decisions and values."""
    overlay = tmp_path / "short.yaml"
    overlay.write_text("trainer:\n  max_epochs: 2\n  enable_progress_bar: false\n")
    run_dir = tmp_path / "run"
    args = [
        sys.executable, SCRIPT, "fit", "--config", CONFIG, "--config", str(overlay),
        "--trainer.logger=false", f"--trainer.default_root_dir={run_dir}",
        f"{SPACE}.lr.init_args.low=0.01", f"{SPACE}.lr.init_args.high=0.02",
        f"{SPACE}.momentum={{type: uniform, low: 0.5, high: 0.6}}",
        "--trainer.devices=1", "--trainer.strategy.init_args.members_per_process=2",
    ]  # fmt: skip
    proc = run_job(args, 150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]

    def without_timing(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in record.items() if k != "timing"} for record in records]

    assert without_timing(lineage(run_dir)) == without_timing(lineage(run_without_logger[1]))


@pytest.fixture(scope="module")
def run_with_logger(tmp_path_factory):
    """torchrun, a CSV logger per member, Python's default warning filters (the tests' children ignore them)."""
    run_dir = tmp_path_factory.mktemp("cli_csv") / "run"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        SCRIPT, "fit", "--config", CONFIG, "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
        "--trainer.logger=CSVLogger", f"--trainer.logger.init_args.save_dir={run_dir}",
        f"--trainer.default_root_dir={run_dir}",
    ]  # fmt: skip
    proc = run_job(args, 150, cwd=run_dir.parent, PYTHONWARNINGS="default")
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc, run_dir


def test_without_logger_the_config_is_written_once_into_the_run_directory(run_without_logger):
    proc, run_dir = run_without_logger
    assert "Refusing to overwrite" not in proc.stdout and "Traceback" not in proc.stdout
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("config.yaml")) == ["config.yaml"]
    saved = (run_dir / "config.yaml").read_text()
    assert "lightning_pbt.lightning.PopulationStrategy" in saved and "max_epochs: 2" in saved
    for member in (0, 1):  # checkpoints stay per member
        assert list((run_dir / f"member_{member}" / "checkpoints").glob("*.ckpt"))


def test_search_space_overrides_reach_the_population(run_without_logger):
    """The lr bounds set on the command line, a hyperparameter added there, epochs from a second --config."""
    proc, run_dir = run_without_logger
    records = lineage(run_dir)
    assert sorted({r["member"] for r in records}) == [0, 1]
    assert len({r["step"] for r in records if r["event"] != "init"}) == 2  # max_epochs: 2, a ready step per epoch
    for record in records:
        values = record["hyperparameters"]
        assert set(values) == {"lr", "weight_decay", "dropout", "momentum"}
        assert 0.01 <= values["lr"] <= 0.02 and 0.5 <= values["momentum"] <= 0.6
        assert 1e-6 <= values["weight_decay"] <= 1e-2 and 0.0 <= values["dropout"] <= 0.5  # from the YAML
    assert all(math.isfinite(r["score"]) for r in records if r["event"] != "init")
    assert proc.stdout.count("Lineage: ") == 1 and str(run_dir / "pbt" / "lineage.jsonl") in proc.stdout


def test_with_a_logger_each_member_keeps_its_config_and_logs(run_with_logger):
    proc, run_dir = run_with_logger
    assert "Traceback" not in proc.stdout
    for member in (0, 1):
        version = run_dir / f"member_{member}" / "lightning_logs" / "version_0"
        assert (version / "config.yaml").is_file() and (version / "metrics.csv").stat().st_size > 0
    assert not (run_dir / "config.yaml").exists()
    assert len(lineage(run_dir)) > 2


def test_lightning_warnings_and_info_appear_once_per_population(run_with_logger):
    """Each member's rank 0 is a Lightning rank 0: without quieting, both would print these."""
    out = run_with_logger[0].stdout
    assert out.count("is smaller than the logging interval Trainer(log_every_n_steps=50)") == 1  # a warning
    assert out.count("`Trainer.fit` stopped: `max_epochs=1` reached.") == 1  # an info message
