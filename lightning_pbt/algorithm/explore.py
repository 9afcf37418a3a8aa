"""Explore: new hyperparameters for a member that just copied a donor (perturb, resample or custom).

Kept apart from the exploit rules so that each can be swapped alone, and from the domains so that the
policy (which factor, how often to resample) is one small, seedable object.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lightning_pbt.algorithm.space import Domain, validate_hyperparameters

__all__ = ["Explorer", "format_value", "perturbation_note", "resolve_callable"]

ExploreFn = Callable[[dict[str, Any], Mapping[str, Domain], np.random.Generator], Mapping[str, Any]]


def format_value(value: Any) -> str:
    """Compact text for a hyperparameter value in mutation strings (floats with 4 significant digits).

    Args:
        value: a hyperparameter value.

    Examples:
        >>> format_value(0.0123456), format_value(3), format_value("adam")
        ('0.01235', '3', "'adam'")
    """
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return repr(value)


def perturbation_note(domain: Any, old: Any, factor: float, new: Any) -> str:
    """How a perturbation is shown: ``"x1.2"``, or, where a bound clipped it, the bound and the factor that
    really applied (``"x1.2, clipped at high 0.1: x1.05"``).

    Args:
        domain: the hyperparameter's domain (a choice has no bounds to clip at).
        old: the value before the perturbation.
        factor: the perturbation factor drawn.
        new: the value after it, inside the domain.

    Examples:
        >>> from lightning_pbt.space import LogUniform
        >>> lr = LogUniform(1e-4, 0.1)
        >>> perturbation_note(lr, 0.05, 1.2, 0.06), perturbation_note(lr, 0.095, 1.2, 0.1)
        ('x1.2', 'x1.2, clipped at high 0.1: x1.053')
    """
    low, high = getattr(domain, "low", None), getattr(domain, "high", None)
    if low is None or high is None or isinstance(old, bool) or not isinstance(old, (int, float)):
        return f"x{factor:.4g}"  # a choice moves to a neighbour: there is no bound to clip at
    wanted = float(old) * factor
    if low <= wanted <= high or new == wanted:
        return f"x{factor:.4g}"
    bound = "high" if wanted > high else "low"
    real = f"x{float(new) / float(old):.4g}" if old else "from 0"
    return f"x{factor:.4g}, clipped at {bound} {format_value(new)}: {real}"


def resolve_callable(path: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:function"`` or ``"package.module.function"``.

    Resolved with importlib (never ``eval``) so that a Hydra config can name a function by string.

    Args:
        path: ``"package.module:function"`` or ``"package.module.function"`` (nested attributes work).

    Raises:
        ValueError: a path that does not import, names nothing, or names something not callable.

    Examples:
        >>> resolve_callable("math.floor")(2.5)
        2
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"expected a dotted path 'package.module:function', got {path!r}")
    path = path.strip()
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
        candidates = [(module_name, attr_path)]
    else:
        parts = path.split(".")
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    errors: list[str] = [] if candidates else [f"'{path}' must name a module and an attribute"]
    for module_name, attr_path in candidates:
        if not module_name or not attr_path:
            errors.append(f"'{path}' must name a module and an attribute")
            continue
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as err:
            errors.append(f"cannot import module '{module_name}': {err}")
            continue
        try:
            for attr in attr_path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            errors.append(f"module '{module_name}' has no attribute '{attr_path}'")
            continue
        if not callable(obj):
            raise ValueError(f"'{path}' resolves to {obj!r}, which is not callable")
        return obj
    raise ValueError(f"cannot resolve '{path}': " + "; ".join(errors))


class Explorer:
    """Perturbs each hyperparameter by a random factor, or resamples it with ``resample_probability``.

    ``custom_explore`` (a callable or its dotted path) replaces that policy: it is called as
    ``fn(dict(hyperparameters), space, rng)`` and must return a value for every hyperparameter, each
    inside its domain.

    Args:
        space: ``{name: Domain}``.
        perturbation_factors: the factors a perturbed value is multiplied by, one drawn uniformly per
            hyperparameter (positive, finite, at least one).
        resample_probability: the chance, per hyperparameter, of a resample instead, in [0, 1].
        custom_explore: a function ``fn(hyperparameters, space, rng) -> {name: value}`` or its import
            path, replacing perturb/resample.

    Raises:
        ValueError: a space entry that is not a Domain, bad factors or probability, or a
            ``custom_explore`` that is neither callable nor a resolvable path. :meth:`explore` raises it
            too when a custom function returns a missing, unknown or out-of-domain value.

    Examples:
        >>> import numpy as np
        >>> from lightning_pbt.algorithm.space import LogUniform
        >>> explorer = Explorer({"lr": LogUniform(1e-4, 1e-1)}, perturbation_factors=(0.5,), resample_probability=0)
        >>> explorer.explore({"lr": 0.01}, np.random.default_rng(0))
        ({'lr': 0.005}, ['lr: 0.01 -> 0.005 (x0.5)'])
    """

    def __init__(
        self,
        space: Mapping[str, Domain],
        perturbation_factors: Sequence[float] = (0.8, 1.2),
        resample_probability: float = 0.25,
        custom_explore: ExploreFn | str | None = None,
    ) -> None:
        for name, domain in space.items():
            if not isinstance(domain, Domain):
                raise ValueError(f"{name}: expected a Domain, got {domain!r}")
        factors = list(perturbation_factors) if not isinstance(perturbation_factors, str) else []
        if not factors or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0 for f in factors
        ):
            raise ValueError(
                f"perturbation_factors must be positive finite numbers (at least one), got {perturbation_factors!r}"
            )
        p = resample_probability
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"resample_probability must be in [0, 1], got {p!r}")
        if isinstance(custom_explore, str):
            custom_explore = resolve_callable(custom_explore)
        elif custom_explore is not None and not callable(custom_explore):
            raise ValueError(f"custom_explore must be a callable or a dotted path, got {custom_explore!r}")
        self.space: dict[str, Domain] = dict(space)
        self.perturbation_factors: tuple[float, ...] = tuple(float(f) for f in factors)
        self.resample_probability = float(p)
        self.custom_explore: ExploreFn | None = custom_explore

    def __repr__(self) -> str:
        return (
            f"Explorer(space={self.space!r}, perturbation_factors={self.perturbation_factors!r}, "
            f"resample_probability={self.resample_probability!r}, custom_explore={self.custom_explore!r})"
        )

    def explore(self, hyperparameters: Mapping[str, Any], rng: np.random.Generator) -> tuple[dict[str, Any], list[str]]:
        """New values and human-readable mutations such as ``"lr: 0.01 -> 0.012 (x1.2)"``.

        Args:
            hyperparameters: the values to explore from (one per hyperparameter of the space).
            rng: the only source of randomness.
        """
        validate_hyperparameters(hyperparameters, self.space)
        if self.custom_explore is not None:
            return self._explore_custom(hyperparameters, rng)
        new: dict[str, Any] = {}
        mutations: list[str] = []
        for name in sorted(self.space):
            domain, old = self.space[name], hyperparameters[name]
            if rng.random() < self.resample_probability:
                value, how = domain.resample(rng), "resampled"
            else:
                factor = self.perturbation_factors[int(rng.integers(len(self.perturbation_factors)))]
                value = domain.perturb(old, factor, rng)
                how = perturbation_note(domain, old, factor, value)
            new[name] = domain.normalize(value)
            mutations.append(f"{name}: {format_value(old)} -> {format_value(new[name])} ({how})")
        return new, mutations

    def _explore_custom(
        self, hyperparameters: Mapping[str, Any], rng: np.random.Generator
    ) -> tuple[dict[str, Any], list[str]]:
        fn = self.custom_explore
        assert fn is not None
        result = fn(dict(hyperparameters), self.space, rng)
        where = getattr(fn, "__qualname__", repr(fn))
        if not isinstance(result, Mapping):
            raise ValueError(f"custom_explore {where} must return a dict of hyperparameters, got {result!r}")
        new: dict[str, Any] = {}
        mutations: list[str] = []
        for name in sorted(self.space):
            if name not in result:
                raise ValueError(f"custom_explore {where} returned no value for '{name}'")
            value = result[name]
            if not self.space[name].contains(value):
                raise ValueError(f"custom_explore {where} returned {name}={value!r}, outside {self.space[name]!r}")
            new[name] = self.space[name].normalize(value)
            old = hyperparameters[name]
            if new[name] != old:
                mutations.append(f"{name}: {format_value(old)} -> {format_value(new[name])} (custom)")
        extra = sorted(str(k) for k in result if k not in self.space)
        if extra:
            raise ValueError(f"custom_explore {where} returned unknown hyperparameter(s) {extra}")
        return new, mutations
