"""The three application apps (image classification, language modelling, RL), each run once as a user runs
it (a subprocess, Lightning's launcher) at a tiny size: 2 members x 1 rank, two ready steps.

Each launch is checked for what its user relies on: the lineage holds exploits and finite scores inside
the search space, the hyperparameters PBT chose last are the ones the member's checkpoint trained with,
and the app's own held-out number (test accuracy, test perplexity, return) is printed once and in range.
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


def launched(test):
    """Marks of a test that launches an app (two ranks): distributed, slow, with a timeout."""
    return pytest.mark.distributed(pytest.mark.slow(pytest.mark.timeout(180)(test)))

TWO_MEMBERS = ["trainer.devices=2", "report=false", "trainer.enable_checkpointing=true"]


def launch(name: str, *overrides: str, run_dir: Path) -> tuple[str, list[dict], Path]:
    proc = run_job([sys.executable, str(REPO / "examples" / f"{name}.py"), *TWO_MEMBERS, *overrides,
                    f"hydra.run.dir={run_dir}"], 150, cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stdout[-4000:]
    records = [json.loads(line) for line in (run_dir / "pbt" / "lineage.jsonl").read_text().splitlines() if line]
    return proc.stdout, records, run_dir


def check_lineage(records: list[dict], space: dict[str, tuple[float, float]], ready_steps: int) -> None:
    assert sorted({r["member"] for r in records}) == [0, 1]
    steps = [r for r in records if r["event"] != "init"]
    assert len({r["step"] for r in steps}) == ready_steps
    assert any(r["event"] == "exploit" and r["parent"] != r["member"] for r in steps)
    assert all(r["score"] is not None and math.isfinite(r["score"]) for r in steps)
    for record in records:
        assert set(record["hyperparameters"]) == set(space)
        for name, (low, high) in space.items():
            assert low <= record["hyperparameters"][name] <= high, (name, record)


def final_values(records: list[dict]) -> dict[int, dict]:
    return {r["member"]: r["hyperparameters"] for r in records}


def checkpoint(run_dir: Path, member: int) -> dict:
    (path,) = (run_dir / f"member_{member}" / "checkpoints").glob("*.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


def best_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("Held-out: member")]
    assert len(lines) == 1, stdout[-3000:]  # printed by the best member's rank only
    return lines[0]


@launched
def test_image_classification(tmp_path):
    stdout, records, run_dir = launch(
        "image_classification", "trainer.max_epochs=2", "pbt.every_n_epochs=1", "data.train_size=512",
        run_dir=tmp_path / "run")
    check_lineage(records, {"lr": (1e-3, 0.5), "weight_decay": (1e-6, 1e-2), "label_smoothing": (0.0, 0.3),
                            "augment": (0.0, 1.0)}, ready_steps=2)
    for member, values in final_values(records).items():
        state = checkpoint(run_dir, member)
        assert math.isclose(state["optimizer_states"][0]["param_groups"][0]["lr"], values["lr"])
        for name in ("label_smoothing", "augment"):  # read by training_step from hparams
            assert math.isclose(state["hyper_parameters"][name], values[name])
    accuracy = float(re.search(r"test accuracy (\S+)$", best_line(stdout)).group(1))
    assert 0.3 < accuracy <= 1.0  # 10 classes: chance is 0.1


@launched
def test_language_model(tmp_path):
    stdout, records, run_dir = launch(
        "language_model", "trainer.max_steps=40", "trainer.val_check_interval=20", "pbt.every_n_train_steps=20",
        "data.num_files=30", "data.eval_bytes=8192", "model.d_model=32", "model.n_layer=1",
        "strategy.members_per_process=1",  # the app's default is 4 (population 16); Trainer.test needs 1
        run_dir=tmp_path / "run")
    check_lineage(records, {"lr": (1e-4, 1e-2), "weight_decay": (1e-3, 0.3), "warmup_steps": (10, 300),
                            "dropout": (0.0, 0.3)}, ready_steps=2)
    assert all(isinstance(r["hyperparameters"]["warmup_steps"], int) for r in records)
    for member, values in final_values(records).items():
        state = checkpoint(run_dir, member)
        # The LR schedule (warm-up + cosine) keeps its shape around the base lr PBT set.
        assert math.isclose(state["lr_schedulers"][0]["base_lrs"][0], values["lr"])
        groups = state["optimizer_states"][0]["param_groups"]
        assert math.isclose(groups[0]["weight_decay"], values["weight_decay"]) and groups[1]["weight_decay"] == 0
        assert state["hyper_parameters"]["warmup_steps"] == values["warmup_steps"]
        assert math.isclose(state["hyper_parameters"]["dropout"], values["dropout"])
    line = best_line(stdout)
    val_loss = float(re.search(r"val_loss (\S+),", line).group(1))
    perplexity = float(re.search(r"test perplexity (\S+)$", line).group(1))
    assert 1.0 < perplexity < 256.0  # below a uniform guess over bytes
    # Held-out files, the same model: within a factor 2 of the validation perplexity.
    assert 0.5 < perplexity / math.exp(val_loss) < 2.0


@launched
def test_reinforcement_learning(tmp_path):
    stdout, records, run_dir = launch(
        "reinforcement_learning", "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2", "pbt.every_n_epochs=2",
        "model.rollout_steps=256", "model.eval_seeds=[1000,1001]", "model.test_seeds=[2000,2001,2002]",
        run_dir=tmp_path / "run")
    check_lineage(records, {"lr": (1e-4, 3e-3), "ent_coef": (1e-4, 0.05), "clip_range": (0.1, 0.4),
                            "gae_lambda": (0.8, 1.0)}, ready_steps=2)
    for record in records:
        if record["event"] != "init":
            assert 1 <= record["score"] <= 500  # CartPole-v1: one point per step, at most 500 steps
    for member, values in final_values(records).items():
        state = checkpoint(run_dir, member)
        assert math.isclose(state["optimizer_states"][0]["param_groups"][0]["lr"], values["lr"])
        for name in ("ent_coef", "clip_range", "gae_lambda"):
            assert math.isclose(state["hyper_parameters"][name], values[name])
    returns = float(re.search(r"held-out seeds (\S+)$", best_line(stdout)).group(1))
    assert 1 <= returns <= 500


def test_the_language_apps_defaults_are_the_population_16_tables_settings():
    """A user who runs ``examples/language_model.py`` gets the population-16 table's settings, where PBT
    beat the grid and the defaults on every seed (docs/benchmarks.md): every override the benchmark gives
    the app is already its default, and the 4 CPU processes host 4 members each."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench.applications import APPS, POPULATION
    from lightning_pbt.tools.hydra_configs import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("language_model")
    for override in APPS["language_model"]["overrides"]:
        key, value = override.split("=")
        assert str(OmegaConf.select(cfg, key)) == value, f"the app's default {key} is not the table's {value}"
    assert cfg.trainer.devices * cfg.strategy.members_per_process == POPULATION == 16


def test_language_model_corpus_is_split_by_file():
    """Deterministic, disjoint train/validation/test files from the standard library (no download)."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from language_model import stdlib_split
    finally:
        sys.path.remove(str(REPO / "examples"))
    split = stdlib_split(50)
    names = {k: [f.name for f in v] for k, v in split.items()}
    assert (len(names["train"]), len(names["val"]), len(names["test"])) == (40, 5, 5)
    assert not set(names["train"]) & set(names["val"]) and not set(names["val"]) & set(names["test"])
    assert not set(names["train"]) & set(names["test"])
    in_name_order = sorted(names["train"] + names["val"] + names["test"])  # the documented split
    assert names["test"] == in_name_order[0::10] and names["val"] == in_name_order[1::10]
    assert names == {k: [f.name for f in v] for k, v in stdlib_split(50).items()}
    assert all(f.suffix == ".py" and f.stat().st_size > 0 for files in split.values() for f in files)


@launched
@pytest.mark.parametrize(("name", "overrides"), [
    ("image_classification", ["trainer.max_epochs=2", "pbt.every_n_epochs=1", "data.train_size=512"]),
    ("language_model", ["trainer.max_steps=40", "trainer.val_check_interval=20", "pbt.every_n_train_steps=20",
                        "data.num_files=30", "data.eval_bytes=8192", "model.d_model=32", "model.n_layer=1"]),
    ("reinforcement_learning", ["trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2", "pbt.every_n_epochs=2",
                                "model.rollout_steps=256", "model.eval_seeds=[1000,1001]"]),
])
def test_each_application_takes_strategy_members_per_process(tmp_path, name, overrides):
    """The tests above' settings with their two members taking turns in one process
    (``trainer.devices=1 strategy.members_per_process=2``): the same population trains and writes its
    lineage; the held-out test is skipped (``Trainer.test`` with members that take turns is not built)."""
    one_process = [o if o != "trainer.devices=2" else "trainer.devices=1" for o in TWO_MEMBERS]
    proc = run_job([sys.executable, str(REPO / "examples" / f"{name}.py"), *one_process, *overrides,
                    "strategy.members_per_process=2", f"hydra.run.dir={tmp_path / 'run'}"], 150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "pbt" / "lineage.jsonl").read_text().splitlines()]
    assert sorted({r["member"] for r in records}) == [0, 1]
    assert len({r["step"] for r in records if r["event"] != "init"}) == 2
    assert all(r["score"] is not None and math.isfinite(r["score"]) for r in records if r["event"] != "init")
    assert sorted(path.name for path in (tmp_path / "run").glob("member_*")) == ["member_0", "member_1"]
    assert "not tested (members take turns)" in best_line(proc.stdout)
