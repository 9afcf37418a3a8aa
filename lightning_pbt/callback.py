"""``PopulationBasedTraining``: the Lightning callback that runs PBT across the members of a
:class:`~lightning_pbt.strategy.PopulationStrategy`.

Every ready step follows one path on every rank: hook -> gather scores -> population rank 0 decides
-> broadcast the decision -> move state -> apply. Each step is a fixed sequence of collectives that
every rank runs, whatever the outcome, so no rank can skip one.

Stopping: a member that stops early (``EarlyStopping``, ``max_time``, ``trainer.should_stop``) stops
training and keeps its weights; until every member has stopped it still takes part in ready steps,
can be a donor, and is never replaced. The run ends when the last member stops.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_pbt import transfer
from lightning_pbt.apply import apply_hyperparameters, check_applicable, reset_weights
from lightning_pbt.exploit import make_exploit_rule
from lightning_pbt.explore import Explorer
from lightning_pbt.lineage import LineageRecord, LineageWriter, read_lineage
from lightning_pbt.scheduler import EXPLORE_METHODS, MemberPlan, MemberSnapshot, PBTScheduler
from lightning_pbt.space import Domain, space_from_config

from ._lightning import Callback, TrainerFn, pl
from .strategy import PopulationStrategy

__all__ = ["PopulationBasedTraining"]

log = logging.getLogger(__name__)

# Columns of the per-rank row in the ready step's all-gather.
_SCORE, _STEP, _EPOCH, _MISSING, _DONE, _SKELETON, _SPECS = range(7)
_ROW = 7


class PopulationBasedTraining(Callback):
    """Population Based Training (Jaderberg et al. 2017) inside one Lightning job.

    Args:
        hyperparameters: the search space, ``{name: Domain}`` (or the config forms of
            :func:`lightning_pbt.space.space_from_config`). Names that are optimizer param-group keys
            go to the optimizers; others must be in ``module.hparams`` (see :mod:`lightning_pbt.apply`).
        monitor: the logged metric that scores a member (identical on a member's ranks: log it with
            ``sync_dist=True``).
        mode: ``"max"`` or ``"min"``.
        every_n_train_steps: a ready step at the first validation end at least this many optimizer
            steps after the previous one.
        every_n_epochs: a ready step at the validation end of every n-th epoch (default 1 when neither
            interval is given).
        burn_in: no exploit before this global step.
        exploit: ``"truncation"``, ``"tournament"`` or ``"ttest"`` (or an ``ExploitRule``).
        quantile_fraction: for truncation: the bottom fraction copies the top fraction, in (0, 0.5].
        resample_probability: chance that explore resamples a value instead of perturbing it.
        perturbation_factors: factors a perturbed value is multiplied by.
        custom_explore: a function (or its dotted import path) ``fn(hyperparameters, space, rng) -> dict``
            replacing the default explore.
        explore: ``"perturb"`` (perturbation factors / resampling) or ``"pb2"``: a time-varying GP bandit
            fitted on the population's history proposes the continuous values (Parker-Holder et al. 2020;
            see :mod:`lightning_pbt.pb2`); choices, and everything until it has enough data, are perturbed.
        start_hyperparameters: values every member starts with (others are sampled per member).
        rejuvenate_patience: re-initialise a member's weights after this many ready steps without
            improvement (``None``: never).
        seed: the run's seed; with the same seed and inputs, the same decisions.
        dirpath: where ``lineage.jsonl`` goes (default ``<default_root_dir>/pbt``).
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
        seed: int = 0,
        dirpath: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"PopulationBasedTraining: monitor must be a metric name, got {monitor!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"PopulationBasedTraining: mode must be 'min' or 'max', got {mode!r}")
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"PopulationBasedTraining: {name} must be a positive integer, got {value!r}")
        if every_n_train_steps is not None and every_n_epochs is not None:
            raise ValueError("PopulationBasedTraining: set every_n_train_steps or every_n_epochs, not both")
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"PopulationBasedTraining: burn_in must be an integer >= 0, got {burn_in!r}")
        self.space = space_from_config(hyperparameters, prefix="hyperparameters.")
        if not self.space:
            raise ValueError("PopulationBasedTraining: the search space (hyperparameters) is empty")
        self.monitor = monitor
        self.mode = mode
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs if every_n_train_steps is None else None
        if self.every_n_train_steps is None and self.every_n_epochs is None:
            self.every_n_epochs = 1
        self.start_hyperparameters = dict(start_hyperparameters or {})
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.seed = seed
        if not 0 < quantile_fraction <= 0.5:
            raise ValueError(
                f"PopulationBasedTraining: quantile_fraction must be in (0, 0.5], got {quantile_fraction!r}"
            )
        rule = (
            make_exploit_rule(exploit, quantile_fraction=quantile_fraction)
            if exploit == "truncation"
            else (make_exploit_rule(exploit))
        )
        if explore not in EXPLORE_METHODS:
            raise ValueError(f"PopulationBasedTraining: explore must be one of {EXPLORE_METHODS}, got {explore!r}")
        if explore != "perturb" and custom_explore is not None:
            raise ValueError(
                f"PopulationBasedTraining: explore={explore!r} and custom_explore exclude each other; "
                "custom_explore replaces the perturb explore, so leave explore='perturb' to use it"
            )
        self.explore = explore
        explorer = Explorer(self.space, perturbation_factors, resample_probability, custom_explore)
        self.scheduler = PBTScheduler(
            self.space,
            mode=mode,
            exploit=rule,
            explorer=explorer,
            burn_in=burn_in,
            rejuvenate_patience=rejuvenate_patience,
            seed=seed,
            explore=explore,
        )
        # Population status, identical on every rank after each ready step.
        self.population: dict[int, dict[str, Any]] = {}
        self.hyperparameters: dict[str, Any] = {}
        self.ready_count = 0
        self.last_ready_step = -1
        self._restored = False
        self._store_namespace = ""
        self._writer: LineageWriter | None = None
        self._strategy: PopulationStrategy | None = None

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
        if not isinstance(trainer.strategy, PopulationStrategy):
            raise TypeError(
                "PopulationBasedTraining needs Trainer(strategy=PopulationStrategy(...)), got "
                f"{type(trainer.strategy).__name__}"
            )
        self._strategy = trainer.strategy

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_applicable(self.space, trainer.optimizers, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = self._require_strategy()
        self._store_namespace = f"pbt/{strategy.fit_generation}"
        if not self._restored:
            self.population = {
                member: {
                    "hyperparameters": self.scheduler.initial_hyperparameters(member, self.start_hyperparameters),
                    "score": None,
                    "history": [],
                    "parent": member,
                    "done": False,
                }
                for member in range(strategy.num_members)
            }
            self.hyperparameters = dict(self.population[strategy.member_id]["hyperparameters"])
        self._apply(trainer, pl_module, self.hyperparameters)
        # Population rank 0 owns the lineage; a problem with it (corrupt, from another run) is
        # broadcast so that every rank raises the same error instead of waiting for rank 0.
        error = None
        if strategy.world_rank == 0:
            try:
                self._open_lineage(trainer)
            except (OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        assert strategy.population is not None
        error = strategy.population.broadcast_json(error, root=0)
        if error:
            raise RuntimeError(f"PopulationBasedTraining: cannot continue the lineage: {error}")

    def _open_lineage(self, trainer: pl.Trainer) -> None:
        path = self.lineage_path
        if self._restored and os.path.exists(path):
            self._check_lineage_is_ours(path)
            LineageWriter.truncate_after(path, self.last_ready_step)
            self._writer = LineageWriter(path)
            return
        if os.path.exists(path):  # a fresh run: keep the older lineage, but not in the way
            index = 1
            while os.path.exists(f"{path}.{index}"):
                index += 1
            os.replace(path, f"{path}.{index}")
        self._writer = LineageWriter(path)
        self._writer.write(
            LineageRecord(
                step=trainer.global_step,
                epoch=trainer.current_epoch,
                member=member,
                score=None,
                event="init",
                parent=member,
                hyperparameters=dict(status["hyperparameters"]),
                extra={"mode": self.mode, "monitor": self.monitor},
            )
            for member, status in sorted(self.population.items())
        )

    def _check_lineage_is_ours(self, path: str) -> None:
        """A resumed run appends only to the lineage of the same run (same members, seed and space)."""
        inits = {record.member: record.hyperparameters for record in read_lineage(path) if record.event == "init"}
        expected = {
            member: self.scheduler.initial_hyperparameters(member, self.start_hyperparameters)
            for member in self.population
        }
        if inits != expected:
            raise ValueError(
                f"{path} belongs to another run: its init lines ({len(inits)} members) do not match this run's "
                f"seed, search space and population ({len(expected)} members); move it away or set "
                "PopulationBasedTraining(dirpath=...) to a fresh folder"
            )

    # -- ready steps -----------------------------------------------------------------------------
    def _is_ready(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return False
        if trainer.global_step == self.last_ready_step:  # e.g. several validations in one step
            return False
        if self.every_n_train_steps is not None:
            since = trainer.global_step - max(self.last_ready_step, 0)
            return since >= self.every_n_train_steps
        assert self.every_n_epochs is not None
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 and trainer.is_last_batch

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._is_ready(trainer):
            self._ready_step(trainer, pl_module, done=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """This member has stopped: serve ready steps until every member has."""
        strategy = self._require_strategy()
        assert strategy.population is not None
        store = strategy.population.store
        done_key = f"{self._store_namespace}/done"
        store.add(done_key, 1)
        while True:
            key = self._ready_key()
            if store.check([key]):
                self._ready_step(trainer, pl_module, done=True)
                continue
            if store.add(done_key, 0) >= strategy.population.size:
                break
            reason = strategy.population.abort_reason()
            if reason is not None:
                raise RuntimeError(f"PopulationBasedTraining: another rank failed: {reason}")
            time.sleep(0.05)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _ready_key(self) -> str:
        return f"{self._store_namespace}/ready/{self.ready_count}"

    def _score(self, trainer: pl.Trainer) -> tuple[float, bool]:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return math.nan, True
        return float(value.item() if isinstance(value, torch.Tensor) else value), False

    def _ready_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, done: bool) -> None:
        strategy = self._require_strategy()
        population = strategy.population
        topology = strategy.topology
        assert population is not None and topology is not None
        started = time.perf_counter()
        if not done:
            population.store.set(self._ready_key(), "1")
        score, missing = self._score(trainer)
        flat = transfer.flatten_state(self._training_state(trainer))
        row = torch.zeros(_ROW, dtype=torch.float64)
        row[_SCORE], row[_STEP], row[_EPOCH] = score, trainer.global_step, trainer.current_epoch
        row[_MISSING], row[_DONE], row[_SKELETON] = float(missing), float(done), len(flat.skeleton)
        row[_SPECS] = transfer.spec_hash(flat.tensors)
        table = population.all_gather(row).cpu()
        gathered = time.perf_counter()

        decision: Any = None
        if topology.world_rank == 0:
            try:
                decision = self._decide(table, topology, trainer)
            except Exception as error:  # broadcast, so that no rank waits for a decision that never comes
                decision = {
                    "error": f"PopulationBasedTraining: the decision failed on population rank 0: "
                    f"{type(error).__name__}: {error}"
                }
        decision = population.broadcast_json(decision, root=0)
        decided = time.perf_counter()
        if decision.get("error"):
            raise RuntimeError(decision["error"])

        plans = {int(member): MemberPlan.from_dict(plan) for member, plan in decision["plans"].items()}
        self._transfer_states(trainer, plans, table, flat, topology)
        transferred = time.perf_counter()

        self.scheduler.load_state_dict(decision["scheduler"])
        for member, plan in plans.items():
            status = self.population[member]
            status.update(
                hyperparameters=dict(plan.hyperparameters),
                parent=plan.parent,
                score=decision["scores"][str(member)],
                done=bool(decision["done"][str(member)]),
            )
            status["history"] = decision["histories"][str(member)]
        own = plans[topology.member_id]
        if own.event == "rejuvenate":
            reset_weights(
                pl_module,
                trainer.optimizers,
                seed=self.seed * 1_000_003 + topology.member_id + 7919 * trainer.global_step,
            )
        if own.event != "keep" or own.hyperparameters != self.hyperparameters:
            self.hyperparameters = dict(own.hyperparameters)
            self._apply(trainer, pl_module, self.hyperparameters)
        self.ready_count += 1
        self.last_ready_step = int(decision["step"])
        timing = {
            "gather": gathered - started,
            "decide": decided - gathered,
            "transfer": transferred - decided,
        }
        if self._writer is not None:
            self._write_lineage(decision, plans, timing)
        self._log_status(trainer, topology.member_id, decision, timing)

    def _decide(self, table: torch.Tensor, topology: Any, trainer: pl.Trainer) -> dict[str, Any]:
        """Population rank 0 only: check the gathered rows and run the scheduler."""
        leaders = {member: table[topology.world_rank_of(member, 0)] for member in range(topology.num_members)}
        active = {member: row for member, row in leaders.items() if not row[_DONE]}
        missing = [member for member, row in active.items() if row[_MISSING]]
        if missing:
            return {
                "error": (
                    f"PopulationBasedTraining: the monitored metric {self.monitor!r} was not logged by member(s) "
                    f"{missing} at this ready step; available metrics: {sorted(trainer.callback_metrics)}. Log it "
                    f"with self.log({self.monitor!r}, ..., sync_dist=True) in validation_step"
                )
            }
        steps = {int(row[_STEP]) for row in active.values()}
        if len(steps) > 1:
            return {
                "error": (
                    "PopulationBasedTraining: members reached this ready step at different global steps "
                    f"({ {m: int(r[_STEP]) for m, r in active.items()} }); every member must use the same "
                    "Trainer limits, data size and validation interval"
                )
            }
        if active and not any(math.isfinite(float(row[_SCORE])) for row in active.values()):
            return {
                "error": (
                    f"PopulationBasedTraining: every training member's {self.monitor!r} is NaN or infinite at this "
                    "ready step, so there is no member to copy; lower the learning-rate range or add gradient "
                    "clipping (Trainer(gradient_clip_val=...))"
                )
            }
        step = steps.pop() if steps else max(int(row[_STEP]) for row in leaders.values())
        snapshots = []
        histories: dict[str, list[float]] = {}
        scores: dict[str, float | None] = {}
        for member, row in leaders.items():
            status = self.population[member]
            score = float(row[_SCORE])
            finite = score is not None and math.isfinite(score)
            history = list(status["history"]) + ([score] if finite and not row[_DONE] else [])
            history = history[-32:]
            histories[str(member)] = history
            scores[str(member)] = score if finite else None
            snapshots.append(
                MemberSnapshot(
                    member=member,
                    score=score if finite else None,
                    hyperparameters=status["hyperparameters"],
                    history=tuple(history),
                    can_exploit=not bool(row[_DONE]),
                )
            )
        plans = self.scheduler.plan(step, snapshots)
        # A member's history describes the weights it holds: a copy inherits the donor's, fresh weights none.
        for member, plan in plans.items():
            if plan.event == "exploit":
                histories[str(member)] = list(histories[str(plan.parent)])
            elif plan.event == "rejuvenate":
                histories[str(member)] = []
        return {
            "step": step,
            "epoch": int(max(int(row[_EPOCH]) for row in leaders.values())),
            "plans": {str(member): plan.to_dict() for member, plan in plans.items()},
            "scores": scores,
            "histories": histories,
            "done": {str(member): bool(row[_DONE]) for member, row in leaders.items()},
            "scheduler": self.scheduler.state_dict(),
        }

    # -- state transfer --------------------------------------------------------------------------
    @staticmethod
    def _training_state(trainer: pl.Trainer) -> dict[str, Any]:
        return {
            "model": trainer.lightning_module.state_dict(),
            "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
            "lr_schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
            "precision": trainer.precision_plugin.state_dict(),
        }

    def _transfer_states(
        self,
        trainer: pl.Trainer,
        plans: Mapping[int, MemberPlan],
        table: torch.Tensor,
        flat: transfer.FlatState,
        topology: Any,
    ) -> None:
        """Rank j of every donor sends to rank j of each of its losers; all of one step at once."""
        population = self._require_strategy().population
        assert population is not None
        j, me = topology.member_rank, topology.world_rank
        exploits = [(member, plan.parent) for member, plan in sorted(plans.items()) if plan.event == "exploit"]

        def same_specs(peer: int) -> bool:
            return bool(table[peer, _SPECS] == table[me, _SPECS])

        send_to = [
            (peer, same_specs(peer))
            for peer in (topology.world_rank_of(loser, j) for loser, donor in exploits if donor == topology.member_id)
        ]
        donor_rank = next(
            (topology.world_rank_of(donor, j) for loser, donor in exploits if loser == topology.member_id), None
        )
        receive_from = None
        if donor_rank is not None:
            receive_from = (donor_rank, int(table[donor_rank, _SKELETON]), same_specs(donor_rank))
        if not send_to and receive_from is None:
            return
        received = transfer.move_states(population, flat, send_to, receive_from, trainer.strategy.root_device)
        if received is not None:
            state = transfer.unflatten_state(received.nest, received.tensors)
            self._load_training_state(trainer, state, model_in_place=received.in_place)

    @staticmethod
    def _load_training_state(trainer: pl.Trainer, state: Mapping[str, Any], model_in_place: bool = False) -> None:
        if not model_in_place:  # else the weights already arrived in the module's own tensors
            trainer.lightning_module.load_state_dict(state["model"])
        for optimizer, optimizer_state in zip(trainer.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
        for config, scheduler_state in zip(trainer.lr_scheduler_configs, state["lr_schedulers"], strict=True):
            config.scheduler.load_state_dict(scheduler_state)
        if state["precision"]:
            trainer.precision_plugin.load_state_dict(state["precision"])

    # -- applying and reporting ------------------------------------------------------------------
    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: Mapping[str, Any]) -> None:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        apply_hyperparameters(values, trainer.optimizers, schedulers, pl_module)

    def _write_lineage(
        self, decision: Mapping[str, Any], plans: Mapping[int, MemberPlan], timing: Mapping[str, float]
    ) -> None:
        assert self._writer is not None
        self._writer.write(
            LineageRecord(
                step=int(decision["step"]),
                epoch=int(decision["epoch"]),
                member=member,
                score=decision["scores"][str(member)],
                event=plan.event,
                parent=plan.parent,
                hyperparameters=dict(plan.hyperparameters),
                mutations=list(plan.mutations),
                timing=dict(timing),
                extra={"done": bool(decision["done"][str(member)])},
            )
            for member, plan in sorted(plans.items())
        )

    def _log_status(
        self, trainer: pl.Trainer, member: int, decision: Mapping[str, Any], timing: Mapping[str, float]
    ) -> None:
        scored = {int(m): s for m, s in decision["scores"].items() if s is not None}
        metrics: dict[str, float] = {f"pbt/time_{name}": value for name, value in timing.items()}
        if scored:
            best = max(scored, key=lambda m: (scored[m] if self.mode == "max" else -scored[m], -m))
            metrics["pbt/best_member"] = float(best)
            metrics["pbt/best_score"] = float(scored[best])
            for name, value in self.population[best]["hyperparameters"].items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    metrics[f"pbt/best_{name}"] = float(value)
        for name, value in self.hyperparameters.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"pbt/{name}"] = float(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        plan = decision["plans"][str(member)]
        if plan["event"] != "keep":
            log.info(
                "PBT step %s: member %d %s member %s; %s",
                decision["step"],
                member,
                plan["event"],
                plan["parent"],
                "; ".join(plan["mutations"]),
            )

    # -- checkpointing ---------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "member_id": self._strategy.member_id if self._strategy and self._strategy.topology else None,
            "hyperparameters": dict(self.hyperparameters),
            "population": {str(member): dict(status) for member, status in self.population.items()},
            "scheduler": self.scheduler.state_dict(),
            "ready_count": self.ready_count,
            "last_ready_step": self.last_ready_step,
            "space": sorted(self.space),
            "seed": self.seed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if sorted(state_dict.get("space", [])) != sorted(self.space) or state_dict.get("seed") != self.seed:
            raise ValueError(
                "PopulationBasedTraining: the checkpoint comes from a run with another search space or seed "
                f"(checkpoint: space={state_dict.get('space')}, seed={state_dict.get('seed')}; this run: "
                f"space={sorted(self.space)}, seed={self.seed})"
            )
        strategy = self._strategy
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
        self.hyperparameters = dict(state_dict["hyperparameters"])
        self.population = {int(member): dict(status) for member, status in state_dict["population"].items()}
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.ready_count = int(state_dict["ready_count"])
        self.last_ready_step = int(state_dict["last_ready_step"])
        self._restored = True
