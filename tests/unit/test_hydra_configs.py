"""Hydra: the schema configs in the ConfigStore, the repo's configs/, CLI-style overrides of the search
space, the error messages, and the run id every process agrees on. No subprocess, no Trainer."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_pbt import PopulationBasedTraining, PopulationStrategy
from lightning_pbt.algorithm.space import Choice, LogUniform, Uniform
from lightning_pbt.tools.hydra_configs import (
    PopulationBasedTrainingConf,
    build_callback,
    build_strategy,
    check_population,
    register_configs,
    run_id,
    search_space,
)

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register_configs()
    register_configs()  # idempotent


def digits(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("digits", overrides=list(overrides), return_hydra_config=hydra)


def test_schema_configs_are_in_the_config_store():
    repo = ConfigStore.instance().repo
    assert "base_pbt.yaml" in repo["pbt"]
    assert "base_population.yaml" in repo["strategy"]


def test_default_digits_config():
    cfg = digits()
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 4 and cfg.strategy.member_size == 1
    assert cfg.pbt._target_ == "lightning_pbt.PopulationBasedTraining"
    assert cfg.strategy._target_ == "lightning_pbt.PopulationStrategy"
    assert cfg.pbt.monitor == "val_acc" and cfg.pbt.mode == "max" and cfg.pbt.seed == cfg.seed
    space = search_space(cfg.pbt.hyperparameters)
    assert list(space) == ["lr", "weight_decay", "dropout"]
    assert space["lr"] == LogUniform(1e-3, 0.3) and space["dropout"] == Uniform(0.0, 0.5)
    assert check_population(cfg.trainer, cfg.strategy.member_size) == 4


@pytest.mark.parametrize(
    ("preset", "accelerator", "nodes"), [("cpu", "cpu", 1), ("gpu_node", "gpu", 1), ("multi_node", "gpu", 2)]
)
def test_trainer_presets(preset, accelerator, nodes):
    cfg = digits(f"trainer={preset}")
    assert cfg.trainer.accelerator == accelerator and cfg.trainer.num_nodes == nodes
    assert cfg.trainer.max_epochs == digits().trainer.max_epochs  # the app's budget survives a preset switch


def test_space_overrides_bounds_add_remove_and_switch_type():
    cfg = digits(
        "pbt.hyperparameters.lr.low=1e-5",
        "pbt.hyperparameters.lr.high=0.5",
        "+pbt.hyperparameters.momentum={type:uniform,low:0.5,high:0.99}",
        "~pbt.hyperparameters.dropout",
        "pbt.hyperparameters.weight_decay.type=uniform",
    )
    space = search_space(cfg.pbt.hyperparameters)
    assert space == {"lr": LogUniform(1e-5, 0.5), "weight_decay": Uniform(1e-6, 1e-2), "momentum": Uniform(0.5, 0.99)}
    # To a choice: delete and re-add, or null the range keys.
    cfg = digits("~pbt.hyperparameters.lr", "+pbt.hyperparameters.lr={type:choice,values:[0.01,0.1]}")
    assert search_space(cfg.pbt.hyperparameters)["lr"] == Choice((0.01, 0.1))
    cfg = digits(
        "pbt.hyperparameters.dropout.type=choice",
        "pbt.hyperparameters.dropout.low=null",
        "pbt.hyperparameters.dropout.high=null",
        "+pbt.hyperparameters.dropout.values=[0.0,0.25]",
    )
    assert search_space(cfg.pbt.hyperparameters)["dropout"] == Choice((0.0, 0.25))
    cfg = digits("+pbt.hyperparameters.act=[relu,gelu]")  # a bare list is a choice
    assert search_space(cfg.pbt.hyperparameters)["act"] == Choice(("relu", "gelu"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pbt.hyperparameters.lr.low=-1"], "pbt.hyperparameters.lr: LogUniform: low (-1.0) must be > 0"),
        (["pbt.hyperparameters.lr.type=bogus"], "pbt.hyperparameters.lr: unknown type 'bogus'"),
        (["pbt.hyperparameters.lr.low=abc"], "pbt.hyperparameters.lr: low must be a number, got 'abc'"),
        (["pbt.hyperparameters.dropout.high=null"], "pbt.hyperparameters.dropout: type 'uniform' needs 'low' and"),
        (["+pbt.hyperparameters.m={type:uniform,low:0.9,high:0.5}"], "pbt.hyperparameters.m: Uniform: low (0.9)"),
        (["+pbt.hyperparameters.m={lo:1}"], "pbt.hyperparameters.m: unknown key(s) ['lo']"),
        (["pbt.hyperparameters.dropout.type=choice"], "pbt.hyperparameters.dropout: a choice takes 'values' only"),
        (
            ["~pbt.hyperparameters.lr", "~pbt.hyperparameters.dropout", "~pbt.hyperparameters.weight_decay"],
            "pbt.hyperparameters: the search space is empty",
        ),
        (["pbt.mode=maximum"], "pbt.mode: must be 'min' or 'max', got 'maximum'"),
        (["pbt.quantile_fraction=0.9"], "pbt.quantile_fraction: must be in (0, 0.5]"),
        (["pbt.exploit=best"], "pbt:"),
    ],
)
def test_malformed_pbt_config_names_the_key(overrides, message):
    cfg = digits(*overrides)
    with pytest.raises(ValueError) as info:
        build_callback(cfg.pbt)
    assert str(info.value).startswith(message), str(info.value)


def test_build_callback_and_strategy():
    cfg = digits("strategy.member_size=2", "pbt.every_n_epochs=3")
    callback, strategy = build_callback(cfg.pbt), build_strategy(cfg.strategy)
    assert isinstance(callback, PopulationBasedTraining) and isinstance(strategy, PopulationStrategy)
    assert callback.every_n_epochs == 3 and strategy.member_size == 2
    assert callback.space["lr"] == LogUniform(1e-3, 0.3)
    with pytest.raises(ValueError, match=r"^strategy.member_size: must be an integer >= 1"):
        build_strategy(digits("strategy.member_size=0").strategy)


def test_check_population():
    assert check_population({"devices": 8, "num_nodes": 2}, 4) == 4
    assert check_population({"devices": 1}, 1, processes_per_device=4) == 4  # 4 members sharing one GPU
    assert check_population({"devices": [0, 1]}, 2) == 1
    assert check_population({"devices": "auto"}, 3) is None
    assert check_population({"devices": -1}, 3) is None
    with pytest.raises(ValueError, match=r"4 ranks is not a multiple of strategy.member_size=3"):
        check_population({"devices": 4}, 3)


def test_an_installed_package_composes_without_the_repo_configs(tmp_path):
    """Only the ConfigStore entries: a user's own primary config extends them."""
    (tmp_path / "train.yaml").write_text(
        "defaults:\n  - pbt: base_pbt\n  - strategy: base_population\n  - _self_\n"
        "pbt:\n  monitor: val_loss\n  mode: min\n  hyperparameters:\n    lr: {type: loguniform, low: 1e-4, high: 0.1}\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("train", overrides=["strategy.member_size=2", "pbt.hyperparameters.lr.high=0.5"])
    assert cfg.strategy.timeout == 600.0
    callback = instantiate(cfg.pbt)  # plain Hydra instantiate works too (the _target_ contract)
    assert isinstance(callback, PopulationBasedTraining) and callback.mode == "min"
    assert callback.space == {"lr": LogUniform(1e-4, 0.5)}
    assert instantiate(cfg.strategy).member_size == 2


def test_schema_types_are_checked_at_composition():
    with pytest.raises(Exception, match=r"pbt\.every_n_epochs"):
        digits("pbt.every_n_epochs=abc")


def test_search_space_from_plain_and_omegaconf_mappings():
    node = OmegaConf.create({"lr": {"type": "loguniform", "low": "1e-4", "high": 0.1, "values": None}})
    assert search_space(node) == search_space({"lr": {"low": 1e-4, "high": 0.1, "log": True}})
    with pytest.raises(ValueError, match=r"^pbt.hyperparameters: expected a mapping"):
        search_space(OmegaConf.create([1, 2]))
    with pytest.raises(ValueError, match=r"^pbt.hyperparameters:"):
        search_space(OmegaConf.create({"lr": {"low": "${missing}", "high": 1}}))


def test_run_id_every_process_computes_the_same():
    now = datetime(2025, 1, 2, 3, 4, 5)
    assert run_id({}, now) == "2025-01-02/03-04-05"
    uuid = "1a2b3c4d-0000-4000-8000-00000000abcd"
    assert run_id({"TORCHELASTIC_RUN_ID": uuid}, now) == "torchrun-1a2b3c4d"
    assert run_id({"TORCHELASTIC_RUN_ID": "job/42"}, now) == "torchrun-job_42"
    assert run_id({"TORCHELASTIC_RUN_ID": "none"}, now) == "2025-01-02/03-04-05"
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16"}
    assert run_id(slurm, now) == "slurm-77.0"
    assert run_id({**slurm, "SLURM_NTASKS": "1"}, now) == "2025-01-02/03-04-05"  # one task: a plain run
    assert run_id({**slurm, "TORCHELASTIC_RUN_ID": uuid, "LIGHTNING_PBT_RUN_ID": "my run"}, now) == "my_run"


def test_hydra_run_dir_uses_the_run_id(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "0badc0de-0000-4000-8000-000000000000")
    cfg = digits(hydra=True)
    assert cfg.hydra.run.dir == "outputs/torchrun-0badc0de"


def test_devices_and_nodes_follow_torchrun(monkeypatch):
    assert digits().trainer.devices == 4
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "3")
    cfg = digits()
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (2, 3)
    assert digits("trainer=gpu_node").trainer.devices == 2
    assert digits("trainer.devices=6").trainer.devices == 6  # the command line wins
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    cfg = digits("trainer=multi_node")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 2)
    assert digits("trainer=gpu_node").trainer.devices == -1


def test_a_missing_monitor_is_named():
    cfg = OmegaConf.structured(PopulationBasedTrainingConf)
    cfg.hyperparameters = {"lr": {"type": "loguniform", "low": 1e-3, "high": 0.1}}
    with pytest.raises(ValueError, match=r"^pbt\.monitor: a value is required"):
        build_callback(cfg)


def test_members_sharing_devices_and_the_asynchronous_mode_from_the_command_line(monkeypatch):
    cfg = digits("trainer=gpu_node", "trainer.devices=1", "strategy.processes_per_device=4", "pbt.synchronous=false")
    strategy, callback = build_strategy(cfg.strategy), build_callback(cfg.pbt)
    assert strategy.processes_per_device == 4 and callback.synchronous is False
    assert check_population(cfg.trainer, strategy.member_size, strategy.processes_per_device) == 4
    # Under torchrun --nproc_per_node=8 with 2 ranks per device, the trainer gets 4 devices.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert digits("trainer=gpu_node", "strategy.processes_per_device=2").trainer.devices == 4
    assert digits("trainer=gpu_node").trainer.devices == 8
