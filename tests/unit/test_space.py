"""Domains: values never leave their domain, plain Python types, validation messages, config forms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_pbt.algorithm.space import (
    Choice,
    Domain,
    IntUniform,
    LogUniform,
    Uniform,
    validate_hyperparameters,
)
from lightning_pbt.algorithm.space_config import domain_from_config, space_from_config, space_to_config

FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e308, max_value=1e308)
POSITIVE = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False)
FACTORS = st.floats(min_value=5e-324, max_value=1.7e308, allow_nan=False, allow_infinity=False)


@st.composite
def domains(draw: st.DrawFn) -> Domain:
    kind = draw(st.sampled_from(["uniform", "loguniform", "int", "choice"]))
    if kind == "uniform":
        a, b = draw(FINITE), draw(FINITE)
        if a == b:
            b = math.nextafter(a, math.inf)
        return Uniform(min(a, b), max(a, b))
    if kind == "loguniform":
        a, b = draw(POSITIVE), draw(POSITIVE)
        if a == b:
            b = math.nextafter(a, math.inf)
        return LogUniform(min(a, b), max(a, b))
    if kind == "int":  # small ranges too, where one multiplicative step rounds back to the same integer
        bound = draw(st.sampled_from([2**63 - 2, 30]))
        a = draw(st.integers(-bound - 1, bound))
        b = draw(st.integers(a + 1, bound + 1))
        return IntUniform(a, b)
    values = draw(
        st.lists(st.one_of(st.text(max_size=5), st.integers(-1000, 1000)), min_size=1, max_size=6, unique=True)
    )
    return Choice(tuple(values))


def _plain_type_ok(domain: Domain, value: object) -> bool:
    if isinstance(domain, (Uniform, LogUniform)):
        return type(value) is float
    if isinstance(domain, IntUniform):
        return type(value) is int
    return not isinstance(value, np.generic)


@settings(max_examples=100, deadline=None)
@given(
    domain=domains(),
    ops=st.lists(st.one_of(st.just(None), FACTORS), max_size=25),
    seed=st.integers(0, 2**32 - 1),
)
def test_values_stay_in_domain_under_any_perturb_resample_sequence(
    domain: Domain, ops: list[float | None], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    value = domain.sample(rng)
    assert domain.contains(value) and _plain_type_ok(domain, value)
    for factor in ops:
        value = domain.resample(rng) if factor is None else domain.perturb(value, factor, rng)
        assert domain.contains(value), (domain, value, factor)
        assert _plain_type_ok(domain, value)
    json.dumps(value)


@settings(max_examples=300, deadline=None)
@given(
    domain=domains(),
    factor=st.one_of(st.sampled_from([0.8, 1.2, 0.99, 1.01]), FACTORS).filter(lambda f: f != 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_perturbation_moves_every_domain_unless_a_bound_stops_it(domain: Domain, factor: float, seed: int) -> None:
    """Continuous values are multiplied and clipped; integers and choices always take at least one step,
    except at the bound they would cross."""
    rng = np.random.default_rng(seed)
    value = domain.sample(rng)
    moved = domain.perturb(value, factor, rng)
    if isinstance(domain, Uniform | LogUniform):
        assert moved == min(max(value * factor, domain.low), domain.high)
    elif isinstance(domain, IntUniform):
        assert moved != value or value in (domain.low, domain.high), (value, factor, moved)
    else:
        assert isinstance(domain, Choice)
        assert moved != value or len(domain.values) == 1


def test_int_uniform_returns_ints_and_steps() -> None:
    rng = np.random.default_rng(0)
    d = IntUniform(0, 20)
    assert d.perturb(1, 1.2, rng) == 2  # round(1.2) == 1: one step up instead
    assert d.perturb(1, 0.8, rng) == 0
    assert d.perturb(10, 1.2, rng) == 12
    assert d.perturb(10, 0.8, rng) == 8
    assert d.perturb(0, 1.2, rng) == 1
    assert d.perturb(20, 1.2, rng) == 20  # clipped at the top
    assert d.perturb(0, 0.8, rng) == 0  # clipped at the bottom
    assert d.perturb(7, 1.0, rng) == 7
    assert type(d.perturb(np.int64(5), 1.2, rng)) is int
    assert all(type(d.sample(rng)) is int for _ in range(10))
    assert IntUniform(-5, 5).perturb(-1, 1.2, rng) == -2  # away from zero, like multiplication
    assert IntUniform(2.0, 5) == IntUniform(2, 5) and type(IntUniform(2.0, 5).low) is int
    assert not d.contains(3.0) and not d.contains(True) and d.contains(np.int64(3)) and not d.contains(21)


def test_choice_neighbour_semantics() -> None:
    rng = np.random.default_rng(0)
    d = Choice(["a", "b", "c"])
    assert d.values == ("a", "b", "c")
    assert d.perturb("b", 1.2, rng) == "c"
    assert d.perturb("b", 0.8, rng) == "a"
    assert d.perturb("c", 1.2, rng) == "b"  # bounce at the end
    assert d.perturb("a", 0.8, rng) == "b"
    assert d.perturb("b", 1.0, rng) == "b"
    assert Choice(["only"]).perturb("only", 1.2, rng) == "only"
    assert d.contains("a") and not d.contains("z") and not d.contains(["a"])
    with pytest.raises(ValueError, match="'z' is not one of"):
        d.perturb("z", 1.2, rng)
    assert Choice([True, False]).contains(True) and not Choice([True, False]).contains(1)
    assert {d.sample(rng) for _ in range(50)} == {"a", "b", "c"}


def test_uniform_zero_stays_zero_until_resampled() -> None:
    rng = np.random.default_rng(0)
    d = Uniform(0.0, 1.0)
    assert d.perturb(0.0, 1.2, rng) == 0.0
    assert d.perturb(0.5, 1.2, rng) == pytest.approx(0.6)
    assert d.perturb(0.9, 1.2, rng) == 1.0
    assert any(d.resample(rng) > 0 for _ in range(3))


def test_loguniform_samples_cover_the_decades() -> None:
    rng = np.random.default_rng(0)
    d = LogUniform(1e-4, 1.0)
    logs = np.log10([d.sample(rng) for _ in range(2000)])
    assert abs(float(np.mean(logs)) + 2.0) < 0.1


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Uniform(0.5, 0.1), r"Uniform: low \(0.5\) must be < high \(0.1\)"),
        (lambda: Uniform(1.0, 1.0), r"Uniform: low \(1.0\) must be < high \(1.0\)"),
        (lambda: Uniform(0.0, math.inf), r"Uniform: high must be finite, got inf"),
        (lambda: Uniform(math.nan, 1.0), r"Uniform: low must be finite, got nan"),
        (lambda: Uniform("a", 1.0), r"Uniform: low must be a number, got 'a'"),
        (lambda: Uniform(True, 2.0), r"Uniform: low must be a number, got True"),
        (lambda: LogUniform(0.0, 1.0), r"LogUniform: low \(0.0\) must be > 0"),
        (lambda: LogUniform(-1.0, 1.0), r"LogUniform: low \(-1.0\) must be > 0"),
        (lambda: LogUniform(1.0, 0.1), r"LogUniform: low \(1.0\) must be < high \(0.1\)"),
        (lambda: LogUniform(1e-3, -math.inf), r"LogUniform: high must be finite"),
        (lambda: IntUniform(3, 3), r"IntUniform: low \(3\) must be < high \(3\)"),
        (lambda: IntUniform(1.5, 3), r"IntUniform: low must be an integer, got 1.5"),
        (lambda: IntUniform(0, math.inf), r"IntUniform: high must be a finite integer, got inf"),
        (lambda: IntUniform(0, 2**64), r"IntUniform: high must fit in 64 bits"),
        (lambda: Choice([]), r"Choice: values must not be empty"),
        (lambda: Choice(["a", "b", "a"]), r"Choice: duplicate values 'a' and 'a'"),
        (lambda: Choice([1, 1.0]), r"Choice: duplicate values 1 and 1.0"),
        (lambda: Choice("abc"), r"Choice: values must be a list of options, got 'abc'"),
        (lambda: Choice([[1, 2]]), r"Choice: value \[1, 2\] is not a str/int/float/bool/None"),
        (lambda: Choice([math.nan]), r"Choice: value nan is not finite"),
    ],
)
def test_validation_messages(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("factor", [0.0, -1.0, math.inf, math.nan, "2"])
def test_perturb_rejects_bad_factors(factor: object) -> None:
    with pytest.raises(ValueError, match="perturbation factor must be a finite number > 0"):
        Uniform(0.0, 1.0).perturb(0.5, factor, np.random.default_rng(0))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({"type": "uniform", "low": 0.0, "high": 0.5}, Uniform(0.0, 0.5)),
        ({"type": "loguniform", "low": 1e-4, "high": 0.1}, LogUniform(1e-4, 0.1)),
        ({"type": "log_uniform", "low": 1e-4, "high": 0.1}, LogUniform(1e-4, 0.1)),
        ({"type": "LogUniform", "low": "1e-4", "high": "1e-1"}, LogUniform(1e-4, 0.1)),
        ({"type": "int", "low": 1, "high": 4}, IntUniform(1, 4)),
        ({"type": "int_uniform", "low": 1, "high": 4}, IntUniform(1, 4)),
        ({"type": "choice", "values": ["adam", "sgd"]}, Choice(("adam", "sgd"))),
        ({"values": ["relu", "gelu"]}, Choice(("relu", "gelu"))),
        ({"low": 0, "high": 1}, Uniform(0.0, 1.0)),
        ({"low": 1e-6, "high": 1e-2, "log": True}, LogUniform(1e-6, 1e-2)),
        ({"low": 1e-6, "high": 1e-2, "log": False}, Uniform(1e-6, 1e-2)),
        ({"type": "uniform", "low": 1e-6, "high": 1e-2, "log": True}, LogUniform(1e-6, 1e-2)),
        (["relu", "gelu"], Choice(("relu", "gelu"))),
        (("a", 1, None, True), Choice(("a", 1, None, True))),
        (Uniform(0.1, 0.2), Uniform(0.1, 0.2)),
    ],
)
def test_config_forms(cfg: object, expected: Domain) -> None:
    assert domain_from_config("x", cfg) == expected


P = r"^pbt\.hyperparameters\.lr: "


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"type": "logunif", "low": 1e-3, "high": 1.0},
            P + r"unknown type 'logunif' \(expected one of \[",
        ),
        (
            {"type": "uniform", "low": 0.5, "high": 0.1},
            P + r"Uniform: low \(0.5\) must be <",
        ),
        (
            {"type": "uniform", "low": 0.1},
            P + r"type 'uniform' needs 'low' and 'high'",
        ),
        (
            {"type": "uniform", "values": [1, 2]},
            P + r"type 'uniform' takes 'low' and 'high'",
        ),
        ({"type": "choice", "low": 0, "high": 1}, P + r"a choice takes 'values' only"),
        ({"type": "choice"}, P + r"type 'choice' needs 'values'"),
        ({"type": "choice", "values": "ab"}, P + r"values must be a list"),
        ({"values": []}, P + r"Choice: values must not be empty"),
        ({"low": 0.1, "hihg": 1.0}, P + r"unknown key\(s\) \['hihg'\]"),
        ({}, P + r"give 'values' \(a choice\) or 'low' and 'high'"),
        ({"low": "abc", "high": 1.0}, P + r"low must be a number, got 'abc'"),
        ({"low": 0.1, "high": 1.0, "log": "yes"}, P + r"log must be true or false"),
        (
            {"type": "int", "low": 1, "high": 4, "log": True},
            P + r"log: true conflicts",
        ),
        ({"type": "loguniform", "low": 1, "high": 4, "log": False}, P + r"log: false"),
        ({"type": 3, "low": 1, "high": 4}, P + r"unknown type 3"),
        (0.1, P + r"expected a mapping with type/low/high/values"),
        ("uniform", P + r"expected a mapping"),
        (None, P + r"expected a mapping"),
    ],
)
def test_malformed_configs_name_the_key(cfg: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        domain_from_config("lr", cfg, prefix="pbt.hyperparameters.")
    with pytest.raises(ValueError, match=message):
        space_from_config({"lr": cfg}, prefix="pbt.hyperparameters.")


def test_space_round_trip_through_json() -> None:
    space = {
        "lr": LogUniform(1e-4, 0.1),
        "dropout": Uniform(0.0, 0.5),
        "layers": IntUniform(1, 4),
        "optimizer": Choice(("adam", "sgd", None, 3, 0.5, False)),
    }
    cfg = json.loads(json.dumps(space_to_config(space)))
    assert space_from_config(cfg) == space
    assert list(space_from_config(cfg)) == list(space)


def test_space_from_config_rejects_non_mappings_and_bad_names() -> None:
    with pytest.raises(ValueError, match=r"pbt\.hyperparameters: expected a mapping"):
        space_from_config([1, 2], prefix="pbt.hyperparameters.")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names must be non-empty strings"):
        space_from_config({"": [1, 2]})
    assert space_from_config({}) == {}


def test_validate_hyperparameters() -> None:
    space = {"lr": LogUniform(1e-4, 0.1), "act": Choice(("relu", "gelu"))}
    validate_hyperparameters({"lr": 0.01, "act": "relu"}, space)
    with pytest.raises(ValueError, match=r"lr: value 0.5 is outside LogUniform\(low=0.0001, high=0.1\)"):
        validate_hyperparameters({"lr": 0.5, "act": "relu"}, space)
    with pytest.raises(ValueError, match=r"act: value 'tanh' is outside Choice"):
        validate_hyperparameters({"lr": 0.01, "act": "tanh"}, space)
    with pytest.raises(ValueError, match=r"missing hyperparameter\(s\) \['act'\]"):
        validate_hyperparameters({"lr": 0.01}, space)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['momentum'\]"):
        validate_hyperparameters({"lr": 0.01, "act": "relu", "momentum": 0.9}, space)
    with pytest.raises(ValueError, match=r"lr: value nan is outside"):
        validate_hyperparameters({"lr": math.nan, "act": "relu"}, space)


def test_omegaconf_containers_and_command_line_overrides() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    base = omegaconf.OmegaConf.create(
        {"lr": {"type": "loguniform", "low": 1e-4, "high": 0.1}, "act": ["relu", "gelu"], "wd": {"low": 1e-6}}
    )
    overrides = ["lr.high=0.5", "wd.high=1e-2", "wd.log=true", "layers={type: int, low: 1, high: 4}"]
    cfg = omegaconf.OmegaConf.merge(base, omegaconf.OmegaConf.from_dotlist(overrides))
    assert space_from_config(cfg, prefix="pbt.hyperparameters.") == {
        "lr": LogUniform(1e-4, 0.5),
        "act": Choice(("relu", "gelu")),
        "wd": LogUniform(1e-6, 1e-2),
        "layers": IntUniform(1, 4),
    }
    bad = omegaconf.OmegaConf.merge(base, omegaconf.OmegaConf.from_dotlist(["lr.type=logunif"]))
    with pytest.raises(ValueError, match=r"^pbt\.hyperparameters\.lr: unknown type 'logunif'"):
        space_from_config(bad, prefix="pbt.hyperparameters.")
