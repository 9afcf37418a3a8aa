"""The search space in its config form (Hydra / YAML): read it into domains, write domains back.

Config forms accepted by :func:`domain_from_config` / :func:`space_from_config` (Hydra / YAML), per
hyperparameter ``name``::

    lr: {type: loguniform, low: 1.0e-4, high: 0.1}     # uniform | loguniform (log_uniform) |
    dropout: {type: uniform, low: 0.0, high: 0.5}      # int (int_uniform) | choice
    layers: {type: int, low: 1, high: 4}                # inclusive integer range
    optimizer: {type: choice, values: [adam, sgd]}
    wd: {low: 1.0e-6, high: 1.0e-2, log: true}          # no type: low/high -> uniform (loguniform if log)
    act: {values: [relu, gelu]}                         # no type: values -> choice
    act2: [relu, gelu]                                  # a list -> choice
    momentum: Uniform(0.8, 0.99)                        # a Domain instance passes through (Python)

``log: true`` may also accompany ``type: uniform`` (it then means loguniform). Numeric strings such as
``"1e-3"`` (a YAML 1.1 gotcha) are accepted for ``low``/``high``. Any other shape is a ``ValueError`` whose
message starts with ``f"{prefix}{name}"``, e.g. ``pbt.hyperparameters.lr: unknown type 'logunif' ...``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_pbt.algorithm.space import Choice, Domain, IntUniform, LogUniform, Uniform

__all__ = ["domain_from_config", "space_from_config", "space_to_config"]


_TYPES: dict[str, type[Domain]] = {
    "uniform": Uniform,
    "loguniform": LogUniform,
    "log_uniform": LogUniform,
    "int": IntUniform,
    "int_uniform": IntUniform,
    "choice": Choice,
}
_KEYS = ("type", "low", "high", "values", "log")


def _number(value: Any, where: str, key: str) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: {key} must be a number, got {value!r}") from None
    return value


def domain_from_config(name: str, cfg: Any, prefix: str = "") -> Domain:
    """One domain from its config form (see the module docstring); errors name ``prefix + name``.

    Args:
        name: the hyperparameter's name, used in error messages.
        cfg: a mapping (``{type: loguniform, low: 1e-4, high: 0.1}``, ``{values: [a, b]}``, ...), a list
            (a :class:`Choice`) or a :class:`Domain`, returned as it is.
        prefix: prepended to ``name`` in error messages (e.g. ``"pbt.hyperparameters."``).

    Returns:
        The domain.

    Raises:
        ValueError: a malformed form; the message starts with ``prefix + name``.

    Examples:
        >>> domain_from_config("lr", {"type": "loguniform", "low": 1e-4, "high": 0.1})
        LogUniform(low=0.0001, high=0.1)
        >>> domain_from_config("lr", {"low": 1e-4}, prefix="pbt.hyperparameters.")
        Traceback (most recent call last):
        ...
        ValueError: pbt.hyperparameters.lr: type 'uniform' needs 'low' and 'high' (missing ['high'])
    """
    where = f"{prefix}{name}"
    if isinstance(cfg, Domain):
        return cfg
    try:
        if isinstance(cfg, Mapping):
            return _domain_from_mapping(cfg, where)
        if isinstance(cfg, Sequence) and not isinstance(cfg, (str, bytes)):
            return Choice(tuple(cfg))
    except ValueError as err:
        if str(err).startswith(where + ":"):
            raise
        raise ValueError(f"{where}: {err}") from None
    raise ValueError(
        f"{where}: expected a mapping with type/low/high/values, a list of choices or a Domain, got {cfg!r}"
    )


def _domain_from_mapping(cfg: Mapping[Any, Any], where: str) -> Domain:
    unknown = sorted(str(k) for k in cfg if k not in _KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (expected some of {list(_KEYS)})")
    log = cfg.get("log")
    if log is not None and not isinstance(log, bool):
        raise ValueError(f"{where}: log must be true or false, got {log!r}")
    kind = cfg.get("type")
    if kind is None:
        if "values" in cfg:
            kind = "choice"
        elif "low" in cfg or "high" in cfg:
            kind = "loguniform" if log else "uniform"
        else:
            raise ValueError(f"{where}: give 'values' (a choice) or 'low' and 'high' (a range), got {dict(cfg)!r}")
    if not isinstance(kind, str) or kind.lower() not in _TYPES:
        raise ValueError(f"{where}: unknown type {kind!r} (expected one of {sorted(_TYPES)})")
    cls = _TYPES[kind.lower()]
    if log is not None:
        if cls is Uniform and log:
            cls = LogUniform
        elif cls not in (Uniform, LogUniform) or (cls is LogUniform and not log):
            raise ValueError(f"{where}: log: {str(log).lower()} conflicts with type {kind!r}")
    if cls is Choice:
        extra = [k for k in ("low", "high") if k in cfg]
        if extra:
            raise ValueError(f"{where}: a choice takes 'values' only, not {extra}")
        if "values" not in cfg:
            raise ValueError(f"{where}: type {kind!r} needs 'values'")
        values = cfg["values"]
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
            raise ValueError(f"{where}: values must be a list, got {values!r}")
        return Choice(tuple(values))
    if "values" in cfg:
        raise ValueError(f"{where}: type {kind!r} takes 'low' and 'high', not 'values'")
    missing = [k for k in ("low", "high") if k not in cfg]
    if missing:
        raise ValueError(f"{where}: type {kind!r} needs 'low' and 'high' (missing {missing})")
    return cls(_number(cfg["low"], where, "low"), _number(cfg["high"], where, "high"))


def space_from_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Domain]:
    """A search space ``{name: Domain}`` from a mapping of config forms, in the mapping's order.

    Args:
        cfg: ``{name: config form or Domain}`` (see :func:`domain_from_config`); an OmegaConf
            ``DictConfig`` works too.
        prefix: prepended to each name in error messages.

    Returns:
        ``{name: Domain}``, in ``cfg``'s order.

    Raises:
        ValueError: ``cfg`` is not a mapping, a name is not a non-empty string, or a form is malformed.

    Examples:
        >>> space_from_config({"lr": {"type": "loguniform", "low": 1e-4, "high": 0.1}, "act": ["relu", "gelu"]})
        {'lr': LogUniform(low=0.0001, high=0.1), 'act': Choice(values=('relu', 'gelu'))}
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'hyperparameters'}: expected a mapping, got {cfg!r}")
    space: dict[str, Domain] = {}
    for name, value in cfg.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{prefix}{name!r}: hyperparameter names must be non-empty strings")
        space[name] = domain_from_config(name, value, prefix)
    return space


def space_to_config(space: Mapping[str, Domain]) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`space_from_config` (plain dicts, JSON/YAML-able).

    Args:
        space: ``{name: Domain}``.

    Returns:
        ``{name: config form}``, each accepted back by :func:`domain_from_config`.

    Examples:
        >>> space_to_config({"layers": IntUniform(1, 4)})
        {'layers': {'type': 'int', 'low': 1, 'high': 4}}
    """
    return {name: domain.to_config() for name, domain in space.items()}
