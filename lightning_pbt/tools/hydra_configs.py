"""Hydra support: structured configs for the callback and the strategy, and the helpers an app needs.

``register_configs()`` puts two schema configs into Hydra's ``ConfigStore`` so an installed package can
compose them without this repository's ``configs/`` folder:

- group ``pbt``, name ``base_pbt``: :class:`PopulationBasedTrainingConf`
  (``_target_: lightning_pbt.PopulationBasedTraining``);
- group ``strategy``, name ``base_population``: :class:`PopulationStrategyConf`
  (``_target_: lightning_pbt.PopulationStrategy``).

It also registers three resolvers: ``pbt_run_id`` (see :func:`run_id`), which gives every process of one
launch the same Hydra run directory (``hydra.run.dir: outputs/${pbt_run_id:}``), and
``pbt_launch_devices`` / ``pbt_launch_nodes`` (``trainer.devices: ${pbt_launch_devices:4}``), which take
the process count from torchrun when it launched the job.

A primary config of your own then reads::

    defaults:
      - pbt: base_pbt
      - strategy: base_population
      - _self_
    pbt:
      monitor: val_loss
      mode: min
      hyperparameters:
        lr: {type: loguniform, low: 1.0e-4, high: 0.1}

and the app validates before it builds a Trainer (every process does, so a bad override fails fast
everywhere instead of hanging in a collective)::

    register_configs()

    @hydra.main(config_path="conf", config_name="train", version_base="1.3")
    def main(cfg):
        callback = build_callback(cfg.pbt)        # ValueError naming e.g. "pbt.hyperparameters.lr"
        strategy = build_strategy(cfg.strategy)
        check_population(cfg.trainer, strategy.member_size)

Search-space forms (YAML or command line), per hyperparameter: ``{type: uniform|loguniform|int|choice,
low: .., high: ..}`` or ``{type: choice, values: [..]}`` (see :mod:`lightning_pbt.algorithm.space`). A key set to
``null`` counts as absent. Nothing heavy (torch, Lightning) is imported until a ``build_*`` function runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from lightning_pbt.algorithm.settings import PBTSettings

__all__ = [
    "HYPERPARAMETERS_KEY",
    "PopulationBasedTrainingConf",
    "PopulationStrategyConf",
    "build_callback",
    "build_strategy",
    "check_population",
    "launch_devices",
    "launch_nodes",
    "register_configs",
    "run_id",
    "search_space",
]

HYPERPARAMETERS_KEY = "pbt.hyperparameters"
RUN_ID_RESOLVER = "pbt_run_id"
DEVICES_RESOLVER = "pbt_launch_devices"
NODES_RESOLVER = "pbt_launch_nodes"


def _schema_from_settings(name: str, target: str, doc: str, module: str) -> type:
    """A Hydra structured config with one field per :class:`PBTSettings` argument, same name and default.

    Args:
        name: the class name.
        target: its ``_target_``, the class Hydra instantiates.
        doc: the class docstring; each field's line of :class:`PBTSettings`' Attributes is appended.
        module: the module the class says it belongs to (where it is documented).

    Returns:
        A dataclass whose fields are ``_target_``, ``_convert_`` and the arguments; a required argument
        defaults to ``MISSING`` (``???``), a Python type OmegaConf does not take is replaced by the field's
        ``metadata["hydra"]``.
    """
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", str, field(default=target)),
        ("_convert_", str, field(default="all")),
    ]
    hints = typing.get_type_hints(PBTSettings)
    for f in PBTSettings.arguments():
        kind = f.metadata.get("hydra", hints[f.name])
        if f.default_factory is not dataclasses.MISSING:  # pragma: no cover - no argument has one today
            default = field(default_factory=f.default_factory)
        elif f.default is dataclasses.MISSING:
            default = field(default_factory=dict) if f.name == "hyperparameters" else field(default=MISSING)
        elif isinstance(f.default, tuple):
            default = field(default_factory=lambda value=f.default: list(value))
        else:
            default = field(default=f.default)
        fields.append((f.name, kind, default))
    schema = dataclasses.make_dataclass(name, fields)
    schema.__module__ = module
    schema.__doc__ = doc + "\n\nAttributes:\n" + _attribute_lines()
    return schema


def _attribute_lines() -> str:
    """The Attributes section of :class:`PBTSettings`' docstring, for the derived schema's docstring."""
    doc = PBTSettings.__doc__ or ""
    section = doc.split("Attributes:\n", 1)[1].split("\n\n", 1)[0]
    names = {f.name for f in PBTSettings.arguments()}
    lines, keep = [], False
    for line in section.splitlines():
        stripped = line.strip()
        if stripped and not line.startswith(" " * 12):
            keep = stripped.split(":", 1)[0] in names
        if keep:
            lines.append("    " + stripped if not line.startswith(" " * 12) else "        " + stripped)
    return "\n".join(lines)


PopulationBasedTrainingConf = _schema_from_settings(
    "PopulationBasedTrainingConf",
    "lightning_pbt.PopulationBasedTraining",
    """[`PopulationBasedTraining`][lightning_pbt.plugin.callback.PopulationBasedTraining]'s arguments, as a Hydra
schema (``pbt/base_pbt``).

Derived from [`PBTSettings`][lightning_pbt.algorithm.settings.PBTSettings]: each field is the callback's argument of the
same name, with the same default. The differences are of form only: ``hyperparameters`` holds config
forms (``{type: loguniform, low: .., high: ..}``, see [`space`][lightning_pbt.algorithm.space]), ``exploit`` is a rule
name and ``custom_explore`` an import path.""",
    __name__,
)
"""The callback's arguments as a Hydra schema (``pbt/base_pbt``), derived from
[`PBTSettings`][lightning_pbt.algorithm.settings.PBTSettings]: the same names and defaults, in Hydra's types."""


@dataclass
class PopulationStrategyConf:
    """:class:`lightning_pbt.PopulationStrategy`'s arguments, as a Hydra schema (``strategy/base_population``).

    Attributes:
        member_size: ranks per member.
        processes_per_device: ranks that share each device.
        timeout: the collective timeout, in seconds.
        members_per_process: members each process hosts, taking turns (lockstep only).
        keep_parked_on_device: with members that take turns on GPUs, parked members keep their tensors on the GPU.
        process_group_backend: ``DDPStrategy``'s backend override (``None``: chosen per device).
        find_unused_parameters: passed to DDP.
    """

    _target_: str = "lightning_pbt.PopulationStrategy"
    member_size: int = 1
    processes_per_device: int = 1
    timeout: float = 600.0
    members_per_process: int = 1
    keep_parked_on_device: bool = False
    process_group_backend: str | None = None
    find_unused_parameters: bool = False


def register_configs() -> None:
    """Store the schema configs in Hydra's ConfigStore and register the ``pbt_run_id`` resolver.

    Call it at import time of the app, before ``@hydra.main`` runs. Idempotent.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="pbt", name="base_pbt", node=PopulationBasedTrainingConf)
    store.store(group="strategy", name="base_population", node=PopulationStrategyConf)
    if not OmegaConf.has_resolver(RUN_ID_RESOLVER):
        OmegaConf.register_new_resolver(RUN_ID_RESOLVER, run_id, use_cache=True)
    if not OmegaConf.has_resolver(DEVICES_RESOLVER):
        OmegaConf.register_new_resolver(DEVICES_RESOLVER, launch_devices)
    if not OmegaConf.has_resolver(NODES_RESOLVER):
        OmegaConf.register_new_resolver(NODES_RESOLVER, launch_nodes)


def _torchrun(env: Mapping[str, str]) -> bool:
    return bool(env.get("TORCHELASTIC_RUN_ID")) and env.get("LOCAL_WORLD_SIZE", "").isdigit()


def launch_devices(default: Any, processes_per_device: Any = 1, env: Mapping[str, str] | None = None) -> Any:
    """``${pbt_launch_devices:4,${strategy.processes_per_device}}``: under torchrun the devices its
    processes per node use (``--nproc_per_node`` / ``processes_per_device``), else ``default``.

    So ``torchrun --nproc_per_node=N app.py`` needs no matching ``trainer.devices``; an explicit
    ``trainer.devices=...`` on the command line still wins.

    Args:
        default: the value outside torchrun.
        processes_per_device: ranks per device; torchrun's processes per node are divided by it.
        env: the environment to read (default ``os.environ``).

    Examples:
        >>> launch_devices(4, env={})
        4
        >>> launch_devices(4, 2, env={"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "16"})
        8
    """
    env = os.environ if env is None else env
    return int(env["LOCAL_WORLD_SIZE"]) // max(1, int(processes_per_device)) if _torchrun(env) else default


def launch_nodes(default: Any, env: Mapping[str, str] | None = None) -> Any:
    """``${pbt_launch_nodes:1}``: under torchrun the number of nodes (``--nnodes``), else ``default``.

    Args:
        default: the value outside torchrun.
        env: the environment to read (default ``os.environ``).
    """
    env = os.environ if env is None else env
    if _torchrun(env) and env.get("GROUP_WORLD_SIZE", "").isdigit():
        return int(env["GROUP_WORLD_SIZE"])
    return default


def _clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"


def run_id(env: Mapping[str, str] | None = None, now: datetime | None = None) -> str:
    """A run name that every process of one launch computes identically.

    - ``LIGHTNING_PBT_RUN_ID`` when set (any launcher; set it yourself on clusters);
    - under ``srun`` with several tasks: ``slurm-<job>.<step>``;
    - under ``torchrun``: ``torchrun-<rendezvous id>`` (a fresh uuid with ``--standalone``, the value of
      ``--rdzv-id`` otherwise) unless that id is the default ``none``;
    - otherwise the local time, ``YYYY-MM-DD/HH-MM-SS`` (Hydra's usual layout). Lightning's own
      launcher passes the parent's directory to its children, so they agree too.

    Args:
        env: the environment to read (default ``os.environ``).
        now: the time to use in the last case (default: now).

    Examples:
        >>> run_id({"SLURM_JOB_ID": "812", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16"})
        'slurm-812.0'
        >>> run_id({"TORCHELASTIC_RUN_ID": "job 7"})
        'torchrun-job_7'
    """
    env = os.environ if env is None else env
    explicit = env.get("LIGHTNING_PBT_RUN_ID", "").strip()
    if explicit:
        return _clean(explicit)
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return _clean(f"slurm-{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}")
    rendezvous = env.get("TORCHELASTIC_RUN_ID", "").strip()
    if rendezvous and rendezvous.lower() != "none":
        return _clean(f"torchrun-{rendezvous[:8] if _is_uuid(rendezvous) else rendezvous}")
    return (now or datetime.now()).strftime("%Y-%m-%d/%H-%M-%S")


def _is_uuid(text: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", text.lower()) is not None


def _plain(cfg: Any) -> Any:
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _drop_nulls(value: Any) -> Any:
    """``{low: null}`` means "no low": lets a command line clear a key when switching a domain's type."""
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if v is not None}
    return value


def search_space(cfg: Any, prefix: str = HYPERPARAMETERS_KEY + ".") -> dict[str, Any]:
    """``{name: Domain}`` from the (OmegaConf or plain) ``hyperparameters`` mapping.

    Args:
        cfg: the ``hyperparameters`` node (a key set to ``null`` counts as absent).
        prefix: the node's full key plus a dot, for the messages.

    Returns:
        The search space ``{name: Domain}``.

    Raises:
        ValueError: a malformed or empty space, or an interpolation that does not resolve; the message
            starts with the full key, e.g. ``pbt.hyperparameters.lr: LogUniform: low (-1.0) must be > 0``.

    Examples:
        >>> search_space({"lr": {"type": "loguniform", "low": 1e-4, "high": 0.1}, "act": ["relu", "gelu"]})
        {'lr': LogUniform(low=0.0001, high=0.1), 'act': Choice(values=('relu', 'gelu'))}
    """
    from lightning_pbt.algorithm.space_config import space_from_config

    try:
        plain = _plain(cfg)
    except Exception as err:  # an interpolation that does not resolve, a missing value (???)
        raise ValueError(f"{prefix.rstrip('.')}: {err}") from None
    if plain is None:
        plain = {}
    if not isinstance(plain, Mapping):
        raise ValueError(f"{prefix.rstrip('.')}: expected a mapping of name -> domain, got {plain!r}")
    space = space_from_config({name: _drop_nulls(value) for name, value in plain.items()}, prefix=prefix)
    if not space:
        raise ValueError(
            f"{prefix.rstrip('.')}: the search space is empty; add one, e.g. "
            f"'+{prefix}lr={{type:loguniform,low:1e-4,high:0.1}}'"
        )
    return space


def _name_key(err: Exception, own_prefix: str, prefix: str, cfg: Mapping[str, Any]) -> str:
    """``"PopulationBasedTraining: mode must be ..."`` -> ``"pbt.mode: must be ..."`` (Hydra wraps the
    constructor's error in an InstantiationException; its cause has the message)."""
    cause = err.__cause__ if err.__cause__ is not None else err
    message = str(cause).removeprefix(own_prefix)
    match = re.match(r"(\w+) (must|is|should)\b", message)
    if match and match.group(1) in cfg:
        return f"{prefix}.{match.group(1)}: {message[len(match.group(1)) + 1 :]}"
    return f"{prefix}: {message}"


def build_callback(cfg: Any, prefix: str = "pbt") -> Any:
    """Validate ``cfg`` (the ``pbt`` node) and instantiate the callback.

    Args:
        cfg: the ``pbt`` node (OmegaConf or a plain mapping); without ``_target_`` it builds
            ``lightning_pbt.PopulationBasedTraining``.
        prefix: the node's key, for the messages.

    Returns:
        The ``PopulationBasedTraining`` callback (or whatever ``_target_`` names).

    Raises:
        ValueError: anything the callback refuses, or a required key left ``???``, naming the key
            (``pbt.hyperparameters.lr``, ``pbt.mode``, ...).
    """
    from hydra.utils import instantiate

    from lightning_pbt.algorithm.space_config import space_to_config

    space = search_space(cfg.get("hyperparameters") if cfg is not None else None, prefix=f"{prefix}.hyperparameters.")
    _check_required(cfg, prefix)
    try:
        plain = _plain(cfg)
    except Exception as err:
        raise ValueError(f"{prefix}: {err}") from None
    plain = dict(plain)
    plain.setdefault("_target_", PopulationBasedTrainingConf._target_)
    plain["hyperparameters"] = space_to_config(space)
    try:
        return instantiate(plain)
    except Exception as err:  # hydra wraps the constructor's ValueError in InstantiationException
        raise ValueError(_name_key(err, "PopulationBasedTraining: ", prefix, plain)) from None


def _check_required(cfg: Any, prefix: str) -> None:
    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ValueError(f"{prefix}.{missing[0]}: a value is required (e.g. {prefix}.{missing[0]}=...)")


def build_strategy(cfg: Any, prefix: str = "strategy") -> Any:
    """Instantiate the strategy from the ``strategy`` node (errors name ``strategy.<key>``).

    Args:
        cfg: the ``strategy`` node; without ``_target_`` it builds ``lightning_pbt.PopulationStrategy``.
        prefix: the node's key, for the messages.

    Returns:
        The ``PopulationStrategy`` (or whatever ``_target_`` names).

    Raises:
        ValueError: anything the strategy refuses, naming the key (``strategy.member_size``, ...).
    """
    from hydra.utils import instantiate

    _check_required(cfg, prefix)
    plain = dict(_plain(cfg) or {})
    plain.setdefault("_target_", PopulationStrategyConf._target_)
    try:
        return instantiate(plain)
    except Exception as err:
        raise ValueError(_name_key(err, "PopulationStrategy: ", prefix, plain)) from None


def check_population(
    trainer_cfg: Any, member_size: int, processes_per_device: int = 1, members_per_process: int = 1
) -> int | None:
    """The number of members, checked before any process starts; ``None`` when devices are not a count.

    ``trainer.devices`` x ``trainer.num_nodes`` x ``strategy.processes_per_device`` ranks must be a
    multiple of ``strategy.member_size``.

    Args:
        trainer_cfg: the ``trainer`` node (``devices``, ``num_nodes``).
        member_size: ``strategy.member_size``.
        processes_per_device: ``strategy.processes_per_device``.
        members_per_process: ``strategy.members_per_process`` (members that take turns in each process).

    Returns:
        The population size, or ``None`` when ``devices`` is not a count (``"auto"``, a device list
        string): Lightning resolves it and the strategy checks again.

    Raises:
        ValueError: the ranks are not a multiple of ``member_size``.

    Examples:
        >>> check_population({"devices": 8, "num_nodes": 2}, member_size=2)
        8
        >>> check_population({"devices": 2}, member_size=1, members_per_process=4)
        8
    """
    trainer = _plain(trainer_cfg) or {}
    devices = trainer.get("devices", "auto")
    nodes = trainer.get("num_nodes", 1) or 1
    if isinstance(devices, list | tuple):
        devices = len(devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        return None  # "auto", -1, "0,1": Lightning resolves them; the strategy checks again
    world = devices * int(nodes) * processes_per_device
    if world % member_size:
        raise ValueError(
            f"trainer.devices x trainer.num_nodes x strategy.processes_per_device = {world} ranks is not a "
            f"multiple of strategy.member_size={member_size}; the population size is ranks / member_size"
        )
    return world // member_size * members_per_process
