"""Explorer: perturbation factors, resampling, mutation strings, custom functions by dotted path."""

from __future__ import annotations

import math
import re
import sys
import types

import numpy as np
import pytest

from lightning_pbt.algorithm.explore import Explorer, format_value, resolve_callable
from lightning_pbt.algorithm.space import Choice, IntUniform, LogUniform, Uniform

SPACE = {
    "lr": LogUniform(1e-4, 1.0),
    "dropout": Uniform(0.0, 0.5),
    "layers": IntUniform(1, 8),
    "optimizer": Choice(("adam", "sgd", "rmsprop")),
}
START = {"lr": 0.01, "dropout": 0.3, "layers": 4, "optimizer": "adam"}


def test_no_resampling_uses_only_listed_factors() -> None:
    explorer = Explorer(SPACE, perturbation_factors=(0.8, 1.2), resample_probability=0.0)
    seen = set()
    for seed in range(30):
        new, mutations = explorer.explore(START, np.random.default_rng(seed))
        assert [m.split(":")[0] for m in mutations] == sorted(SPACE)  # sorted order, one per name
        for text in mutations:
            factor = re.search(r"\(x([0-9.]+)\)$", text)
            assert factor, text
            seen.add(factor.group(1))
        assert new["lr"] in (pytest.approx(0.008), pytest.approx(0.012))
        assert new["dropout"] in (pytest.approx(0.24), pytest.approx(0.36))
        assert new["layers"] in (3, 5)
        assert new["optimizer"] == "sgd"  # neighbour of the first value, whatever the direction
    assert seen == {"0.8", "1.2"}


def test_always_resampling() -> None:
    explorer = Explorer(SPACE, resample_probability=1.0)
    new, mutations = explorer.explore(START, np.random.default_rng(0))
    assert all(text.endswith("(resampled)") for text in mutations)
    assert all(SPACE[k].contains(v) for k, v in new.items())
    values = {explorer.explore(START, np.random.default_rng(s))[0]["dropout"] for s in range(20)}
    assert len(values) == 20


def test_explored_values_stay_in_bounds_and_are_plain() -> None:
    explorer = Explorer(SPACE, perturbation_factors=(0.01, 0.5, 2.0, 100.0), resample_probability=0.3)
    g = np.random.default_rng(0)
    values = dict(START)
    for _ in range(300):
        values, _ = explorer.explore(values, g)
        assert all(SPACE[k].contains(v) for k, v in values.items())
        assert type(values["lr"]) is float and type(values["layers"]) is int


def test_mutation_strings() -> None:
    g = np.random.default_rng(0)
    explorer = Explorer({"lr": LogUniform(1e-4, 1.0)}, perturbation_factors=(1.2,), resample_probability=0)
    assert explorer.explore({"lr": 0.01}, g) == ({"lr": pytest.approx(0.012)}, ["lr: 0.01 -> 0.012 (x1.2)"])
    explorer = Explorer({"optimizer": SPACE["optimizer"]}, perturbation_factors=(1.2,), resample_probability=0)
    assert explorer.explore({"optimizer": "adam"}, g)[1] == ["optimizer: 'adam' -> 'sgd' (x1.2)"]
    explorer = Explorer({"layers": SPACE["layers"]}, perturbation_factors=(0.5,), resample_probability=0)
    assert explorer.explore({"layers": 4}, g)[1] == ["layers: 4 -> 2 (x0.5)"]
    _, mutations = Explorer({"d": Uniform(0, 1)}, resample_probability=1).explore({"d": 0.3}, g)
    assert re.fullmatch(r"d: 0\.3 -> [0-9.e-]+ \(resampled\)", mutations[0])
    assert format_value(1.23456789e-5) == "1.235e-05" and format_value(None) == "None"
    assert format_value(True) == "True" and format_value(123456) == "123456"


def test_explore_validates_its_input() -> None:
    with pytest.raises(ValueError, match=r"missing hyperparameter\(s\) \['optimizer'\]"):
        Explorer(SPACE).explore({k: v for k, v in START.items() if k != "optimizer"}, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"dropout: value 0\.9 is outside"):
        Explorer(SPACE).explore({**START, "dropout": 0.9}, np.random.default_rng(0))


def test_explore_is_deterministic_under_a_seed() -> None:
    explorer = Explorer(SPACE)
    a = explorer.explore(START, np.random.default_rng(5))
    assert a == explorer.explore(START, np.random.default_rng(5))


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("fake_pbt_explore")

    def halve_dropout(hyperparameters, space, rng):
        assert isinstance(rng, np.random.Generator) and set(space) == set(SPACE)
        return {**hyperparameters, "dropout": np.float64(hyperparameters["dropout"] / 2)}

    module.halve_dropout = halve_dropout  # type: ignore[attr-defined]
    module.nested = types.SimpleNamespace(fn=halve_dropout)  # type: ignore[attr-defined]
    module.bad_value = lambda h, s, r: {**h, "dropout": 0.9}  # type: ignore[attr-defined]
    module.missing = lambda h, s, r: {"lr": h["lr"]}  # type: ignore[attr-defined]
    module.extra = lambda h, s, r: {**h, "momentum": 0.9}  # type: ignore[attr-defined]
    module.not_a_dict = lambda h, s, r: [1, 2]  # type: ignore[attr-defined]
    module.CONSTANT = 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_pbt_explore", module)
    return module


@pytest.mark.parametrize(
    "path", ["fake_pbt_explore:halve_dropout", "fake_pbt_explore.halve_dropout", "fake_pbt_explore:nested.fn"]
)
def test_custom_explore_by_dotted_path(fake_module: types.ModuleType, path: str) -> None:
    explorer = Explorer(SPACE, custom_explore=path)
    new, mutations = explorer.explore(START, np.random.default_rng(0))
    assert new == {**START, "dropout": 0.15} and type(new["dropout"]) is float
    assert mutations == ["dropout: 0.3 -> 0.15 (custom)"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bad_value", r"returned dropout=0.9, outside Uniform"),
        ("missing", r"returned no value for 'dropout'"),
        ("extra", r"returned unknown hyperparameter\(s\) \['momentum'\]"),
        ("not_a_dict", r"must return a dict of hyperparameters, got \[1, 2\]"),
    ],
)
def test_custom_explore_results_are_validated(fake_module: types.ModuleType, name: str, message: str) -> None:
    explorer = Explorer(SPACE, custom_explore=getattr(fake_module, name))
    with pytest.raises(ValueError, match=message):
        explorer.explore(START, np.random.default_rng(0))


def test_resolve_callable(fake_module: types.ModuleType) -> None:
    import json
    import os.path

    assert resolve_callable("json.dumps") is json.dumps
    assert resolve_callable("os.path:join") is os.path.join
    assert resolve_callable("os.path.join") is os.path.join
    with pytest.raises(ValueError, match="cannot import module 'no_such_pbt_module'"):
        resolve_callable("no_such_pbt_module:fn")
    with pytest.raises(ValueError, match="module 'json' has no attribute 'nope'"):
        resolve_callable("json:nope")
    with pytest.raises(ValueError, match="not callable"):
        resolve_callable("fake_pbt_explore:CONSTANT")
    with pytest.raises(ValueError, match="must name a module and an attribute"):
        resolve_callable("json")
    with pytest.raises(ValueError, match="expected a dotted path"):
        resolve_callable("")
    with pytest.raises(ValueError, match="cannot resolve 'json:dumps\\)'"):
        resolve_callable("json:dumps)")  # no eval: a call expression is just a missing attribute


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"perturbation_factors": ()}, "perturbation_factors must be positive"),
        ({"perturbation_factors": (0.8, -1.2)}, "perturbation_factors must be positive"),
        ({"perturbation_factors": (0.0,)}, "perturbation_factors must be positive"),
        ({"perturbation_factors": (math.inf,)}, "perturbation_factors must be positive"),
        ({"perturbation_factors": (math.nan,)}, "perturbation_factors must be positive"),
        ({"perturbation_factors": "12"}, "perturbation_factors must be positive"),
        ({"resample_probability": -0.1}, r"resample_probability must be in \[0, 1\], got -0.1"),
        ({"resample_probability": 1.5}, r"resample_probability must be in \[0, 1\], got 1.5"),
        ({"custom_explore": 3}, "custom_explore must be a callable or a dotted path"),
        ({"custom_explore": "no_such_pbt_module.fn"}, "cannot resolve 'no_such_pbt_module.fn'"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Explorer(SPACE, **kwargs)


def test_space_must_hold_domains() -> None:
    with pytest.raises(ValueError, match="lr: expected a Domain"):
        Explorer({"lr": {"low": 0.1, "high": 1.0}})  # type: ignore[dict-item]
