"""The callback's arguments, defined once: names, defaults, checks and what each means.

:class:`PBTSettings` is the one definition. :class:`~lightning_pbt.PopulationBasedTraining` validates its
arguments by building one, and :mod:`lightning_pbt.tools.hydra_configs` derives its structured config
``PopulationBasedTrainingConf`` from its fields, so the two cannot drift. A new
argument is a field here (with its Hydra type in ``metadata`` when the Python type is not one OmegaConf
accepts), its line in the callback's signature (a unit test compares them) and its behaviour.

Pure: no torch, no Lightning. The checks run in the order of the fields that need them, each raising a
``ValueError`` that starts with ``PopulationBasedTraining:`` and names the argument.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lightning_pbt.algorithm.exploit import ExploitRule, check_mode, check_quantile_fraction, make_exploit_rule
from lightning_pbt.algorithm.explore import Explorer
from lightning_pbt.algorithm.scheduler import PBTScheduler, check_burn_in, check_explore_method
from lightning_pbt.algorithm.space import Domain, check_space_not_empty
from lightning_pbt.algorithm.space_config import space_from_config

__all__ = ["INITIAL_WEIGHTS", "REQUIRED", "PBTSettings"]

PREFIX = "PopulationBasedTraining: "
INITIAL_WEIGHTS = ("as_built", "per_member", "shared")  # see PBTSettings.initial_weights
REQUIRED = ("hyperparameters", "monitor")  # no default: the callback's positional arguments


def _hydra(kind: Any) -> dict[str, Any]:
    """A field's type in the Hydra schema, where its Python type is wider than OmegaConf accepts."""
    return {"hydra": kind}


@dataclass(kw_only=True)
class PBTSettings:
    """:class:`~lightning_pbt.PopulationBasedTraining`'s arguments, validated.

    Building one checks every argument that can be checked without a trainer, in a fixed order, and
    raises the first problem. ``space`` and ``exploit_rule`` are derived from the arguments.

    Attributes:
        hyperparameters: the search space, ``{name: Domain}`` or its config forms (``{type: loguniform,
            low: .., high: ..}``, see [`space_from_config`][lightning_pbt.algorithm.space_config.space_from_config]).
        monitor: the logged metric that scores a member (required).
        mode: ``"max"`` or ``"min"``.
        every_n_train_steps: the ready interval in optimizer steps.
        every_n_epochs: the ready interval in completed epochs.
        burn_in: no exploit before this global step.
        exploit: ``"truncation"``, ``"tournament"`` or ``"ttest"`` (or an ``ExploitRule``).
        quantile_fraction: for truncation, in (0, 0.5].
        resample_probability: chance that explore resamples instead of perturbing.
        perturbation_factors: factors a perturbed value is multiplied by.
        custom_explore: an explore function or its import path, ``"package.module.function"``.
        explore: ``"perturb"`` or ``"pb2"``.
        start_hyperparameters: values every member starts with.
        rejuvenate_patience: ready steps without improvement before fresh weights.
        rejuvenate_modules: the submodules a rejuvenation re-initialises (a name or a list of names).
        seed: the run's seed.
        dirpath: where ``lineage.jsonl`` goes.
        synchronous: ``False`` for asynchronous PBT.
        snapshot_every_n_train_steps: asynchronous only: also snapshot every this many optimizer steps
            after a ready step, so that a copy is at most this many steps old.
        wait_for_peers: asynchronous only: at a ready step, wait up to this fraction of the member's last
            ready interval (wall time, at least 50 ms) for the members that have not scored at its step yet,
            except stragglers (not scored at its previous ready step); then for those that scored at it to
            finish it.
        initial_weights: how members start: ``"as_built"`` (each keeps the weights its process built;
            members that start alike are reported once), ``"per_member"`` (each member's weights are
            re-initialised from its own seed, ``seed_everything``'s seed + member id, when its first fit
            starts: for models built before ``Trainer.fit``) or ``"shared"`` (identical starts are
            intended, e.g. fine-tuning one pretrained model: nothing is reported).
        verbose: print one line per ready step and the population's summary at the end of fit (population
            rank 0 only).
        space: the parsed search space (derived).
        exploit_rule: the exploit rule (derived).

    Raises:
        ValueError: the first bad argument, e.g. ``PopulationBasedTraining: mode must be 'min' or 'max'``.

    Examples:
        >>> settings = PBTSettings(hyperparameters={"lr": [0.1, 0.01]}, monitor="val_loss", mode="min")
        >>> settings.space, settings.exploit_rule
        ({'lr': Choice(values=(0.1, 0.01))}, TruncationSelection(quantile_fraction=0.25))
    """

    hyperparameters: Mapping[str, Domain | Mapping[str, Any] | Sequence[Any]] = field(metadata=_hydra(dict[str, Any]))
    monitor: str
    mode: str = "max"
    every_n_train_steps: int | None = None
    every_n_epochs: int | None = None
    burn_in: int = 0
    exploit: str | ExploitRule = field(default="truncation", metadata=_hydra(str))
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    perturbation_factors: Sequence[float] = field(default=(0.8, 1.2), metadata=_hydra(list[float]))
    custom_explore: Callable[..., Mapping[str, Any]] | str | None = field(default=None, metadata=_hydra(str | None))
    explore: str = "perturb"
    start_hyperparameters: Mapping[str, Any] | None = field(default=None, metadata=_hydra(dict[str, Any] | None))
    rejuvenate_patience: int | None = None
    rejuvenate_modules: Sequence[str] | str | None = field(default=None, metadata=_hydra(list[str] | None))
    seed: int = 0
    dirpath: str | os.PathLike | None = field(default=None, metadata=_hydra(str | None))
    synchronous: bool = True
    snapshot_every_n_train_steps: int | None = None
    wait_for_peers: float | None = None
    initial_weights: str = "as_built"
    verbose: bool = True
    space: dict[str, Domain] = field(init=False, repr=False)
    exploit_rule: ExploitRule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_scalars()
        self._check_rejuvenation()
        self.space = space_from_config(self.hyperparameters, prefix="hyperparameters.")
        with _prefixed():
            check_space_not_empty(self.space)
        with _prefixed():
            check_quantile_fraction(self.quantile_fraction)
        options = {"quantile_fraction": self.quantile_fraction} if self.exploit == "truncation" else {}
        self.exploit_rule = make_exploit_rule(self.exploit, **options)
        with _prefixed():
            check_explore_method(self.explore)
        if self.explore != "perturb" and self.custom_explore is not None:
            raise ValueError(
                f"{PREFIX}explore={self.explore!r} and custom_explore exclude each other; "
                "custom_explore replaces the perturb explore, so leave explore='perturb' to use it"
            )
        self.start_hyperparameters = dict(self.start_hyperparameters or {})
        self.dirpath = os.fspath(self.dirpath) if self.dirpath is not None else None

    def _check_wait_for_peers(self) -> None:
        value = self.wait_for_peers
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(
                f"{PREFIX}wait_for_peers must be a fraction of the ready interval in (0, 1] (or None: never "
                f"wait), got {value!r}"
            )
        if self.synchronous:
            raise ValueError(
                f"{PREFIX}wait_for_peers is for synchronous=False (in lockstep every member always waits for "
                "every other), got it with synchronous=True"
            )

    def _check_scalars(self) -> None:
        for name in ("synchronous", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{PREFIX}{name} must be True or False, got {getattr(self, name)!r}")
        if self.initial_weights not in INITIAL_WEIGHTS:
            raise ValueError(f"{PREFIX}initial_weights must be one of {INITIAL_WEIGHTS}, got {self.initial_weights!r}")
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"{PREFIX}monitor must be a metric name, got {self.monitor!r}")
        with _prefixed():
            check_mode(self.mode)
        for name in ("every_n_train_steps", "every_n_epochs", "snapshot_every_n_train_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{PREFIX}{name} must be a positive integer, got {value!r}")
        if self.snapshot_every_n_train_steps is not None and self.synchronous:
            raise ValueError(
                f"{PREFIX}snapshot_every_n_train_steps is for synchronous=False (in lockstep a copy is always "
                "the donor's state at the ready step), got it with synchronous=True"
            )
        self._check_wait_for_peers()
        if self.every_n_train_steps is not None and self.every_n_epochs is not None:
            raise ValueError(f"{PREFIX}set every_n_train_steps or every_n_epochs, not both")
        with _prefixed():
            check_burn_in(self.burn_in)

    def _check_rejuvenation(self) -> None:
        modules = self.rejuvenate_modules
        if isinstance(modules, str):
            modules = [modules]
        if modules is None:
            return
        self.rejuvenate_modules = modules = list(modules)
        if not modules or not all(isinstance(n, str) and n for n in modules):
            raise ValueError(
                f"{PREFIX}rejuvenate_modules must be None (every submodule) or a non-empty list "
                f"of submodule names as in named_modules(), e.g. ['head'], got {modules!r}"
            )
        if self.rejuvenate_patience is None:
            raise ValueError(
                f"{PREFIX}rejuvenate_modules needs rejuvenate_patience (without it no member is ever rejuvenated)"
            )

    def make_scheduler(self) -> PBTScheduler:
        """The PBT decision these settings describe (its explorer checks the explore arguments).

        Returns:
            A :class:`~lightning_pbt.algorithm.scheduler.PBTScheduler` over ``space``.
        """
        explorer = Explorer(self.space, self.perturbation_factors, self.resample_probability, self.custom_explore)
        return PBTScheduler(
            self.space,
            mode=self.mode,
            exploit=self.exploit_rule,
            explorer=explorer,
            burn_in=self.burn_in,
            rejuvenate_patience=self.rejuvenate_patience,
            seed=self.seed,
            explore=self.explore,
        )

    @classmethod
    def arguments(cls) -> list[dataclasses.Field]:
        """The fields that are the callback's arguments, in order (the derived ones left out)."""
        return [f for f in dataclasses.fields(cls) if f.init]


@contextmanager
def _prefixed() -> Iterator[None]:
    """A shared check's ``ValueError``, said by the callback: ``PopulationBasedTraining: <message>``."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"{PREFIX}{error}") from None
