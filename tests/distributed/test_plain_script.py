"""An ordinary Lightning script under torchrun, 4 members, as a new user writes it from the README
(tests/distributed/scripts/plain_script.py): what the console says, what the callback tells every rank
and what the run folder holds. Two short launches: a run that finishes, and one with a misspelt monitor.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import SCRIPTS, load_lineage, load_ranks, run_job

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

SCRIPT = SCRIPTS / "plain_script.py"


def torchrun(out: Path, **cfg):
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(SCRIPT),
            json.dumps({"out": str(out), **cfg})]
    return run_job(args, 200, cwd=out, PYTHONWARNINGS="default")  # as in a user's shell: warnings shown


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    proc = torchrun(out)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout, out


def test_identical_starts_are_reported_once_with_the_fix(finished):
    stdout, _ = finished
    assert stdout.count("start from identical weights") == 1
    assert "all 4 members start from identical weights" in stdout
    assert "initial_weights='per_member'" in stdout and "configure_model" in stdout


def test_one_console_line_per_ready_step_and_one_summary(finished):
    stdout, out = finished
    steps = sorted({r["step"] for r in load_lineage(out) if r["event"] != "init"})
    assert re.findall(r"^PBT step (\d+):", stdout, flags=re.MULTILINE) == [str(s) for s in steps]
    assert stdout.count("Population at the end of fit (val_acc, best first):") == 1
    assert stdout.count("| member | val_acc | step | dropout | lr | last copied from |") == 1
    assert stdout.count("Best member:") == 1
    assert stdout.count("Total params") == 1  # Lightning's model summary: once per population
    assert stdout.count("GPU available:") == 1  # and its device lines


def test_the_summarys_checkpoint_is_the_best_members_and_loads(finished):
    stdout, out = finished
    path = re.search(r"^Its checkpoint: (\S+\.ckpt)$", stdout, flags=re.MULTILINE).group(1)
    best = int(re.search(r"^Best member: (\d+) ", stdout, flags=re.MULTILINE).group(1))
    assert f"member_{best}" in Path(path).parts
    spec = importlib.util.spec_from_file_location("plain_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the script's main() runs only under __main__
    model = module.Net.load_from_checkpoint(path, map_location="cpu")
    final = {r["member"]: r for r in load_lineage(out)}[best]
    assert model.hparams.lr == pytest.approx(final["hyperparameters"]["lr"])  # it loads with its own values


def test_every_rank_knows_the_same_best_member_and_results(finished):
    stdout, out = finished
    ranks = load_ranks(out)
    assert len(ranks) == 4
    best = int(re.search(r"^Best member: (\d+) ", stdout, flags=re.MULTILINE).group(1))
    assert {r["best_member"] for r in ranks} == {best}
    assert len({r["best_checkpoint_path"] for r in ranks}) == 1
    assert all(r["results"] == ranks[0]["results"] for r in ranks)
    results = json.loads((out / "pbt" / "results.json").read_text())
    assert results["best_member"] == best and results["best_checkpoint_path"] == ranks[0]["best_checkpoint_path"]
    assert [m["member"] for m in results["members"]] == [r["member"] for r in ranks[0]["results"]]


def test_the_summary_names_whom_each_member_copied_last(finished):
    stdout, out = finished
    copies = {}
    for record in load_lineage(out):  # in step order
        if record["event"] == "exploit":
            copies[record["member"]] = record["parent"]
    assert copies  # exploits happened
    results = json.loads((out / "pbt" / "results.json").read_text())
    assert {m["member"]: m["copied_from"] for m in results["members"]} == {m: copies.get(m) for m in range(4)}
    for m in results["members"]:
        cell = "-" if m["copied_from"] is None else str(m["copied_from"])
        assert re.search(rf"^\| {m['member']} \|.* \| {re.escape(cell)} \|$", stdout, flags=re.MULTILINE)


def test_each_members_final_record_and_hparams_hold_the_values_it_trained_with(finished):
    _, out = finished
    records = load_lineage(out)
    final = {r["member"]: r for r in records}
    last_step = max(r["step"] for r in records)
    for rank in load_ranks(out):
        record = final[rank["member"]]
        assert record["step"] == last_step and record["extra"].get("last") is True
        assert record["event"] == "keep" and record["mutations"] == []
        assert record["hyperparameters"] == pytest.approx(rank["trained_with"])
        hparams = yaml.safe_load((Path(rank["log_dir"]) / "hparams.yaml").read_text())
        assert {k: hparams[k] for k in ("lr", "dropout")} == pytest.approx(rank["trained_with"])
    assert any(r["event"] == "exploit" for r in records)  # exploits happened, only not at the end


def test_an_error_on_every_rank_is_printed_once_naming_the_member_and_the_logged_metrics(tmp_path):
    proc = torchrun(tmp_path, monitor="val_accuracy", max_epochs=1)
    assert proc.returncode != 0
    out = proc.stdout
    assert out.count("RuntimeError: PopulationBasedTraining: the monitored metric 'val_accuracy'") == 1, out[-6000:]
    assert "the metrics logged were ['val_acc'] (did you mean 'val_acc'?)" in out
    assert re.search(r"^\[member \d, rank \d\] Traceback", out, flags=re.MULTILINE)
    assert "[rank0]" not in out
