"""Asynchronous ready steps (``synchronous=False``): no member waits for another (but for a bounded
``wait_for_peers``). At its own ready step a member snapshots its state into host memory (served in the
background, see :mod:`lightning_pbt.distributed.serving`), publishes its score in the launch's store,
decides for itself from the latest published state of the population (lockstep's plan when it sees the
population in step, see :mod:`lightning_pbt.algorithm.comparable`), and, to copy, fetches the donor's
latest snapshot while the donor trains on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from lightning_pbt.algorithm.comparable import Published, decide_alone, held_by_copy
from lightning_pbt.algorithm.lineage import LineageRecord
from lightning_pbt.algorithm.scheduler import MemberPlan
from lightning_pbt.distributed import staged_receive, staging, transfer
from lightning_pbt.distributed.ready_steps.base import HISTORY, Observation, ReadyStepResult, ReadySteps
from lightning_pbt.distributed.ready_steps.records import (
    decision_extra,
    everyone_diverged,
    history_steps,
    peers_finished,
    public_record,
    published,
    snapshot_due,
    wait_bound,
    wait_for_peers,
    wait_until,
)
from lightning_pbt.distributed.serving import (
    LineageDrain,
    SnapshotServer,
    push_lineage,
    request_snapshot,
    wait_until_written,
)

__all__ = ["AsynchronousReadySteps", "announcer", "asynchronous_line"]

log = logging.getLogger(__name__)


class _PeerRecords:
    """The members' published records in the launch's store, and the bounded waits on them
    (``wait_for_peers``): the part of :class:`AsynchronousReadySteps` that reads the others."""

    namespace: str
    me: int
    wait_for_peers: float | None
    population: Any
    topology: Any
    book: Any
    _record: dict[str, Any] | None

    @property
    def _leader(self) -> bool:
        return self.topology.member_rank == 0

    def _record_key(self, member: int) -> str:
        return f"{self.namespace}/member/{member}"

    def _records(self) -> dict[int, dict[str, Any]]:
        keys = [self._record_key(member) for member in range(self.topology.num_members)]
        return {member: json.loads(raw) for member, raw in enumerate(self.population.store.multi_get(keys))}

    def _wait_for_peers(self, step: int, interval_s: float) -> float | None:
        """The leader waits until the others have scored at its ``step`` (see :func:`wait_for_peers`), for
        ``wait_for_peers`` of its last interval at most, and not for stragglers (not scored at its previous
        ready step yet); the member's other ranks wait for its decision anyway. Returns the seconds waited."""
        if not self._leader or self.wait_for_peers is None:
            return None
        since = self.book.last_ready_step if self.book.last_ready_step >= 0 else None
        return wait_for_peers(self._records, self.me, step, wait_bound(self.wait_for_peers, interval_s), since=since)

    def _wait_for_peers_to_finish(self, step: int, interval_s: float, waited: float) -> float:
        """Say this member finished its ready ``step``; wait (what is left of the wait) for the others that
        scored at it to finish it too (:func:`peers_finished`). Returns the seconds waited."""
        assert self._record is not None and self.wait_for_peers is not None
        seconds = max(wait_bound(self.wait_for_peers, interval_s) - waited, 0.0)
        self._record["finished_step"] = step
        self.population.store.set(self._record_key(self.me), json.dumps(self._record))
        return wait_until(self._records, lambda records: peers_finished(records, self.me, step), seconds)


class AsynchronousReadySteps(_PeerRecords, ReadySteps):
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
        self._interval_started = time.monotonic()  # when its last ready step began (after any wait), or started
        self.inbox = staging.StagingPool()  # where copies wait until every rank of the member has one

    @property
    def _offset(self) -> int:
        """This member's progress minus its step: what its copies' donors had trained beyond it."""
        return int(self.book.population[self.me].get("progress_offset", 0))

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
                population.new_store_client(), self.namespace, self.lineage, population.signal_abort,
                on_written=None if self.announce is None else announcer(self.announce, self.monitor),
            )
            self.drain.start()
        self._interval_started = time.monotonic()  # training starts now: the set-up is no interval's

    def _publish(
        self, step: int, epoch: int, score: float | None, version: int, done: bool, interval_s: float | None = None
    ) -> None:
        """This member's public record (:func:`public_record`), read by the others when they decide."""
        status, offset = self.book.population[self.me], self._offset
        self._record = public_record(status, self.book.hyperparameters, step, epoch, score, version, offset)
        self._record.update(done=done, interval_s=interval_s, waits=self.wait_for_peers is not None)
        self.population.store.set(self._record_key(self.me), json.dumps(self._record))

    def step(self, observation: Observation) -> ReadyStepResult:
        assert self.server is not None
        started, began = time.perf_counter(), time.monotonic()
        interval_s = max(began - self._interval_started, 0.0)
        if self._leader and self.book.ready_count > 0:
            self._forget(self.book.ready_count - 1)
        version = self._take_snapshot(observation.step)
        if observation.missing:  # the same on every rank of this member
            raise RuntimeError(self._missing_monitor_error([self.me], observation.logged))
        score = observation.score if math.isfinite(observation.score) else None
        own = self.book.population[self.me]
        fresh = [score] if score is not None else []
        steps = history_steps(own, self.book.last_ready_step) + [observation.step + self._offset] * len(fresh)
        own.update(
            score=score, history=(list(own.get("history", [])) + fresh)[-HISTORY:], history_steps=steps[-HISTORY:]
        )
        if self._leader:
            self._publish(observation.step, observation.epoch, score, version, done=False, interval_s=interval_s)
        snapshotted = time.perf_counter()
        waited = None if observation.last else self._wait_for_peers(observation.step, interval_s)

        plan, donor_step, decided, view, message = None, None, snapshotted, {}, {"compared": {}}
        for attempt in range(0 if observation.last else self.attempts):  # its last ready step: keep (all ranks know)
            message = self._shared_decision(observation, attempt, wait_bound(self.wait_for_peers or 0.0, interval_s))
            decided = time.perf_counter()
            plan, view = MemberPlan.from_dict(message["plan"]), message["view"]
            if plan.event != "exploit":
                break
            donor = message["donor"]
            received = self._fetch(plan.parent, donor, attempt)
            if received is not None:
                self.member.load_training_state(
                    transfer.unflatten_state(received.nest, received.tensors), model_in_place=received.in_place
                )
                # The copy's history and progress are the donor's snapshot's (see lightning_pbt.algorithm.comparable).
                own["history"], own["history_steps"] = list(donor["history"]), list(donor["history_steps"])
                own["progress_offset"] = int(donor["progress"]) - observation.step
                donor_step = int(donor["snapshot_step"])
                self._leave_rankings(donor.get("held"))
                break
            plan = None
        if plan is None:  # its last ready step, or every attempt found the donor's snapshot replaced: keep as is
            kept = () if observation.last else ("donor moved on; kept",)
            plan = MemberPlan(self.me, "keep", self.me, dict(self.book.hyperparameters), kept)
        transferred = time.perf_counter()

        if plan.event == "rejuvenate":  # fresh weights: no scores, no progress yet
            own["history"], own["history_steps"], own["progress_offset"] = [], [], -observation.step
        self._carry_out(plan, observation.step)
        if plan.event == "rejuvenate":
            self._leave_rankings()
        own.update(parent=plan.parent, hyperparameters=dict(plan.hyperparameters))
        if plan.event == "exploit":
            own["copied_from"] = plan.parent
        for member, status in view.items():
            if int(member) != self.me:
                self.book.population[int(member)].update(status)
        if waited is not None:  # with the wait, nobody trains past a round before the others have finished it
            waited += self._wait_for_peers_to_finish(observation.step, interval_s, waited)
        self.book.ready_count += 1
        self.book.last_ready_step = observation.step
        timing = {"snapshot": snapshotted - started, "decide": decided - snapshotted, "transfer": transferred - decided}
        if self._leader:
            extra = {**decision_extra(message, waited), **({"last": True} if observation.last else {})}
            record = LineageRecord(
                step=observation.step, epoch=observation.epoch, member=self.me, score=score, event=plan.event,
                parent=plan.parent, hyperparameters=dict(plan.hyperparameters), mutations=list(plan.mutations),
                timing=timing, extra=extra, donor_step=donor_step,
            )
            self._last_push = push_lineage(self.population.store, self.namespace, [record])
        scores = {int(member): status.get("score") for member, status in view.items()}
        scores[self.me] = score
        # The next interval counts this ready step's work (at fast steps much of a member's pace), not its wait
        self._interval_started = began + (waited or 0.0)
        return ReadyStepResult(observation.step, scores, plan, timing, {self.me: plan})

    def _leave_rankings(self, held: Any = None) -> None:
        """Its record describes thrown-away weights: out of the rankings until its next (``held``: the copy's)."""
        if self._leader and self._record is not None:
            self._record.update(copied=True, held=held)
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
            history=tuple(zip(history_steps(status, observation.step), status["history"], strict=True)),
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
                "history_steps": history_steps(donor, donor["step"]),
                "progress": donor.get("progress", donor["step"]),
                "held": held_by_copy(plan.parent, published(donor)),
            }
        return message

    def _fetch(self, donor: int, info: Mapping[str, Any], attempt: int) -> transfer.Received | None:
        """Every rank j of this member copies rank j of the donor, into its ``inbox`` and, once all of them
        have it, into its own tensors (:mod:`~lightning_pbt.distributed.staged_receive`); else ``None``."""
        topology, store = self.topology, self.population.store
        donor_rank = topology.world_rank_of(donor, topology.member_rank)
        own = transfer.flatten_state(self.member.training_state()).tensors
        try:
            request_snapshot(store, self.namespace, donor_rank, topology.world_rank, int(info["version"]))
            received = staged_receive.receive_staged(self.population, donor_rank, own, self.member.device, self.inbox)
        except Exception as error:
            raise RuntimeError(
                f"PopulationBasedTraining: member {self.me} could not copy member {donor}'s snapshot of step "
                f"{info['snapshot_step']} from world rank {donor_rank}: {type(error).__name__}: {error}"
            ) from error
        # Ranks of one member must end with the same state: load only if every one of them got it.
        prefix = f"{self.namespace}/fetched/{self.me}/{self.book.ready_count}/{attempt}"
        store.set(f"{prefix}/{topology.member_rank}", "1" if received is not None else "0")
        agreed = all(store.get(f"{prefix}/{j}") == b"1" for j in range(topology.member_size))
        return received.settle() if agreed and received is not None else None

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


def announcer(announce: Callable[[str], None], monitor: str) -> Callable[[list[LineageRecord]], None]:
    """What rank 0's lineage drain calls with the lines it wrote: one console line per member decision that
    copied or re-initialised (asynchronous mode has no population step to summarise)."""

    def on_written(records: list[LineageRecord]) -> None:
        for record in records:
            if record.event in ("exploit", "rejuvenate"):
                announce(asynchronous_line(record, monitor))

    return on_written


def asynchronous_line(record: LineageRecord, monitor: str) -> str:
    """The console line of an asynchronous member's decision, from its lineage line.

    Examples:
        >>> record = LineageRecord(40, 1, 2, 0.5, "exploit", 1, {"lr": 0.2}, ["lr: 0.25 -> 0.2 (x0.8)"], donor_step=36)
        >>> asynchronous_line(record, "val_acc")
        "PBT member 2 at its step 40 (val_acc 0.5): copied member 1's step 36, lr: 0.25 -> 0.2 (x0.8)"
    """
    score = "n/a" if record.score is None else f"{record.score:.4g}"
    head = f"PBT member {record.member} at its step {record.step} ({monitor} {score}): "
    if record.event == "rejuvenate":
        return head + "got fresh weights"
    donor = f"member {record.parent}" + ("" if record.donor_step is None else f"'s step {record.donor_step}")
    return head + ", ".join([f"copied {donor}", *record.mutations])
