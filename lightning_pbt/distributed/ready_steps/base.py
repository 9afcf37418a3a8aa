"""What the two ready-step protocols share: what a rank brings to a ready step (:class:`Observation`), the
trainer as the protocol sees it (:class:`LocalMember`), what a rank knows of the population
(:class:`PopulationBook`), what a ready step reports (:class:`ReadyStepResult`), and the base class
:class:`ReadySteps`, whose ``start`` checks that members can copy each other and opens the lineage.
"""

from __future__ import annotations

import json
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from lightning_pbt.algorithm.lineage import LineageRecord, LineageWriter, read_lineage, truncate_members_after
from lightning_pbt.algorithm.results import set_aside_previous_run
from lightning_pbt.algorithm.scheduler import MemberPlan, PBTScheduler
from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed.collectives import PopulationGroup
from lightning_pbt.distributed.optimizer_layout import describe_layout_mismatch

__all__ = [
    "HISTORY",
    "LocalMember",
    "Observation",
    "PopulationBook",
    "ReadyStepResult",
    "ReadySteps",
    "missing_monitor_message",
    "open_lineage",
]

HISTORY = 32  # scores kept per member (the t-test and rejuvenation read them)


@dataclass(frozen=True)
class Observation:
    """What this rank brings to a ready step.

    Attributes:
        score: the monitored metric as logged (NaN when missing).
        missing: whether validation did not log the monitored metric.
        step: the member's global step.
        epoch: the member's epoch.
        done: whether the member has stopped training (it still takes part, as a possible donor).
        last: whether no training follows this ready step (its last one: ``max_steps`` or ``max_epochs``
            reached, or the trainer stopping). The member may still donate but keeps its weights and the
            values it trained with, so that what it ends with is what it trained with.
        logged: the metric names logged at this validation (named when the monitored one is missing).
    """

    score: float
    missing: bool
    step: int
    epoch: int
    done: bool = False
    last: bool = False
    logged: tuple[str, ...] = ()


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
        population: ``{member: {"hyperparameters", "score", "history", "parent", "done"}}``, and
            ``"copied_from"`` once the member has copied (the donor of its latest copy).
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
        plans: every member's plan at this step, where this rank knows them (synchronous: all of them, in
            the result of one member per process; asynchronous: this member's), for the console's one line
            per ready step.
    """

    step: int
    scores: dict[int, float | None]
    plan: MemberPlan
    timing: dict[str, float]
    plans: dict[int, MemberPlan] = field(default_factory=dict)


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
        turns: synchronous, several members per process: the process's
            :class:`~lightning_pbt.plugin.turns.MemberTurns`, through which its members meet at ready steps.
        announce: asynchronous, population rank 0: prints one console line per member decision that copied
            or re-initialised, as the lineage drain writes it (``None``: silent).
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
        turns: Any = None,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.announce = announce
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
        self.turns = turns  # the process's MemberTurns when it hosts several members (members_per_process > 1)

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
        members that differ could not copy each other's state, so every rank stops with the same message
        before training.
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
            if other["averages"] != reference["averages"]:
                raise RuntimeError(
                    f"PopulationBasedTraining: the weight-averaging callbacks of world ranks {differing} "
                    f"({other['averages']} on rank {differing[0]}) differ from world rank 0's "
                    f"({reference['averages']}), so members could not copy each other's averages; every member "
                    "must use the same callbacks"
                )
            # Not reached while the two checks above compare all that the fingerprint covers; never blame
            # the averages (or anything) for a difference neither check names.
            raise RuntimeError(
                f"PopulationBasedTraining: the training state of world ranks {differing} is laid out differently "
                f"from world rank 0's (rank 0: {reference}; rank {differing[0]}: {other}), so members could not "
                "copy each other's state; every member must build the same optimizers and callbacks"
            )
        error = None
        if topology.world_rank == 0 and topology.lane == 0:  # one lineage per run, whatever the lanes
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

    def _missing_monitor_error(self, members: list[int], logged: Sequence[str] | None = None) -> str:
        return missing_monitor_message(self.monitor, members, logged)

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
    a fresh run moves a previous run's outputs there (lineage, results, report, plots) aside together, into
    ``previous_<N>/`` (:func:`~lightning_pbt.algorithm.results.set_aside_previous_run`), instead of deleting them.
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
    set_aside_previous_run(os.path.dirname(path) or ".")
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


def missing_monitor_message(monitor: str, members: Sequence[int], logged: Sequence[str] | None) -> str:
    """The error for a monitored metric that was not logged, naming the metrics that were (and the closest).
    ``logged``: what one of those members logged (``None``: not known where the error is made, so not named).

    Examples:
        >>> missing_monitor_message("val_accuracy", [0, 1], ["val_acc", "train_loss"]).split("; ")[-1]
        "the metrics logged were ['train_loss', 'val_acc'] (did you mean 'val_acc'?)"
    """
    import difflib

    text = (
        f"PopulationBasedTraining: the monitored metric {monitor!r} was not logged by member(s) {list(members)} at "
        f"this ready step. Log it with self.log({monitor!r}, ..., sync_dist=True) in validation_step"
    )
    if logged is None:
        return text
    names = sorted(logged)
    if not names:
        return text + "; no metric was logged at this validation"
    text += f"; the metrics logged were {names}"
    close = difflib.get_close_matches(monitor, names, n=1)
    return text + (f" (did you mean {close[0]!r}?)" if close else "")
