"""The callback's arguments are defined once (``PBTSettings``): the callback's signature and the Hydra
schema are built from that definition and cannot drift; the checks report the first bad argument."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from omegaconf import MISSING, OmegaConf

from lightning_pbt import PopulationBasedTraining
from lightning_pbt.algorithm.exploit import TruncationSelection, WelchTTest
from lightning_pbt.algorithm.scheduler import PBTScheduler
from lightning_pbt.algorithm.settings import REQUIRED, PBTSettings
from lightning_pbt.tools.hydra_configs import PopulationBasedTrainingConf

SPACE = {"lr": {"type": "loguniform", "low": 1e-4, "high": 0.1}}


def _settings_defaults() -> dict[str, object]:
    return {f.name: f.default for f in PBTSettings.arguments()}


def test_the_callback_signature_is_the_settings_names_and_defaults():
    parameters = dict(inspect.signature(PopulationBasedTraining.__init__).parameters)
    parameters.pop("self")
    assert list(parameters) == [f.name for f in PBTSettings.arguments()]
    signature_defaults = {name: parameter.default for name, parameter in parameters.items()}
    expected = {name: (inspect.Parameter.empty if name in REQUIRED else d) for name, d in _settings_defaults().items()}
    assert signature_defaults == expected


def test_the_hydra_schema_is_the_settings_names_and_defaults():
    schema = {f.name: f for f in dataclasses.fields(PopulationBasedTrainingConf)}
    assert list(schema) == ["_target_", "_convert_", *(f.name for f in PBTSettings.arguments())]
    cfg = OmegaConf.to_container(OmegaConf.structured(PopulationBasedTrainingConf))
    for name, default in _settings_defaults().items():
        if name == "monitor":
            assert cfg[name] == MISSING
        elif name == "hyperparameters":
            assert cfg[name] == {}
        else:  # a tuple default is a list in Hydra
            assert cfg[name] == (list(default) if isinstance(default, tuple) else default), name
    assert cfg["_target_"] == "lightning_pbt.PopulationBasedTraining"
    # Every schema field is documented, from the settings' own docstring.
    documented = {line.split(":")[0].strip() for line in inspect.getdoc(PopulationBasedTrainingConf).splitlines()}
    assert {f.name for f in PBTSettings.arguments()} <= documented


def test_the_callback_keeps_what_the_settings_checked_and_derived():
    callback = PopulationBasedTraining(
        SPACE, "val_loss", "min", exploit="ttest", rejuvenate_patience=2, rejuvenate_modules="head", dirpath="x"
    )
    assert callback.settings.rejuvenate_modules == callback.rejuvenate_modules == ["head"]
    assert callback.scheduler.exploit == callback.settings.exploit_rule == WelchTTest()
    assert callback.space == callback.settings.space and callback.mode == "min" and callback.dirpath == "x"
    truncation = PopulationBasedTraining(SPACE, "val_loss", quantile_fraction=0.5)
    assert truncation.scheduler.exploit == TruncationSelection(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # Several bad arguments: the first in the documented order is the one reported.
        ({"synchronous": "yes", "mode": "maximum"}, "synchronous must be True or False"),
        ({"mode": "maximum", "burn_in": -1}, "mode must be 'min' or 'max', got 'maximum'"),
        ({"burn_in": -1, "quantile_fraction": 0.9}, r"burn_in must be an integer >= 0, got -1"),
        ({"quantile_fraction": 0.9, "explore": "gp"}, r"quantile_fraction must be in \(0, 0.5\], got 0.9"),
        ({"quantile_fraction": 0.9, "exploit": "tournament"}, r"quantile_fraction must be in \(0, 0.5\]"),
        ({"explore": "gp"}, r"explore must be one of \('perturb', 'pb2'\), got 'gp'"),
        ({"rejuvenate_modules": []}, "rejuvenate_modules must be None"),
        ({"snapshot_every_n_train_steps": 0, "synchronous": False}, "snapshot_every_n_train_steps must be a positive"),
        ({"snapshot_every_n_train_steps": 10}, "snapshot_every_n_train_steps is for synchronous=False"),
        ({"wait_for_peers": 0.25}, "wait_for_peers is for synchronous=False"),
        ({"wait_for_peers": 0.0, "synchronous": False}, r"wait_for_peers must be a fraction of .* in \(0, 1\]"),
        ({"wait_for_peers": 1.5, "synchronous": False}, "wait_for_peers must be a fraction"),
        ({"wait_for_peers": True, "synchronous": False}, "wait_for_peers must be a fraction"),
    ],
)
def test_shared_checks_speak_for_the_callback_in_order(kwargs, message):
    with pytest.raises(ValueError, match=f"^PopulationBasedTraining: {message}"):
        PBTSettings(hyperparameters=SPACE, monitor="val_loss", **kwargs)


@pytest.mark.parametrize("space", [{}, OmegaConf.create({})], ids=["dict", "hydra"])
def test_an_empty_space_is_refused_by_the_pure_scheduler_with_the_callbacks_message(space):
    """The docs present ``PBTScheduler`` as usable alone: a population that can explore nothing is refused
    there too, in the words the callback uses (less its name)."""
    with pytest.raises(ValueError) as alone:
        PBTScheduler(space)
    with pytest.raises(ValueError) as callback:
        PopulationBasedTraining(space, monitor="val_loss")
    assert str(alone.value) == "the search space (hyperparameters) is empty"
    assert str(callback.value) == f"PopulationBasedTraining: {alone.value}"
    assert PBTScheduler(SPACE).space.keys() == {"lr"}  # one hyperparameter is enough
