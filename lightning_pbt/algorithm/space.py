"""Search-space domains: sample, perturb and resample hyperparameters without ever leaving the domain.

Every random choice takes an explicit ``numpy.random.Generator`` so that the scheduler alone owns the
random stream, and every value returned is a plain Python ``float``/``int``/choice value (never a numpy
scalar) because it ends up in JSON lineage files and in checkpoints.

Their config forms (Hydra / YAML) are read and written by :mod:`lightning_pbt.algorithm.space_config`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Choice",
    "Domain",
    "IntUniform",
    "LogUniform",
    "Uniform",
    "check_space_not_empty",
    "validate_hyperparameters",
]


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _is_real(value: Any) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` in Python, but never a bound)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_factor(factor: float) -> float:
    if not _is_real(factor) or not math.isfinite(float(factor)) or float(factor) <= 0:
        raise ValueError(f"perturbation factor must be a finite number > 0, got {factor!r}")
    return float(factor)


def _plain(value: Any) -> Any:
    """Numpy scalars -> Python scalars, so values stay JSON-able."""
    return value.item() if isinstance(value, np.generic) else value


class Domain(ABC):
    """The set of values one hyperparameter may take, and how PBT moves inside it.

    The four concrete domains are :class:`Uniform`, :class:`LogUniform`, :class:`IntUniform` and
    :class:`Choice`; they are frozen dataclasses (hashable, comparable, printable as their constructor
    call). A custom domain subclasses this and implements every abstract method; whatever it returns must
    satisfy its own :meth:`contains`.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> lr = LogUniform(1e-4, 1e-1)
        >>> value = lr.sample(rng)
        >>> lr.contains(value) and lr.contains(lr.perturb(value, 1.2, rng))
        True
    """

    @abstractmethod
    def sample(self, rng: np.random.Generator) -> Any:
        """A value drawn from the domain's prior."""

    @abstractmethod
    def perturb(self, value: Any, factor: float, rng: np.random.Generator) -> Any:
        """``value`` moved by a multiplicative ``factor`` (> 0); the result is always inside the domain."""

    def resample(self, rng: np.random.Generator) -> Any:
        """A fresh sample, independent of the current value (PBT's "resample" explore step)."""
        return self.sample(rng)

    @abstractmethod
    def contains(self, value: Any) -> bool:
        """Whether ``value`` belongs to the domain."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """The compact config form accepted back by :func:`~lightning_pbt.algorithm.space_config.domain_from_config`."""

    def normalize(self, value: Any) -> Any:
        """``value`` (already known to be inside) in the domain's canonical Python type."""
        return _plain(value)


@dataclass(frozen=True)
class _Interval(Domain):
    """Shared validation and clipping of the continuous domains."""

    low: float
    high: float

    def __post_init__(self) -> None:
        kind = type(self).__name__
        for key in ("low", "high"):
            value = getattr(self, key)
            if not _is_real(value):
                raise ValueError(f"{kind}: {key} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise ValueError(f"{kind}: {key} must be finite, got {value!r}")
        if not float(self.low) < float(self.high):
            raise ValueError(f"{kind}: low ({self.low!r}) must be < high ({self.high!r})")
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))

    def _clip(self, value: float) -> float:
        return float(min(max(value, self.low), self.high))

    def perturb(self, value: Any, factor: float, rng: np.random.Generator) -> float:
        factor = _check_factor(factor)
        if not _is_real(value) or math.isnan(float(value)):
            raise ValueError(f"{type(self).__name__}: cannot perturb {value!r}, not a number")
        return self._clip(float(value) * factor)

    def contains(self, value: Any) -> bool:
        return _is_real(value) and math.isfinite(float(value)) and self.low <= float(value) <= self.high

    def normalize(self, value: Any) -> float:
        return float(value)


@dataclass(frozen=True)
class Uniform(_Interval):
    """Floats uniform in ``[low, high]``; perturbation multiplies and clips.

    A value of exactly 0 stays 0 under multiplication: only a resample moves it away (keep
    ``resample_probability > 0`` when 0 is inside the range).

    Args:
        low: the smallest value, a finite number.
        high: the largest value, a finite number greater than ``low``.

    Raises:
        ValueError: a bound that is not a finite number, or ``low >= high``.

    Examples:
        >>> import numpy as np
        >>> dropout = Uniform(0.0, 0.5)
        >>> dropout.perturb(0.45, 1.2, np.random.default_rng(0))  # 0.54, clipped
        0.5
        >>> dropout.to_config()
        {'type': 'uniform', 'low': 0.0, 'high': 0.5}
    """

    def sample(self, rng: np.random.Generator) -> float:
        u = float(rng.random())
        return self._clip(self.low * (1.0 - u) + self.high * u)  # no overflow even for +-1e308 bounds

    def to_config(self) -> dict[str, Any]:
        return {"type": "uniform", "low": self.low, "high": self.high}


@dataclass(frozen=True)
class LogUniform(_Interval):
    """Positive floats, log-uniform in ``[low, high]`` (learning rates, weight decay).

    Perturbation multiplies and clips, as for :class:`Uniform`; sampling is uniform in ``log``.

    Args:
        low: the smallest value, a finite number ``> 0``.
        high: the largest value, a finite number greater than ``low``.

    Raises:
        ValueError: a bound that is not a finite number, ``low <= 0``, or ``low >= high``.

    Examples:
        >>> import numpy as np
        >>> lr = LogUniform(1e-4, 1e-1)
        >>> round(lr.perturb(0.01, 0.8, np.random.default_rng(0)), 6)
        0.008
        >>> LogUniform(0.0, 1.0)
        Traceback (most recent call last):
        ...
        ValueError: LogUniform: low (0.0) must be > 0
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low <= 0:
            raise ValueError(f"LogUniform: low ({self.low!r}) must be > 0")

    def sample(self, rng: np.random.Generator) -> float:
        return self._clip(math.exp(float(rng.uniform(math.log(self.low), math.log(self.high)))))

    def to_config(self) -> dict[str, Any]:
        return {"type": "loguniform", "low": self.low, "high": self.high}


@dataclass(frozen=True)
class IntUniform(Domain):
    """Integers uniform in the inclusive range ``[low, high]`` (layer counts, batch sizes).

    Perturbation rounds ``value * factor`` to the nearest integer; when rounding would give back the
    same value (small values) and ``factor != 1``, it moves one step instead: away from zero for
    ``factor > 1`` (upwards from 0), towards zero for ``factor < 1`` (downwards from 0). Then it clips.

    Args:
        low: the smallest value, an integer (a float with an integral value is accepted).
        high: the largest value, an integer greater than ``low``; both ends can be sampled.

    Raises:
        ValueError: a bound that is not an integral number, outside int64, or ``low >= high``.

    Examples:
        >>> import numpy as np
        >>> layers = IntUniform(1, 8)
        >>> layers.perturb(2, 1.2, np.random.default_rng(0))  # round(2.4) == 2, so one step up
        3
        >>> layers.perturb(8, 1.2, np.random.default_rng(0))  # clipped
        8
    """

    low: int
    high: int

    def __post_init__(self) -> None:
        for key in ("low", "high"):
            value = getattr(self, key)
            if not _is_real(value) or not math.isfinite(float(value)):
                raise ValueError(f"IntUniform: {key} must be a finite integer, got {value!r}")
            if isinstance(value, (float, np.floating)) and not float(value).is_integer():
                raise ValueError(f"IntUniform: {key} must be an integer, got {value!r}")
            if not _INT64_MIN <= int(value) <= _INT64_MAX:
                raise ValueError(f"IntUniform: {key} must fit in 64 bits, got {value!r}")
            object.__setattr__(self, key, int(value))
        if not self.low < self.high:
            raise ValueError(f"IntUniform: low ({self.low!r}) must be < high ({self.high!r})")

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high, endpoint=True))

    def perturb(self, value: Any, factor: float, rng: np.random.Generator) -> int:
        factor = _check_factor(factor)
        if not _is_real(value) or not math.isfinite(float(value)):
            raise ValueError(f"IntUniform: cannot perturb {value!r}, not a finite number")
        current = round(float(value))
        moved = round(min(max(current * factor, self.low), self.high))
        if moved == current and factor != 1.0:
            step = 1 if factor > 1 else -1
            moved = current + (-step if current < 0 else step)
        return int(min(max(moved, self.low), self.high))

    def contains(self, value: Any) -> bool:
        return (
            isinstance(value, (int, np.integer))
            and not isinstance(value, (bool, np.bool_))
            and (self.low <= int(value) <= self.high)
        )

    def normalize(self, value: Any) -> int:
        return int(value)

    def to_config(self) -> dict[str, Any]:
        return {"type": "int", "low": self.low, "high": self.high}


_CHOICE_TYPES = (str, int, float, bool, type(None))


def _same(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: ``True`` and ``1`` differ, ``1`` and ``1.0`` do not."""
    try:
        return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Choice(Domain):
    """One of a few distinct JSON scalar values (str/int/float/bool/None), in the given order.

    Perturbation moves to a neighbouring index: the next one for ``factor > 1``, the previous one for
    ``factor < 1``. At an end it bounces to the only neighbour, so with two or more values a
    perturbation (``factor != 1``) always changes the value; the order of ``values`` therefore matters.

    Args:
        values: the options, in order (a list or tuple of distinct JSON scalars; numpy scalars are
            converted to Python ones).

    Raises:
        ValueError: ``values`` empty, not a sequence (a string is refused), holding a duplicate, a
            non-scalar or a non-finite float.

    Examples:
        >>> import numpy as np
        >>> batch = Choice([32, 64, 128])
        >>> batch.perturb(64, 1.2, np.random.default_rng(0)), batch.perturb(128, 1.2, np.random.default_rng(0))
        (128, 64)
    """

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        values = self.values
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
            raise ValueError(f"Choice: values must be a list of options, got {values!r}")
        values = tuple(_plain(v) for v in values)
        if not values:
            raise ValueError("Choice: values must not be empty")
        for v in values:
            if not isinstance(v, _CHOICE_TYPES):
                raise ValueError(f"Choice: value {v!r} is not a str/int/float/bool/None")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"Choice: value {v!r} is not finite")
        for i, v in enumerate(values):
            for w in values[:i]:
                if _same(v, w):
                    raise ValueError(f"Choice: duplicate values {w!r} and {v!r} in {list(values)!r}")
        object.__setattr__(self, "values", values)

    def _index(self, value: Any) -> int:
        value = _plain(value)
        for i, v in enumerate(self.values):
            if _same(v, value):
                return i
        raise ValueError(f"Choice: {value!r} is not one of {list(self.values)!r}")

    def sample(self, rng: np.random.Generator) -> Any:
        return self.values[int(rng.integers(len(self.values)))]

    def perturb(self, value: Any, factor: float, rng: np.random.Generator) -> Any:
        factor = _check_factor(factor)
        i = self._index(value)
        n = len(self.values)
        if factor == 1.0 or n == 1:
            return self.values[i]
        j = i + 1 if factor > 1 else i - 1
        if j < 0 or j >= n:
            j = i - 1 if factor > 1 else i + 1
        return self.values[j]

    def contains(self, value: Any) -> bool:
        try:
            self._index(value)
        except (ValueError, TypeError):
            return False
        return True

    def normalize(self, value: Any) -> Any:
        return self.values[self._index(value)]

    def to_config(self) -> dict[str, Any]:
        return {"type": "choice", "values": list(self.values)}


def check_space_not_empty(space: Mapping[str, Domain]) -> dict[str, Domain]:
    """``space`` itself if it names at least one hyperparameter; a ValueError otherwise.

    A population over an empty space can explore nothing: every member would keep its weights' first
    values and PBT would be a plain ensemble. The callback and the pure scheduler refuse it alike.

    Args:
        space: ``{name: Domain}``.

    Raises:
        ValueError: ``space`` is empty.

    Examples:
        >>> check_space_not_empty({})
        Traceback (most recent call last):
        ...
        ValueError: the search space (hyperparameters) is empty
    """
    if not space:
        raise ValueError("the search space (hyperparameters) is empty")
    return dict(space)


def validate_hyperparameters(values: Mapping[str, Any], space: Mapping[str, Domain], prefix: str = "") -> None:
    """Raise ``ValueError`` naming the key if ``values`` misses, adds or mis-sets a hyperparameter.

    Args:
        values: ``{name: value}``, one value per hyperparameter of ``space``.
        space: ``{name: Domain}``.
        prefix: prepended to the messages.

    Raises:
        ValueError: a name of ``space`` missing from ``values``, a name of ``values`` not in ``space``, or
            a value outside its domain.

    Examples:
        >>> validate_hyperparameters({"lr": 0.5}, {"lr": LogUniform(1e-4, 1e-1)})
        Traceback (most recent call last):
        ...
        ValueError: lr: value 0.5 is outside LogUniform(low=0.0001, high=0.1)
    """
    missing = sorted(set(space) - set(values))
    if missing:
        raise ValueError(f"{prefix}missing hyperparameter(s) {missing} (the space has {sorted(space)})")
    extra = sorted(str(k) for k in set(values) - set(space))
    if extra:
        raise ValueError(f"{prefix}unknown hyperparameter(s) {extra} (the space has {sorted(space)})")
    for name, domain in space.items():
        if not domain.contains(values[name]):
            raise ValueError(f"{prefix}{name}: value {values[name]!r} is outside {domain!r}")
