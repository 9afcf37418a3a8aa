"""``PopulationBasedTraining``: the Lightning callback that runs PBT across the members of a
:class:`~lightning_pbt.plugin.strategy.PopulationStrategy`.

Lightning glue only: hooks -> checks -> the ready-step protocol (:mod:`lightning_pbt.distributed.ready_steps`,
synchronous or asynchronous) -> report. The protocol decides and moves state; this module knows where
the trainer keeps that state and how to put hyperparameters into it.

The end of fit. A member's last ready step (no training follows it: ``max_steps``/``max_epochs`` reached
or the trainer stopping) scores it and lets it donate, but it keeps its weights and the values it
trained with, so the final lineage line, checkpoint and ``hparams`` hold what the member trained with.
When fit ends, every rank learns every member's result (``results``, best first, ``best_member``,
``best_score``, ``best_checkpoint_path``); population rank 0 prints a summary once and writes
``results.json`` next to the lineage (``lightning_pbt.results``, that is
:mod:`lightning_pbt.algorithm.results`, reads a finished run).

Stopping: a member that stops early (``EarlyStopping``, ``max_time``, ``trainer.should_stop``) stops
training and keeps its weights; until every member has stopped it can still be a donor and is never
replaced. The run ends when the last member stops.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from typing_extensions import override

from lightning_pbt.algorithm.results import PopulationResults
from lightning_pbt.algorithm.scheduler import PBTScheduler
from lightning_pbt.algorithm.settings import PBTSettings
from lightning_pbt.algorithm.space import Domain
from lightning_pbt.distributed.optimizer_layout import optimizer_layout
from lightning_pbt.distributed.ready_steps import protocol_class
from lightning_pbt.distributed.ready_steps.base import Observation, PopulationBook, ReadySteps
from lightning_pbt.plugin import console, fit_edges
from lightning_pbt.plugin.apply import (
    GroupRatios,
    capture_group_ratios,
    check_applicable,
    check_module_names,
)
from lightning_pbt.plugin.turns import random_state, set_random_state

from ._lightning import Callback, TrainerFn, pl
from .population_view import PopulationView
from .readiness import epochs_done, is_ready, monitored_score
from .strategy import PopulationStrategy
from .trainer_member import TrainerMember, weight_averages

__all__ = ["PopulationBasedTraining"]

log = logging.getLogger(__name__)


class PopulationBasedTraining(Callback, PopulationView):
    """Population Based Training (Jaderberg et al. 2017) inside one Lightning job.

    Args:
        hyperparameters: the search space, ``{name: Domain}`` (or the config forms of
            :func:`lightning_pbt.algorithm.space_config.space_from_config`). Names that are optimizer param-group keys
            go to the optimizers; others must be in ``module.hparams`` (see :mod:`lightning_pbt.plugin.apply`).
        monitor: the logged metric that scores a member (identical on a member's ranks: log it with
            ``sync_dist=True``).
        mode: ``"max"`` or ``"min"``.
        synchronous: ``True`` (default): members meet at every ready step at the same global step, one
            decision for all, deterministic under a seed. ``False``: each member runs its ready steps
            at its own pace and never waits for another (members may differ in speed and step counts).
        snapshot_every_n_train_steps: with ``synchronous=False``, also snapshot every this many optimizer
            steps after a ready step: a copy is then at most that old, not up to a ready interval (``None``:
            at ready steps only). Each costs a device-to-host copy; try a quarter of the interval.
        wait_for_peers: with ``synchronous=False``, at a ready step wait up to this fraction of the last ready
            interval for the peers of similar speed that have not scored at this step (``None``: never; try 1.0).
        every_n_train_steps: a ready step at the first validation end at least this many optimizer
            steps after the previous one.
        every_n_epochs: a ready step at the first validation end at least this many completed epochs
            after the previous one; an epoch completes at its last validation (with
            ``val_check_interval=0.5``, the second of the epoch's two). With neither interval, a ready step
            happens at every validation end.
        burn_in: no exploit before this global step.
        exploit: ``"truncation"``, ``"tournament"`` or ``"ttest"`` (or an ``ExploitRule``).
        quantile_fraction: for truncation: the bottom fraction copies the top fraction, in (0, 0.5].
        resample_probability: chance that explore resamples a value instead of perturbing it.
        perturbation_factors: factors a perturbed value is multiplied by.
        custom_explore: a function (or its dotted import path) ``fn(hyperparameters, space, rng) -> dict``
            replacing the default explore.
        explore: ``"perturb"`` (perturbation factors / resampling) or ``"pb2"``: a time-varying GP bandit
            fitted on the population's history proposes the continuous values (Parker-Holder et al. 2020;
            see :mod:`lightning_pbt.algorithm.pb2`); choices, and everything until it has enough data, are perturbed.
        start_hyperparameters: values every member starts with (others are sampled per member).
        rejuvenate_patience: re-initialise a member's weights after this many ready steps without
            improvement (``None``: never). Its hyperparameters, step count and LR schedulers stay as
            they are.
        rejuvenate_modules: re-initialise only these submodules (names as in ``named_modules()``, e.g.
            ``["head"]``, ``["encoder.layer3"]``) with their children; the others keep their weights and
            optimizer state (``None``: every submodule, and all optimizer state).
        seed: the run's seed; with the same seed and inputs, the same decisions (synchronous mode).
        dirpath: where ``lineage.jsonl`` and ``results.json`` go (default ``<default_root_dir>/pbt``).
        initial_weights: ``"as_built"`` (default): each member keeps the weights its process built, and
            members that start alike are reported once with the fix; ``"per_member"``: re-initialise each
            member's weights from its own seed (``seed_everything``'s seed + member id, the seed the strategy
            gives ``configure_model``) when its first fit starts, for models built before ``Trainer.fit``;
            ``"shared"``: identical starts are intended (fine-tuning one pretrained model).
        verbose: print one line per ready step and the population's summary at the end of fit (once, on
            population rank 0).

    After fit, on every rank: :attr:`results`, :attr:`best_member`, :attr:`best_score`,
    :attr:`best_checkpoint_path` (see the module docstring).


    Raises:
        ValueError: at construction, on every rank: a malformed search space (naming the key), an empty
            one, a bad ``mode``, interval, ``burn_in``, ``quantile_fraction``, explore or exploit
            setting, both intervals at once, ``explore="pb2"`` with ``custom_explore``, ``rejuvenate_modules``
            without ``rejuvenate_patience``, ``wait_for_peers`` outside (0, 1], or
            ``snapshot_every_n_train_steps`` or ``wait_for_peers`` with ``synchronous=True``. At
            fit start, on every rank and before any collective: a hyperparameter that nothing applies, or an
            unknown ``rejuvenate_modules`` name.
        TypeError: at setup, a trainer whose strategy is not a ``PopulationStrategy``.

    Examples:
        ```python
        from lightning_pbt import PopulationBasedTraining, PopulationStrategy
        from lightning_pbt.algorithm.space import LogUniform

        pbt = PopulationBasedTraining(
            hyperparameters={"lr": LogUniform(1e-4, 1e-1), "weight_decay": LogUniform(1e-6, 1e-2)},
            monitor="val_loss", mode="min", every_n_epochs=2, exploit="tournament",
        )
        trainer = pl.Trainer(devices=8, strategy=PopulationStrategy(), callbacks=[pbt])
        ```
    """

    def __init__(
        self,
        hyperparameters: Mapping[str, Domain | Mapping[str, Any] | Sequence[Any]],
        monitor: str,
        mode: str = "max",
        *,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        burn_in: int = 0,
        exploit: str | Any = "truncation",
        quantile_fraction: float = 0.25,
        resample_probability: float = 0.25,
        perturbation_factors: Sequence[float] = (0.8, 1.2),
        custom_explore: Callable[..., Mapping[str, Any]] | str | None = None,
        explore: str = "perturb",
        start_hyperparameters: Mapping[str, Any] | None = None,
        rejuvenate_patience: int | None = None,
        rejuvenate_modules: Sequence[str] | str | None = None,
        seed: int = 0,
        dirpath: str | os.PathLike | None = None,
        synchronous: bool = True,
        snapshot_every_n_train_steps: int | None = None,
        wait_for_peers: float | None = None,
        initial_weights: str = "as_built",
        verbose: bool = True,
    ) -> None:
        given = locals()  # the arguments, by the names PBTSettings defines (a unit test keeps them equal)
        super().__init__()
        settings = PBTSettings(**{argument.name: given[argument.name] for argument in PBTSettings.arguments()})
        self.settings = settings
        self.space = settings.space
        self.rejuvenate_modules: list[str] | None = settings.rejuvenate_modules  # type: ignore[assignment]
        self.monitor, self.mode, self.seed = settings.monitor, settings.mode, settings.seed
        self.explore, self.synchronous, self.dirpath = settings.explore, settings.synchronous, settings.dirpath
        self.every_n_train_steps, self.every_n_epochs = settings.every_n_train_steps, settings.every_n_epochs
        self.start_hyperparameters = dict(settings.start_hyperparameters or {})
        self.scheduler = settings.make_scheduler()
        self.book = PopulationBook()
        self._restored = False
        self._strategy: PopulationStrategy | None = None
        self._protocol: ReadySteps | None = None
        self._validations = 0  # this fit's validation ends and whether they produced the monitor
        self._monitor_seen = False
        self._ready_at_start = 0
        self._group_ratios: GroupRatios | None = None
        self.initial_weights, self.verbose = settings.initial_weights, settings.verbose
        self._reinitialized = False
        self._fresh_start = True
        self._results: PopulationResults | None = None
        self._hparams_warned = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    @property
    def lineage_path(self) -> str:
        root = self.dirpath or os.path.join(self._require_strategy().run_dir or ".", "pbt")
        return os.path.join(root, "lineage.jsonl")

    def _require_strategy(self) -> PopulationStrategy:
        if self._strategy is None:
            raise RuntimeError("PopulationBasedTraining is not attached to a running PopulationStrategy yet")
        return self._strategy

    # -- start -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._strategy = _supported_strategy(trainer.strategy, self.synchronous)
        if stage == "fit":
            self._strategy.before_finishing(lambda: self._take_part_if_training_was_skipped(trainer, pl_module))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._protocol = None
        self._results = None
        check_applicable(self.space, trainer.optimizers, pl_module)
        if self.rejuvenate_modules is not None:
            check_module_names(pl_module, self.rejuvenate_modules)
        # A resumed member has its weights from its checkpoint (restored before this hook): never reset them.
        self._fresh_start = trainer.ckpt_path is None and not self._restored
        if self.initial_weights == "per_member" and self._fresh_start and not self._reinitialized:
            fit_edges.reinitialize_member(pl_module, trainer.optimizers, self._require_strategy().member_seed)
            self._reinitialized = True
        # Before any value is applied and before a resume restores optimizer state: configure_optimizers' ratios.
        self._group_ratios = capture_group_ratios(trainer.optimizers)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = self._require_strategy()
        assert strategy.population is not None and strategy.topology is not None
        if not self._restored:
            self.book.population = initial_population(self.scheduler, strategy.num_members, self.start_hyperparameters)
            self.book.hyperparameters = dict(self.book.population[strategy.member_id]["hyperparameters"])
            if not self.synchronous:  # each member decides alone: its own random stream
                self.scheduler.use_member_stream(strategy.member_id)
        self._check_identical_starts(strategy, pl_module)
        member = TrainerMember(
            trainer, pl_module, lambda: self._group_ratios, self.rejuvenate_modules,
            on_apply=lambda values: self._log_hyperparameters(trainer, values),
        )  # fmt: skip
        member.apply(self.book.hyperparameters)
        self._validations, self._monitor_seen, self._ready_at_start = 0, False, self.book.ready_count
        self._protocol = protocol_class(self.synchronous)(
            population=strategy.population, topology=strategy.topology, namespace=f"pbt/{strategy.fit_generation}",
            scheduler=self.scheduler, book=self.book, member=member, mode=self.mode, monitor=self.monitor,
            seed=self.seed, snapshot_every=self.settings.snapshot_every_n_train_steps,
            wait_for_peers=self.settings.wait_for_peers, turns=strategy.lane.turns,
            announce=(lambda text: console.say(trainer, text)) if self.verbose and strategy.world_rank == 0 else None,
        )  # fmt: skip
        self._protocol.start(
            self.lineage_path,
            restored=self._restored,
            layout=optimizer_layout(trainer.optimizers),
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            start_values=self.start_hyperparameters,
            init_extra={"mode": self.mode, "monitor": self.monitor, "synchronous": self.synchronous},
            averages=[key for key, _ in weight_averages(trainer.callbacks)],
        )

    # -- ready steps -----------------------------------------------------------------------------
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        if self._protocol is not None:
            self._protocol.between_ready_steps(trainer.global_step)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._validations += 1
        score, missing = monitored_score(trainer, self.monitor)
        self._monitor_seen |= not missing
        if not is_ready(trainer, self.book, self.every_n_train_steps, self.every_n_epochs):
            return
        assert self._protocol is not None
        done_epochs = epochs_done(trainer)
        last = fit_edges.training_ends_here(
            trainer.global_step, trainer.max_steps, done_epochs, trainer.max_epochs, trainer.should_stop,
            trainer.fit_loop.min_steps, trainer.fit_loop.min_epochs,
        )  # fmt: skip
        logged = tuple(sorted(trainer.callback_metrics)) if missing else ()
        observation = Observation(score, missing, trainer.global_step, trainer.current_epoch, last=last, logged=logged)
        result = self._protocol.step(observation)
        self.book.last_ready_epochs = done_epochs
        self._log_status(trainer, result, last)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """This member has stopped: serve the population until every member has."""
        self._finish(trainer)
        self._warn_if_idle(trainer)

    def _take_part_if_training_was_skipped(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A member whose training loop did not run (it resumed at ``max_steps``, ``limit_train_batches=0``)
        gets neither ``on_train_start`` nor ``on_train_end``; it still takes part, starting and stopping at
        once as a donor, so that the others do not wait for it. Run by the strategy before its teardown."""
        if self._protocol is None:
            self._start(trainer, pl_module)
            self._finish(trainer)

    def _finish(self, trainer: pl.Trainer) -> None:
        assert self._protocol is not None
        pool = self._lane_pool()  # before finish: every member a process hosts is in it once all have stopped
        pool.setdefault("hosted", {})[self._require_strategy().member_id] = (trainer, self.book)
        try:
            self._protocol.finish()
        finally:
            self._protocol.close()
        self._gather_results(trainer, pool)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._protocol is not None:
            self._protocol.close()

    # -- checkpointing ---------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._protocol is not None:
            self._protocol.flush()  # the lineage holds the ready steps a checkpoint claims (see flush)
        book = self.book
        return {
            "member_id": self._strategy.member_id if self._strategy and self._strategy.topology else None,
            "hyperparameters": dict(book.hyperparameters),
            "population": {str(member): dict(status) for member, status in book.population.items()},
            "scheduler": self.scheduler.state_dict(),
            "ready_count": book.ready_count,
            "last_ready_step": book.last_ready_step,
            "last_ready_epochs": book.last_ready_epochs,
            "space": sorted(self.space),
            "seed": self.seed,
            "synchronous": self.synchronous,
            # the member's RNG as it trains on: a resumed member draws the dropout masks it would have drawn
            "random": random_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_checkpoint_state(state_dict, self.space, self.seed, self.synchronous, self._strategy)
        self.book = PopulationBook(
            population={int(member): dict(status) for member, status in state_dict["population"].items()},
            hyperparameters=dict(state_dict["hyperparameters"]),
            ready_count=int(state_dict["ready_count"]),
            last_ready_step=int(state_dict["last_ready_step"]),
            last_ready_epochs=int(state_dict.get("last_ready_epochs", 0)),
        )
        self.scheduler.load_state_dict(state_dict["scheduler"])
        if state_dict.get("random") is not None:  # restored after configure_model, before the data is iterated
            set_random_state(state_dict["random"])
        self._restored = True


def _supported_strategy(strategy: Any, synchronous: bool) -> PopulationStrategy:
    """The trainer's strategy, if the callback can run on it (checked on every rank before any collective)."""
    if not isinstance(strategy, PopulationStrategy):
        raise TypeError(
            f"PopulationBasedTraining needs Trainer(strategy=PopulationStrategy(...)), got {type(strategy).__name__}"
        )
    if strategy.members_per_process > 1 and not synchronous:
        raise ValueError(
            "PopulationBasedTraining(synchronous=False) does not support PopulationStrategy(members_per_process="
            f"{strategy.members_per_process}) yet: members that take turns meet at lockstep ready steps only (a "
            "parked member cannot serve its snapshot while another trains); use synchronous=True or "
            "members_per_process=1"
        )
    return strategy


def _check_checkpoint_state(
    state_dict: Mapping[str, Any],
    space: Mapping[str, Any],
    seed: int,
    synchronous: bool,
    strategy: PopulationStrategy | None,
) -> None:
    """Before anything loads: the checkpoint comes from a run like this one, and from this member."""
    if sorted(state_dict.get("space", [])) != sorted(space) or state_dict.get("seed") != seed:
        raise ValueError(
            "PopulationBasedTraining: the checkpoint comes from a run with another search space or seed "
            f"(checkpoint: space={state_dict.get('space')}, seed={state_dict.get('seed')}; this run: "
            f"space={sorted(space)}, seed={seed})"
        )
    if state_dict.get("synchronous", True) != synchronous:
        raise ValueError(
            f"PopulationBasedTraining: the checkpoint comes from a run with synchronous="
            f"{state_dict.get('synchronous', True)}, this run has synchronous={synchronous}"
        )
    if strategy is not None and strategy.topology is not None:
        if state_dict.get("member_id") not in (None, strategy.member_id):
            raise ValueError(
                f"PopulationBasedTraining: member {strategy.member_id} was given the checkpoint of member "
                f"{state_dict.get('member_id')}; resume each member from its own member_<id>/ checkpoint"
            )
        if len(state_dict["population"]) != strategy.num_members:
            raise ValueError(
                f"PopulationBasedTraining: the checkpoint's population has {len(state_dict['population'])} "
                f"members, this run has {strategy.num_members}"
            )


def initial_population(
    scheduler: PBTScheduler, num_members: int, start_hyperparameters: Mapping[str, Any]
) -> dict[int, dict[str, Any]]:
    """Every member's status before its first ready step: sampled (or given) values, no score yet.

    Args:
        scheduler: samples each member's starting values.
        num_members: the population size.
        start_hyperparameters: values every member starts with.
    """
    return {
        member: {
            "hyperparameters": scheduler.initial_hyperparameters(member, start_hyperparameters),
            "score": None,
            "history": [],
            "parent": member,
            "done": False,
        }
        for member in range(num_members)
    }
