"""Ready steps: how members are scored, copy each other and explore, in lockstep or at their own pace.

Two implementations of one small interface (:class:`ReadySteps`: ``start``, ``step``, ``finish``,
``close``), chosen by ``PopulationBasedTraining(synchronous=...)``:

- :class:`SynchronousReadySteps` (default, deterministic): every member reaches each ready step at the
  same global step; one all-gather of scores, population rank 0 decides for everyone, the decision is
  broadcast, donors send to losers. Every rank runs the same collectives whatever the outcome.
- :class:`AsynchronousReadySteps`: no member waits for another (but for a bounded ``wait_for_peers``). At
  its own ready step a member snapshots its state into host memory (served in the background, see
  :mod:`lightning_pbt.distributed.serving`), publishes its score in the launch's store, decides for itself from the
  latest published state of the population (lockstep's plan when it sees the population in step, see
  :mod:`lightning_pbt.algorithm.comparable`), and, to copy, fetches the donor's latest snapshot while the donor
  trains on.

Neither knows Lightning: the callback hands in a :class:`LocalMember` (the trainer's state, how to load
it, apply hyperparameters, re-initialise weights) and one :class:`Observation` per ready step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, Protocol

import torch

from lightning_pbt.algorithm.comparable import Published, decide_alone
from lightning_pbt.algorithm.lineage import LineageRecord, LineageWriter, read_lineage, truncate_members_after
from lightning_pbt.algorithm.scheduler import MemberPlan, MemberSnapshot, PBTScheduler
from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed import transfer
from lightning_pbt.distributed.collectives import PopulationGroup
from lightning_pbt.distributed.optimizer_layout import describe_layout_mismatch
from lightning_pbt.distributed.serving import (
    LineageDrain,
    SnapshotServer,
    push_lineage,
    request_snapshot,
    wait_until_written,
)

__all__ = [
    "AsynchronousReadySteps",
    "LocalMember",
    "Observation",
    "PopulationBook",
    "ReadyStepResult",
    "ReadySteps",
    "SynchronousReadySteps",
    "protocol_class",
]

log = logging.getLogger(__name__)

_HISTORY = 32  # scores kept per member (the t-test and rejuvenation read them)
# Columns of the per-rank row in the synchronous ready step's all-gather.
_SCORE, _STEP, _EPOCH, _MISSING, _DONE = range(5)


@dataclass(frozen=True)
class Observation:
    """What this rank brings to a ready step.

    Attributes:
        score: the monitored metric as logged (NaN when missing).
        missing: whether validation did not log the monitored metric.
        step: the member's global step.
        epoch: the member's epoch.
        done: whether the member has stopped training (it still takes part, as a possible donor).
    """

    score: float
    missing: bool
    step: int
    epoch: int
    done: bool = False


class LocalMember(Protocol):
    """The training state of this rank, as the trainer holds it (implemented by the callback)."""

    @property
    def device(self) -> torch.device: ...

    def training_state(self) -> dict[str, Any]: ...

    def load_training_state(self, state: Mapping[str, Any], model_in_place: bool) -> None: ...

    def apply(self, hyperparameters: Mapping[str, Any]) -> None: ...

    def rejuvenate(self, seed: int) -> None: ...


@dataclass
class PopulationBook:
    """What this rank knows of the population; the callback checkpoints it.

    Synchronous: identical on every rank after each ready step. Asynchronous: this member's latest
    view (its own entry is exact, the others' as last published).

    Attributes:
        population: ``{member: {"hyperparameters", "score", "history", "parent", "done"}}``.
        hyperparameters: the values in effect on this member.
        ready_count: this member's ready steps so far.
        last_ready_step: the global step of the last one (-1: none yet).
        last_ready_epochs: the completed epochs at the last one.
    """

    population: dict[int, dict[str, Any]] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    ready_count: int = 0
    last_ready_step: int = -1
    last_ready_epochs: int = 0


@dataclass(frozen=True)
class ReadyStepResult:
    """What the callback reports to the loggers after a ready step.

    Attributes:
        step: the ready step's global step.
        scores: ``{member: score}`` as the decision saw them.
        plan: this member's plan.
        timing: seconds per phase (``gather``, ``decide``, ``transfer``, ...).
    """

    step: int
    scores: dict[int, float | None]
    plan: MemberPlan
    timing: dict[str, float]


def _finite(score: float | None) -> bool:
    return score is not None and math.isfinite(score)


class ReadySteps(ABC):
    """One ready-step protocol for this rank. ``start`` once per fit, ``step`` at every ready step of
    this member, ``finish`` when this member stops training, ``close`` in every case at the end.

    Args:
        population: the population group.
        topology: this rank's place in the population.
        namespace: this run's key prefix in the launch's store.
        scheduler: the PBT decision (synchronous: run on population rank 0 only).
        book: what this rank knows of the population (checkpointed by the callback).
        member: the trainer's state, as the callback exposes it.
        mode: ``"max"`` or ``"min"``.
        monitor: the metric's name, for messages.
        seed: the run's seed (rejuvenation seeds derive from it).
        snapshot_every: asynchronous: snapshots between ready steps, every this many optimizer steps
            (``snapshot_every_n_train_steps``; ``None``: none).
        wait_for_peers: asynchronous: at a ready step, wait up to this fraction of the last ready interval
            for the members that have not scored at this member's progress (``None``: never).
    """

    synchronous: ClassVar[bool]

    def __init__(
        self,
        *,
        population: PopulationGroup,
        topology: PopulationTopology,
        namespace: str,
        scheduler: PBTScheduler,
        book: PopulationBook,
        member: LocalMember,
        mode: str,
        monitor: str,
        seed: int,
        snapshot_every: int | None = None,
        wait_for_peers: float | None = None,
    ) -> None:
        self.population = population
        self.topology = topology
        self.namespace = namespace
        self.scheduler = scheduler
        self.book = book
        self.member = member
        self.mode = mode
        self.monitor = monitor
        self.seed = seed
        self.snapshot_every = snapshot_every
        self.wait_for_peers = wait_for_peers
        self.lineage: LineageWriter | None = None

    @property
    def me(self) -> int:
        return self.topology.member_id

    def start(
        self,
        lineage_path: str,
        *,
        restored: bool,
        layout: list[dict[str, Any]],
        step: int,
        epoch: int,
        start_values: Mapping[str, Any],
        init_extra: Mapping[str, Any],
        averages: Sequence[str] = (),
    ) -> None:
        """Check what every rank must agree on and open the lineage (population rank 0).

        ``layout`` (:func:`lightning_pbt.distributed.optimizer_layout.optimizer_layout`) describes this
        rank's optimizers and ``averages`` names its weight-averaging callbacks (their ``state_key``s):
        members that differ could not copy each other's state, so every rank stops with the same message before training.
        Problems with the lineage file (corrupt, another run's) are broadcast from rank 0 so that every
        rank raises them.
        """
        population, topology = self.population, self.topology
        mine = {"optimizers": layout, "averages": sorted(averages)}
        fingerprint = zlib.crc32(json.dumps(mine, sort_keys=True).encode())
        row = torch.tensor([fingerprint, self.book.last_ready_step], dtype=torch.float64, device=population.device)
        table = population.all_gather(row).cpu()
        differing = [rank for rank in range(table.shape[0]) if table[rank, 0] != table[0, 0]]
        if differing:  # every rank saw the same table: every rank takes these broadcasts and raises
            reference = population.broadcast_json(mine if topology.world_rank == 0 else None, root=0)
            other = population.broadcast_json(mine if topology.world_rank == differing[0] else None, differing[0])
            mismatch = describe_layout_mismatch(reference["optimizers"], other["optimizers"])
            if mismatch is not None:
                raise RuntimeError(
                    f"PopulationBasedTraining: the optimizers of world ranks {differing} differ from world rank 0's, "
                    f"so members could not copy each other's state (rank 0 as donor, rank {differing[0]} as loser: "
                    f"{mismatch}); every member must build the same optimizers and param groups"
                )
            raise RuntimeError(
                f"PopulationBasedTraining: the weight-averaging callbacks of world ranks {differing} "
                f"({other['averages']} on rank {differing[0]}) differ from world rank 0's ({reference['averages']}), "
                "so members could not copy each other's averages; every member must use the same callbacks"
            )
        error = None
        if topology.world_rank == 0:
            resumed_at = {
                member: int(table[topology.world_rank_of(member, 0), 1]) for member in range(topology.num_members)
            }
            try:
                self.lineage = open_lineage(
                    lineage_path, self.book, self.scheduler, restored, resumed_at, step, epoch, start_values, init_extra
                )
            except Exception as exc:  # broadcast below, so that every rank raises it
                error = f"PopulationBasedTraining: cannot continue the lineage: {type(exc).__name__}: {exc}"
        error = self.population.broadcast_json(error, root=0)
        if error:
            raise RuntimeError(error)

    @abstractmethod
    def step(self, observation: Observation) -> ReadyStepResult:
        """This member's ready step."""

    def between_ready_steps(self, step: int) -> None:  # noqa: B027 - a hook, empty unless a protocol needs it
        """After each training batch, ``step`` being the global step; nothing by default."""

    @abstractmethod
    def finish(self) -> None:
        """This member stopped training: keep serving the population until every member has stopped."""

    def close(self) -> None:
        """Release threads and files; safe to call more than once and after a failure."""
        if self.lineage is not None:
            self.lineage.close()
            self.lineage = None

    def flush(self) -> None:
        """Make the lineage lines written so far durable (before a checkpoint claims their step)."""
        if self.lineage is not None:
            self.lineage.wait()

    def _carry_out(self, plan: MemberPlan, step: int) -> None:
        """Re-initialise weights and apply hyperparameters as ``plan`` says (after any state arrived)."""
        if plan.event == "rejuvenate":
            self.member.rejuvenate(self.seed * 1_000_003 + self.me + 7919 * step)
        if plan.event != "keep" or plan.hyperparameters != self.book.hyperparameters:
            self.book.hyperparameters = dict(plan.hyperparameters)
            self.member.apply(self.book.hyperparameters)

    def _missing_monitor_error(self, members: list[int]) -> str:
        return (
            f"PopulationBasedTraining: the monitored metric {self.monitor!r} was not logged by member(s) {members} at "
            f"this ready step. Log it with self.log({self.monitor!r}, ..., sync_dist=True) in validation_step"
        )

    def _all_diverged_error(self) -> str:
        return (
            f"PopulationBasedTraining: every training member's {self.monitor!r} is NaN or infinite at this ready "
            "step, so there is no member to copy; lower the learning-rate range or add gradient clipping "
            "(Trainer(gradient_clip_val=...))"
        )


def open_lineage(
    path: str,
    book: PopulationBook,
    scheduler: PBTScheduler,
    restored: bool,
    resumed_at: Mapping[int, int],
    step: int,
    epoch: int,
    start_values: Mapping[str, Any],
    init_extra: Mapping[str, Any],
) -> LineageWriter:
    """Population rank 0: continue the lineage of a resumed run, or start a fresh one.

    A resumed member's lines after the ready step it resumed from are dropped (they are written again);
    a fresh run moves an existing file aside (``lineage.jsonl.N``) instead of deleting it.
    """
    if restored and os.path.exists(path):
        inits = {record.member: record.hyperparameters for record in read_lineage(path) if record.event == "init"}
        expected = {member: scheduler.initial_hyperparameters(member, start_values) for member in book.population}
        if inits != expected:
            raise ValueError(
                f"{path} belongs to another run: its init lines ({len(inits)} members) do not match this run's seed, "
                f"search space and population ({len(expected)} members); move it away or set "
                "PopulationBasedTraining(dirpath=...) to a fresh folder"
            )
        truncate_members_after(path, resumed_at)
        return LineageWriter(path)
    if os.path.exists(path):
        index = 1
        while os.path.exists(f"{path}.{index}"):
            index += 1
        os.replace(path, f"{path}.{index}")
    writer = LineageWriter(path)
    writer.write(
        LineageRecord(
            step=step,
            epoch=epoch,
            member=member,
            score=None,
            event="init",
            parent=member,
            hyperparameters=dict(status["hyperparameters"]),
            extra=dict(init_extra),
        )
        for member, status in sorted(book.population.items())
    )
    return writer


# -- synchronous -----------------------------------------------------------------------------------
class SynchronousReadySteps(ReadySteps):
    """Lockstep ready steps: one decision for the whole population, on population rank 0."""

    synchronous = True

    def _ready_key(self) -> str:
        return f"{self.namespace}/ready/{self.book.ready_count}"

    def step(self, observation: Observation) -> ReadyStepResult:
        population, topology = self.population, self.topology
        started = time.perf_counter()
        if not observation.done:  # wakes the members that have stopped (see finish)
            population.store.set(self._ready_key(), "1")
        row = torch.tensor(
            [observation.score, observation.step, observation.epoch, observation.missing, observation.done],
            dtype=torch.float64,
            device=population.device,
        )
        table = population.all_gather(row).cpu()
        gathered = time.perf_counter()
        decision: Any = None
        if topology.world_rank == 0:
            try:
                decision = self._decide(table)
            except Exception as error:  # broadcast, so that no rank waits for a decision that never comes
                decision = {
                    "error": "PopulationBasedTraining: the decision failed on population rank 0: "
                    f"{type(error).__name__}: {error}"
                }
        decision = population.broadcast_json(decision, root=0)
        decided = time.perf_counter()
        if decision.get("error"):
            raise RuntimeError(decision["error"])

        plans = {int(member): MemberPlan.from_dict(plan) for member, plan in decision["plans"].items()}
        self._move_states(plans)
        transferred = time.perf_counter()

        self.scheduler.load_state_dict(decision["scheduler"])
        for member, plan in plans.items():
            self.book.population[member].update(
                hyperparameters=dict(plan.hyperparameters),
                parent=plan.parent,
                score=decision["scores"][str(member)],
                done=bool(decision["done"][str(member)]),
                history=decision["histories"][str(member)],
            )
        step = int(decision["step"])
        self._carry_out(plans[self.me], step)
        self.book.ready_count += 1
        self.book.last_ready_step = step
        timing = {"gather": gathered - started, "decide": decided - gathered, "transfer": transferred - decided}
        if self.lineage is not None:
            self.lineage.write_in_background(
                LineageRecord(
                    step=step,
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
        scores = {int(member): score for member, score in decision["scores"].items()}
        return ReadyStepResult(step, scores, plans[self.me], timing)

    def finish(self) -> None:
        """Serve the ready steps of the members still training (as a possible donor) until all stop."""

        def serve() -> None:
            while self.population.store.check([self._ready_key()]):
                self.step(Observation(math.nan, False, self.book.last_ready_step, -1, done=True))

        self.population.wait_for_everyone(f"{self.namespace}/done", 0.05, barrier=False, meanwhile=serve)

    def _decide(self, table: torch.Tensor) -> dict[str, Any]:
        """Population rank 0 only: check the gathered rows and run the scheduler."""
        topology = self.topology
        leaders = {member: table[topology.world_rank_of(member, 0)] for member in range(topology.num_members)}
        active = {member: row for member, row in leaders.items() if not row[_DONE]}
        missing = [member for member, row in active.items() if row[_MISSING]]
        if missing:
            return {"error": self._missing_monitor_error(missing)}
        steps = {int(row[_STEP]) for row in active.values()}
        if len(steps) > 1:
            return {
                "error": (
                    "PopulationBasedTraining: members reached this ready step at different global steps "
                    f"({ {m: int(r[_STEP]) for m, r in active.items()} }); in synchronous mode every member must "
                    "use the same Trainer limits, data size and validation interval (or use synchronous=False)"
                )
            }
        if active and not any(math.isfinite(float(row[_SCORE])) for row in active.values()):
            return {"error": self._all_diverged_error()}
        step = steps.pop() if steps else max(int(row[_STEP]) for row in leaders.values())
        snapshots = []
        histories: dict[str, list[float]] = {}
        scores: dict[str, float | None] = {}
        for member, row in leaders.items():
            status = self.book.population[member]
            score = float(row[_SCORE])
            finite = math.isfinite(score)
            history = (list(status["history"]) + ([score] if finite and not row[_DONE] else []))[-_HISTORY:]
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

    def _move_states(self, plans: Mapping[int, MemberPlan]) -> None:
        """Rank j of every donor sends to rank j of each of its losers; only they flatten their state."""
        topology, j = self.topology, self.topology.member_rank
        exploits = [(member, plan.parent) for member, plan in sorted(plans.items()) if plan.event == "exploit"]
        send_to = [topology.world_rank_of(loser, j) for loser, donor in exploits if donor == self.me]
        donor = next((donor for loser, donor in exploits if loser == self.me), None)
        if send_to:
            flat = transfer.flatten_state(self.member.training_state())
            transfer.send_state(self.population, transfer.pack_state(flat, self.population.device), send_to)
        if donor is not None:
            own = transfer.flatten_state(self.member.training_state()).tensors
            received = transfer.receive_state(
                self.population, topology.world_rank_of(donor, j), own, self.member.device
            )
            assert received is not None  # a synchronous donor never refuses
            self.member.load_training_state(
                transfer.unflatten_state(received.nest, received.tensors), model_in_place=received.in_place
            )


# -- asynchronous ----------------------------------------------------------------------------------
class AsynchronousReadySteps(ReadySteps):
    """Each member at its own pace: publish, decide alone, fetch the donor's snapshot (see module doc)."""

    synchronous = False
    attempts = 3  # a donor's snapshot can move on while a loser's ranks copy it; then decide again

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server: SnapshotServer | None = None
        self.drain: LineageDrain | None = None
        self._record: dict[str, Any] | None = None
        self._last_push: int | None = None
        self._versions = 0  # snapshots taken in this fit: ready steps and between them
        self._snapshot_step: int | None = None
        self._interval_started = time.monotonic()  # when this member left its last ready step (or started)

    @property
    def _leader(self) -> bool:
        return self.topology.member_rank == 0

    @property
    def _offset(self) -> int:
        """This member's progress minus its step: what its copies' donors had trained beyond it."""
        return int(self.book.population[self.me].get("progress_offset", 0))

    def _record_key(self, member: int) -> str:
        return f"{self.namespace}/member/{member}"

    def start(self, lineage_path: str, **kwargs: Any) -> None:
        # Snapshots live in host memory and travel over a gloo group of their own on every backend (see
        # PopulationGroup.host_group); every rank switches here, at the same point.
        self.population = self.population.host_group()
        if self._leader:  # before start's collectives, so that every member's record exists after them
            self._publish(kwargs["step"], kwargs["epoch"], None, version=-1, done=False)
        super().start(lineage_path, **kwargs)
        population = self.population
        self.server = SnapshotServer(
            population, population.new_store_client(), self.namespace, self.topology.world_rank, population.signal_abort
        )
        self.server.start()
        if self.lineage is not None:
            self.drain = LineageDrain(
                population.new_store_client(), self.namespace, self.lineage, population.signal_abort
            )
            self.drain.start()
        self._interval_started = time.monotonic()  # training starts now: the set-up is no interval's

    def _publish(
        self, step: int, epoch: int, score: float | None, version: int, done: bool, interval_s: float | None = None
    ) -> None:
        """This member's public record (:func:`public_record`), read by the others when they decide."""
        status, offset = self.book.population[self.me], self._offset
        self._record = public_record(status, self.book.hyperparameters, step, epoch, score, version, offset)
        self._record.update(done=done, interval_s=interval_s)
        self.population.store.set(self._record_key(self.me), json.dumps(self._record))

    def _records(self) -> dict[int, dict[str, Any]]:
        keys = [self._record_key(member) for member in range(self.topology.num_members)]
        return {member: json.loads(raw) for member, raw in enumerate(self.population.store.multi_get(keys))}

    def step(self, observation: Observation) -> ReadyStepResult:
        assert self.server is not None
        started = time.perf_counter()
        interval_s = max(time.monotonic() - self._interval_started, 0.0)
        if self._leader and self.book.ready_count > 0:
            self._forget(self.book.ready_count - 1)
        version = self._take_snapshot(observation.step)
        if observation.missing:  # the same on every rank of this member
            raise RuntimeError(self._missing_monitor_error([self.me]))
        score = observation.score if math.isfinite(observation.score) else None
        own = self.book.population[self.me]
        fresh = [score] if score is not None else []
        steps = _history_steps(own, self.book.last_ready_step) + [observation.step + self._offset] * len(fresh)
        own.update(
            score=score, history=(list(own.get("history", [])) + fresh)[-_HISTORY:], history_steps=steps[-_HISTORY:]
        )
        if self._leader:
            self._publish(observation.step, observation.epoch, score, version, done=False, interval_s=interval_s)
        snapshotted = time.perf_counter()
        waited = self._wait_for_peers(observation.step, interval_s)

        plan, donor_step, decided, view, message = None, None, snapshotted, {}, {"compared": {}}
        for attempt in range(self.attempts):
            message = self._shared_decision(observation, attempt, (self.wait_for_peers or 0.0) * interval_s)
            decided = time.perf_counter()
            plan, view = MemberPlan.from_dict(message["plan"]), message["view"]
            if plan.event != "exploit":
                break
            donor = message["donor"]
            received = self._fetch(plan.parent, donor, attempt)
            if received is not None:
                self.member.load_training_state(
                    transfer.unflatten_state(received.nest, received.tensors), model_in_place=False
                )
                # The copy's history and progress are the donor's snapshot's (see lightning_pbt.algorithm.comparable).
                own["history"], own["history_steps"] = list(donor["history"]), list(donor["history_steps"])
                own["progress_offset"] = int(donor["progress"]) - observation.step
                donor_step = int(donor["snapshot_step"])
                self._leave_rankings()
                break
            plan = None
        if plan is None:  # every attempt found the donor's snapshot replaced: keep training as is
            plan = MemberPlan(self.me, "keep", self.me, dict(self.book.hyperparameters), ("donor moved on; kept",))
        transferred = time.perf_counter()

        if plan.event == "rejuvenate":  # fresh weights: no scores, no progress yet
            own["history"], own["history_steps"], own["progress_offset"] = [], [], -observation.step
        self._carry_out(plan, observation.step)
        if plan.event == "rejuvenate":
            self._leave_rankings()
        own.update(parent=plan.parent, hyperparameters=dict(plan.hyperparameters))
        for member, status in view.items():
            if int(member) != self.me:
                self.book.population[int(member)].update(status)
        self.book.ready_count += 1
        self.book.last_ready_step = observation.step
        timing = {"snapshot": snapshotted - started, "decide": decided - snapshotted, "transfer": transferred - decided}
        if self._leader:
            extra = _decision_extra(message, waited)
            record = LineageRecord(
                step=observation.step,
                epoch=observation.epoch,
                member=self.me,
                score=score,
                event=plan.event,
                parent=plan.parent,
                hyperparameters=dict(plan.hyperparameters),
                mutations=list(plan.mutations),
                timing=timing,
                extra=extra,
                donor_step=donor_step,
            )
            self._last_push = push_lineage(self.population.store, self.namespace, [record])
        scores = {int(member): status.get("score") for member, status in view.items()}
        scores[self.me] = score
        self._interval_started = time.monotonic()
        return ReadyStepResult(observation.step, scores, plan, timing)

    def _wait_for_peers(self, step: int, interval_s: float) -> float | None:
        """The leader waits until the others have scored at its ``step`` (see :func:`wait_for_peers`), for
        ``wait_for_peers`` of its last interval at most, and not for peers whose own last interval took
        longer than its interval and wait together; the member's other ranks wait for its decision anyway.
        Returns the seconds waited."""
        if not self._leader or self.wait_for_peers is None:
            return None
        seconds = self.wait_for_peers * interval_s
        return wait_for_peers(self._records, self.me, step, seconds, pace=interval_s + seconds)

    def _leave_rankings(self) -> None:
        """Its record describes weights just thrown away (a copy, fresh weights): out of the others' rankings
        until its next ready step, so no snapshot of the new weights passes for the old score."""
        if self._leader and self._record is not None:
            self._record["copied"] = True
            self.population.store.set(self._record_key(self.me), json.dumps(self._record))

    def _take_snapshot(self, step: int) -> int:
        """Snapshot the training state into host memory and serve it; returns its version."""
        assert self.server is not None
        version, self._versions = self._versions, self._versions + 1
        self.server.take_snapshot(version, transfer.flatten_state(self.member.training_state()), self.population.device)
        self._snapshot_step = step
        return version

    def between_ready_steps(self, step: int) -> None:
        """Every ``snapshot_every`` optimizer steps after the last ready step, a snapshot the others may copy.

        Every rank of the member is at the same global step after the same batch (DDP), so all of them
        take it, with the same version, without talking to each other. The record keeps the last ready
        step's score and history: only the snapshot's step, progress and version move.
        """
        if self.server is None or not snapshot_due(step, self.book.last_ready_step, self.snapshot_every):
            return
        if step == self._snapshot_step:  # gradient accumulation: several batches end at one global step
            return
        version = self._take_snapshot(step)
        if self._leader and self._record is not None:
            self._record.update(snapshot_step=step, progress=step + self._offset, version=version)
            self.population.store.set(self._record_key(self.me), json.dumps(self._record))

    def _forget(self, ready_count: int) -> None:
        """Delete a past ready step's keys from the store. Every rank of this member has read them by now:
        they trained in step (DDP) since, so the store does not grow with the ready steps."""
        store = self.population.store
        for attempt in range(self.attempts):
            store.delete_key(f"{self.namespace}/plan/{self.me}/{ready_count}/{attempt}")
            for j in range(self.topology.member_size):
                store.delete_key(f"{self.namespace}/fetched/{self.me}/{ready_count}/{attempt}/{j}")

    def _shared_decision(self, observation: Observation, attempt: int, leader_wait_s: float) -> dict[str, Any]:
        """The member's leader decides; the member's other ranks read the same decision from the store."""
        key = f"{self.namespace}/plan/{self.me}/{self.book.ready_count}/{attempt}"
        if self._leader:
            try:
                message = self._decide(observation)
            except Exception as error:  # shared, so that the member's other ranks raise it too
                message = {"error": f"PopulationBasedTraining: member {self.me}'s decision failed: {error}"}
            self.population.store.set(key, json.dumps(message))
        else:  # the store's timeout, plus what the leader may spend waiting for peers first
            store = self.population.store
            store.wait([key], store.timeout + timedelta(seconds=leader_wait_s))
            message = json.loads(store.get(key))
        if message.get("error"):
            raise RuntimeError(message["error"])
        return message

    def _decide(self, observation: Observation) -> dict[str, Any]:
        """This member's plan from the population's published records
        (see :mod:`lightning_pbt.algorithm.comparable`)."""
        records = self._records()
        status = self.book.population[self.me]
        own = Published(
            step=observation.step,
            score=status["score"],
            hyperparameters=self.book.hyperparameters,
            history=tuple(zip(_history_steps(status, observation.step), status["history"], strict=True)),
            progress=observation.step + self._offset,
        )
        others = {member: published(record) for member, record in records.items() if member != self.me}
        if own.score is None and everyone_diverged(records):
            raise RuntimeError(self._all_diverged_error())
        decision = decide_alone(self.scheduler, self.me, observation.step, own, others)
        plan = decision.plan
        view = {
            str(member): {
                "score": record["score"],
                "hyperparameters": record["hyperparameters"],
                "done": record["done"],
            }
            for member, record in records.items()
            if member != self.me
        }
        message: dict[str, Any] = {
            "plan": plan.to_dict(),
            "view": view,
            # which step of each member's score was compared (and the value ranked): the lineage's extra
            "compared": {str(member): seen.to_dict() for member, seen in sorted(decision.compared.items())},
            "in_step": decision.in_step,
        }
        if plan.event == "exploit":
            donor = records[plan.parent]
            message["donor"] = {
                "version": donor["version"],
                "step": donor["step"],
                "snapshot_step": donor.get("snapshot_step", donor["step"]),
                "history": donor["history"],
                "history_steps": _history_steps(donor, donor["step"]),
                "progress": donor.get("progress", donor["step"]),
            }
        return message

    def _fetch(self, donor: int, info: Mapping[str, Any], attempt: int) -> transfer.Received | None:
        """Every rank j of this member copies rank j of the donor; all of them or none (then ``None``)."""
        topology = self.topology
        donor_rank = topology.world_rank_of(donor, topology.member_rank)
        store = self.population.store
        try:
            request_snapshot(store, self.namespace, donor_rank, topology.world_rank, int(info["version"]))
            received = transfer.receive_state(self.population, donor_rank, None, self.member.device)
        except Exception as error:
            raise RuntimeError(
                f"PopulationBasedTraining: member {self.me} could not copy member {donor}'s snapshot of step "
                f"{info['snapshot_step']} from world rank {donor_rank}: {type(error).__name__}: {error}"
            ) from error
        # Ranks of one member must end with the same state: load only if every one of them got it.
        prefix = f"{self.namespace}/fetched/{self.me}/{self.book.ready_count}/{attempt}"
        store.set(f"{prefix}/{topology.member_rank}", "1" if received is not None else "0")
        agreed = all(store.get(f"{prefix}/{j}") == b"1" for j in range(topology.member_size))
        return received if agreed else None

    def finish(self) -> None:
        """Stopped: stay a donor (serving the last snapshot) until every member has stopped."""
        store = self.population.store
        if self._leader and self._record is not None:  # still a donor: the last snapshot, now from a stopped member
            self._record["done"] = True
            store.set(self._record_key(self.me), json.dumps(self._record))
        self.population.wait_for_everyone(f"{self.namespace}/done", 0.05, barrier=False)
        if self.server is not None:
            self.server.stop(store)
        if self.drain is not None:
            self.drain.finish(store)

    def close(self) -> None:
        for thread in (self.server, self.drain):
            if thread is not None:
                thread.stop(self.population.store, timeout=2.0)
        self.server = self.drain = None
        super().close()

    def flush(self) -> None:
        """Wait (a few seconds at most) until rank 0's drain has written this member's last lines."""
        if self._leader and self._last_push is not None:
            confirmed = wait_until_written(self.population.store, self.namespace, self._last_push, timeout=10.0)
            if not confirmed:
                log.warning(
                    "member %d: lineage lines up to this checkpoint are not confirmed written yet; a crash now "
                    "could leave the lineage short of this member's last ready step",
                    self.me,
                )


def public_record(
    status: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    step: int,
    epoch: int,
    score: float | None,
    version: int,
    offset: int,
) -> dict[str, Any]:
    """An asynchronous member's record: its snapshot ``version`` and what produced it (the score, the
    hyperparameters it trained with, its history), its progress (``step + offset``) and what its score
    is at; the caller adds ``done`` and ``interval_s`` (how long its last ready interval took)."""
    return {
        "step": step,
        "epoch": epoch,
        "score": score,
        "hyperparameters": dict(hyperparameters),
        "history": list(status.get("history", [])),
        "history_steps": _history_steps(status, step),
        "progress": step + offset,
        "ready_progress": step + offset if version >= 0 else None,
        "ready_step": step if version >= 0 else None,
        "snapshot_step": step,
        "version": version,
        "ready": version >= 0,  # scored at a ready step (a snapshot between ready steps does not make it so)
    }


def _decision_extra(message: Mapping[str, Any], waited: float | None) -> dict[str, Any]:
    """The lineage's ``extra`` of an asynchronous decision: which score of each member it compared, whether
    it was lockstep's plan (:func:`lightning_pbt.algorithm.comparable.in_step`), and how long it waited for peers."""
    extra = {"done": False, "compared": message["compared"], "in_step": bool(message.get("in_step"))}
    return extra if waited is None else {**extra, "waited_s": waited}


def everyone_diverged(records: Mapping[int, Mapping[str, Any]]) -> bool:
    """Whether every member has scored at a ready step and no member's latest score is finite: the run
    cannot go on. A member with snapshots between ready steps only has not scored yet.

    Examples:
        >>> first = {"version": 2, "ready": False, "score": None}  # in-between snapshots, no ready step yet
        >>> everyone_diverged({0: {"version": 3, "ready": True, "score": None}, 1: first})
        False
        >>> everyone_diverged({0: {"version": 3, "ready": True, "score": None}, 1: {**first, "ready": True}})
        True
    """
    scored = all(record.get("ready", record["version"] >= 0) for record in records.values())
    return scored and not any(_finite(record["score"]) for record in records.values())


def published(record: Mapping[str, Any]) -> Published:
    """What another member's record tells a decision (:mod:`lightning_pbt.algorithm.comparable`)."""
    return Published(
        step=record["step"],
        score=record["score"],
        hyperparameters=record["hyperparameters"],
        history=tuple(zip(_history_steps(record, record["step"]), record["history"], strict=True)),
        servable=record["version"] >= 0,
        done=record["done"],
        progress=record.get("progress"),
        copied=bool(record.get("copied", False)),
        ready_progress=record.get("ready_progress"),
    )


def wait_for_peers(
    read: Callable[[], Mapping[int, Mapping[str, Any]]],
    me: int,
    step: int,
    seconds: float,
    pace: float | None = None,
) -> float:
    """Poll the population's records until every other member has stopped or scored at a ready step at
    its own ``step`` or beyond, or is slower than ``pace`` (:func:`peers_caught_up`), for ``seconds`` at
    most; returns the seconds waited. At near-equal speeds a decision then sees the population in step,
    as lockstep does (``wait_for_peers``)."""
    started = time.monotonic()
    deadline, pause = started + seconds, 0.005
    while not peers_caught_up(read(), me, step, pace) and time.monotonic() < deadline:
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
        pause = min(pause * 2, 0.1)
    return time.monotonic() - started


def peers_caught_up(
    records: Mapping[int, Mapping[str, Any]], me: int, step: int, pace: float | None = None
) -> bool:
    """Whether every member but ``me`` has stopped or scored at a ready step at its own ``step`` or beyond
    (a member that copied since counts: its decision there is made), or is not worth waiting for: its
    last ready interval took longer than ``pace`` seconds (a straggler would arrive after the wait ends,
    and waiting for it would cost the others their speed). Steps, not progress: a member that copied a
    snapshot ahead of its own step would otherwise wait a whole interval at every ready step after.

    Examples:
        >>> behind = {"done": False, "ready_step": 40, "interval_s": 1.1}
        >>> peers_caught_up({0: {"done": False, "ready_step": 50}, 1: behind}, me=0, step=50)
        False
        >>> peers_caught_up({0: {}, 1: {**behind, "ready_step": 60}, 2: {"done": True}}, me=0, step=50)
        True
        >>> peers_caught_up({1: behind}, me=0, step=50, pace=2.0), peers_caught_up({1: behind}, 0, 50, pace=1.0)
        (False, True)
    """
    return all(
        record.get("done")
        or (record.get("ready_step") is not None and record["ready_step"] >= step)
        or (pace is not None and record.get("interval_s") is not None and record["interval_s"] > pace)
        for member, record in records.items()
        if member != me
    )


def snapshot_due(step: int, last_ready_step: int, every: int | None) -> bool:
    """Whether an asynchronous member snapshots at global ``step`` between ready steps: every ``every``
    steps after its last ready step (after step 0 before the first one); never with ``every=None``.

    Examples:
        >>> [s for s in range(1, 12) if snapshot_due(s, last_ready_step=4, every=3)]
        [7, 10]
        >>> [s for s in range(1, 6) if snapshot_due(s, last_ready_step=-1, every=2)]
        [2, 4]
    """
    base = max(last_ready_step, 0)
    return every is not None and step > base and (step - base) % every == 0


def _history_steps(status: Mapping[str, Any], step: int) -> list[int]:
    """The progress of each score of ``status["history"]`` (see :mod:`lightning_pbt.algorithm.comparable`); a
    history saved without it (an older checkpoint) gets ``step`` for every score."""
    history, steps = list(status.get("history", [])), status.get("history_steps")
    if steps is None or len(steps) != len(history):
        return [int(step)] * len(history)
    return [int(at) for at in steps]


def protocol_class(synchronous: bool) -> type[ReadySteps]:
    """The protocol for ``PopulationBasedTraining(synchronous=...)``.

    Args:
        synchronous: ``True``: :class:`SynchronousReadySteps`; ``False``: :class:`AsynchronousReadySteps`.
    """
    return SynchronousReadySteps if synchronous else AsynchronousReadySteps
