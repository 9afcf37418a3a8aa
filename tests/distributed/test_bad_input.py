"""Bad input: a clear message naming the problem, raised on every rank, non-zero exit, no hang."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from lightning_pbt import Choice, IntUniform, LogUniform, PopulationBasedTraining, PopulationStrategy, Uniform
from lightning_pbt.plugin.strategy import check_supported
from tests.conftest import rank_errors, run_population

SPACE = {"lr": LogUniform(1e-3, 0.1)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantile_fraction": 0.0}, "quantile_fraction must be in"),
        ({"quantile_fraction": 0.51}, "quantile_fraction must be in"),
        ({"perturbation_factors": (0.8, -1.2)}, "perturbation_factors must be positive"),
        ({"perturbation_factors": (0.0,)}, "perturbation_factors must be positive"),
        ({"resample_probability": 1.5}, "resample_probability"),
        ({"resample_probability": -0.1}, "resample_probability"),
        ({"mode": "avg"}, "mode must be 'min' or 'max'"),
        ({"monitor": ""}, "monitor must be a metric name"),
        ({"every_n_train_steps": 0}, "every_n_train_steps must be a positive integer"),
        ({"every_n_train_steps": 5, "every_n_epochs": 1}, "not both"),
        ({"burn_in": -1}, "burn_in must be an integer >= 0"),
        ({"exploit": "roulette"}, "roulette"),
        ({"custom_explore": "no_such_module.explore"}, "no_such_module"),
        ({"rejuvenate_modules": ["head"]}, "rejuvenate_modules needs rejuvenate_patience"),
        ({"rejuvenate_modules": [], "rejuvenate_patience": 2}, "rejuvenate_modules must be None .* got \\[\\]"),
        ({"rejuvenate_modules": ["head", ""], "rejuvenate_patience": 2}, "rejuvenate_modules must be None"),
    ],
)
def test_invalid_callback_arguments(kwargs, message):
    arguments = {"hyperparameters": SPACE, "monitor": "val_acc", **kwargs}
    with pytest.raises(ValueError, match=message):
        PopulationBasedTraining(**arguments)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"lr": {"type": "loguniform", "low": 0.0, "high": 1.0}}, "low"),
        ({"lr": {"type": "uniform", "low": 1.0, "high": 0.1}}, "low"),
        ({"lr": {"type": "uniform", "low": 0.5, "high": 0.5}}, "low"),
        ({"opt": {"type": "choice", "values": []}}, "empty"),
        ({"lr": {"type": "logunif", "low": 1e-3, "high": 1.0}}, "hyperparameters.lr"),
        ({}, "empty"),
    ],
)
def test_invalid_spaces_name_the_key(space, message):
    with pytest.raises(ValueError, match=message):
        PopulationBasedTraining(space, monitor="val_acc")


def test_domains_validate_their_arguments():
    for build in (lambda: Uniform(1, 0), lambda: LogUniform(-1, 1), lambda: IntUniform(3, 3), lambda: Choice([])):
        with pytest.raises(ValueError):
            build()


def test_member_size_must_be_positive():
    with pytest.raises(ValueError, match="member_size must be an integer >= 1"):
        PopulationStrategy(member_size=0)
    with pytest.raises(ValueError, match="timeout must be positive"):
        PopulationStrategy(timeout=0)


def test_unsupported_accelerator_and_precision():
    from pytorch_lightning.accelerators import CPUAccelerator
    from pytorch_lightning.plugins.precision import FSDPPrecision, Precision

    check_supported(CPUAccelerator(), Precision())

    class TPUAccelerator:  # stands in for an accelerator without gloo/NCCL
        pass

    with pytest.raises(ValueError, match="supports accelerator='cpu'"):
        check_supported(TPUAccelerator(), Precision())
    with pytest.raises(ValueError, match="does not support the precision plugin FSDPPrecision"):
        check_supported(CPUAccelerator(), FSDPPrecision("32-true"))


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_without_population_strategy(tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PopulationBasedTraining(SPACE, monitor="val_acc")],
    )
    with pytest.raises(TypeError, match="needs Trainer\\(strategy=PopulationStrategy"):
        trainer.fit(Tiny(), data)


def test_unknown_rejuvenate_module_is_an_error_at_fit_start():
    callback = PopulationBasedTraining(SPACE, monitor="val_acc", rejuvenate_patience=2, rejuvenate_modules="head")
    assert callback.rejuvenate_modules == ["head"]  # one name may be given as a string
    module = Tiny()
    trainer = SimpleNamespace(optimizers=[module.configure_optimizers()])  # all that on_fit_start reads
    with pytest.raises(
        ValueError, match=r"rejuvenate_modules \['head'\] are not submodules of Tiny; available .*\['layer'\]"
    ):
        callback.on_fit_start(trainer, module)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_world_size_not_a_multiple_of_member_size(tmp_path):
    proc = run_population(tmp_path, timeout=90, devices=3, member_size=2, max_steps=8)
    assert proc.returncode != 0
    errors = rank_errors(tmp_path)  # each rank raised it itself, before any process group existed
    assert sorted(errors) == [0, 1, 2], proc.stdout[-3000:]
    assert all("is not a multiple of member_size" in error for error in errors.values())


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_unknown_hyperparameter_fails_at_start(tmp_path):
    proc = run_population(
        tmp_path,
        timeout=90,
        devices=2,
        member_size=1,
        max_steps=8,
        extra_space={"colour": {"type": "uniform", "low": 0, "high": 1}},
    )
    assert proc.returncode != 0
    errors = rank_errors(tmp_path)
    assert sorted(errors) == [0, 1], proc.stdout[-3000:]
    assert all("['colour'] can be applied neither to an optimizer" in error for error in errors.values())


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_members_with_different_weight_averages_fail_at_start_on_every_rank(tmp_path):
    proc = run_population(tmp_path, timeout=90, devices=2, member_size=1, max_steps=8, ema_members=[0])
    assert proc.returncode != 0
    errors = rank_errors(tmp_path)
    assert sorted(errors) == [0, 1], proc.stdout[-3000:]
    assert len(set(errors.values())) == 1  # the same message on every rank
    assert "the weight-averaging callbacks of world ranks [1] ([] on rank 1)" in errors[0]
    assert not (tmp_path / "pbt" / "lineage.jsonl").exists()  # refused before anything trained or was written


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_monitor_never_logged_fails_on_every_rank_at_the_first_ready_step(tmp_path):
    proc = run_population(tmp_path, timeout=90, devices=2, member_size=1, max_steps=40, every=4, no_metric=True)
    assert proc.returncode != 0
    errors = rank_errors(tmp_path)
    assert sorted(errors) == [0, 1], proc.stdout[-3000:]
    assert all("the monitored metric 'val_acc' was not logged" in error for error in errors.values())
