"""Lockstep ready steps (``synchronous=True``, the default, deterministic): every member reaches each
ready step at the same global step; one all-gather of scores, population rank 0 decides for everyone, the
decision is broadcast, donors send to losers. Every rank runs the same collectives whatever the outcome.
A process takes part once for all the members it hosts (one, or K that take turns: one all-gather row per
member, see :mod:`lightning_pbt.plugin.turns`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_pbt.algorithm.lineage import LineageRecord
from lightning_pbt.algorithm.scheduler import MemberPlan, MemberSnapshot
from lightning_pbt.distributed import transfer
from lightning_pbt.distributed.ready_steps.base import HISTORY, LocalMember, Observation, ReadyStepResult, ReadySteps

__all__ = ["SynchronousReadySteps"]

# Columns of the per-rank row in the synchronous ready step's all-gather.
_SCORE, _STEP, _EPOCH, _MISSING, _DONE, _LAST = range(6)


class SynchronousReadySteps(ReadySteps):
    """Lockstep ready steps: one decision for the whole population, on population rank 0.

    A process takes part in each ready step once for all the members it hosts (one, or K that take
    turns, see :mod:`lightning_pbt.plugin.turns`): :meth:`population_step` gathers one row per hosted member.
    """

    synchronous = True

    def _ready_key(self) -> str:
        return f"{self.namespace}/ready/{self.book.ready_count}"

    def stopped_observation(self) -> Observation:
        """What a member that stopped training brings to later ready steps (a possible donor)."""
        return Observation(math.nan, False, self.book.last_ready_step, -1, done=True)

    def step(self, observation: Observation) -> ReadyStepResult:
        if self.turns is not None:  # parks this member until every member of the process has arrived
            return self.turns.ready_step(self, observation)
        return self.population_step([(self, observation)])[self.me]

    def population_step(self, lanes: Sequence[tuple[SynchronousReadySteps, Observation]]) -> dict[int, ReadyStepResult]:
        """One ready step for every member this process hosts (``lanes``, in lane order; ``self`` is any
        of them): one all-gather of their rows, one decision, the transfers, then each member's book."""
        population, topology = self.population, self.topology
        started = time.perf_counter()
        if not all(observation.done for _, observation in lanes):  # wakes the stopped processes (see finish)
            population.store.set(self._ready_key(), "1")
        rows = torch.tensor(
            [[o.score, o.step, o.epoch, o.missing, o.done, o.last] for _, o in lanes],
            dtype=torch.float64,
            device=population.device,
        )
        table = population.all_gather(rows).cpu()  # [world rank, lane, column]
        leaders = {
            member: table[topology.world_rank_of(member, 0), topology.lane_of(member)]
            for member in range(topology.num_members)
        }
        gathered = time.perf_counter()
        decider = lanes[0][0]  # lane 0: on population rank 0 it holds the lineage
        decision: Any = None
        if topology.world_rank == 0:
            # The metrics a member that missed the monitor logged, where rank 0 hosts one (else unknown here).
            logged = next((observation.logged for _, observation in lanes if observation.missing), None)
            try:
                decision = decider._decide(leaders, logged)
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
        self._move_states(plans, {protocol.me: protocol.member for protocol, _ in lanes})
        transferred = time.perf_counter()
        timing = {"gather": gathered - started, "decide": decided - gathered, "transfer": transferred - decided}
        # Every member's plans go to one member of the process, the first that trains: the console's line, once.
        reporter = next((protocol.me for protocol, observation in lanes if not observation.done), None)
        return {
            protocol.me: protocol._record_decision(decision, plans, timing, report=protocol.me == reporter)
            for protocol, _ in lanes
        }

    def _record_decision(
        self, decision: Mapping[str, Any], plans: Mapping[int, MemberPlan], timing: Mapping[str, float], report: bool
    ) -> ReadyStepResult:
        """This member's book after a ready step: the population's status, its own plan carried out (``report``:
        its result carries every member's plan)."""
        self.scheduler.load_state_dict(decision["scheduler"])
        for member, plan in plans.items():
            status = self.book.population[member]
            status.update(
                hyperparameters=dict(plan.hyperparameters),
                parent=plan.parent,
                score=decision["scores"][str(member)],
                done=bool(decision["done"][str(member)]),
                history=decision["histories"][str(member)],
            )
            if plan.event == "exploit":
                status["copied_from"] = plan.parent
        step = int(decision["step"])
        self._carry_out(plans[self.me], step)
        self.book.ready_count += 1
        self.book.last_ready_step = step
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
                    extra=_step_extra(bool(decision["done"][str(member)]), bool(decision["last"][str(member)])),
                )
                for member, plan in sorted(plans.items())
            )
        scores = {int(member): score for member, score in decision["scores"].items()}
        return ReadyStepResult(step, scores, plans[self.me], dict(timing), dict(plans) if report else {})

    def finish(self) -> None:
        """Serve the ready steps of the members still training (as a possible donor) until all stop."""
        if self.turns is not None:
            self.turns.finish(self)
            return
        self.serve_until_everyone_stopped([self])

    def serve_until_everyone_stopped(self, lanes: Sequence[SynchronousReadySteps]) -> None:
        """Every member this process hosts has stopped: take part in the others' ready steps (with
        "stopped" rows) until every process has stopped."""

        def serve() -> None:
            while self.population.store.check([self._ready_key()]):
                self.population_step([(protocol, protocol.stopped_observation()) for protocol in lanes])

        self.population.wait_for_everyone(f"{self.namespace}/done", 0.05, barrier=False, meanwhile=serve)

    def _decide(self, leaders: Mapping[int, torch.Tensor], logged: Sequence[str] | None = None) -> dict[str, Any]:
        """Population rank 0 only: check each member's row (its rank 0's) and run the scheduler (``logged``:
        the metric names a member that missed the monitored one logged, ``None`` where this rank hosts none)."""
        active = {member: row for member, row in leaders.items() if not row[_DONE]}
        missing = [member for member, row in active.items() if row[_MISSING]]
        if missing:
            return {"error": self._missing_monitor_error(missing, logged)}
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
            history = (list(status["history"]) + ([score] if finite and not row[_DONE] else []))[-HISTORY:]
            histories[str(member)] = history
            scores[str(member)] = score if finite else None
            snapshots.append(
                MemberSnapshot(
                    member=member,
                    score=score if finite else None,
                    hyperparameters=status["hyperparameters"],
                    history=tuple(history),
                    # At its last ready step a member keeps what it trained with (it may still donate).
                    can_exploit=not bool(row[_DONE]) and not bool(row[_LAST]),
                    training=not bool(row[_DONE]),
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
            "last": {str(member): bool(row[_LAST]) for member, row in leaders.items()},
            "scheduler": self.scheduler.state_dict(),
        }

    def _move_states(self, plans: Mapping[int, MemberPlan], local: Mapping[int, LocalMember]) -> None:
        """Rank j of every donor gives its state to rank j of each of its losers.

        ``local``: the members this process hosts. Exploits are carried out one by one in an order every
        process knows (by loser), so the two sides of each transfer meet without deadlock; a donor and
        loser in one process copy locally (no wire). Donors' states are taken before anything loads, so
        a member that is both a donor and a loser gives what it held before this step.
        """
        topology, j = self.topology, self.topology.member_rank
        me = topology.world_rank
        exploits = [(member, plan.parent) for member, plan in sorted(plans.items()) if plan.event == "exploit"]
        losers = {loser for loser, _ in exploits}
        outgoing: dict[int, transfer.PackedState] = {}
        kept: dict[int, tuple[bytes, list[torch.Tensor]]] = {}
        for donor in sorted({donor for _, donor in exploits if donor in local}):
            receivers = [topology.world_rank_of(loser, j) for loser, d in exploits if d == donor]
            flat = transfer.flatten_state(local[donor].training_state())
            if me in receivers:  # a donor that also copies must give what it held before this step
                kept[donor] = (flat.skeleton, [t.clone() for t in flat.tensors] if donor in losers else flat.tensors)
            if any(rank != me for rank in receivers):
                outgoing[donor] = transfer.pack_state(flat, self.population.device, copy=donor in losers)
        for loser, donor in exploits:
            source, target = topology.world_rank_of(donor, j), topology.world_rank_of(loser, j)
            if source == target == me:  # both members take turns in this process
                skeleton, tensors = kept[donor]
                nest, _ = transfer.read_skeleton(skeleton)
                # the loser's own tensors: optimizers keep the tensors they load (no copy)
                state = transfer.unflatten_state(nest, [tensor.clone() for tensor in tensors])
                local[loser].load_training_state(state, model_in_place=False)
            elif source == me:
                transfer.send_state(self.population, outgoing[donor], [target])
            elif target == me:
                member = local[loser]
                own = transfer.flatten_state(member.training_state()).tensors
                received = transfer.receive_state(self.population, source, own, member.device)
                assert received is not None  # a synchronous donor never refuses
                member.load_training_state(
                    transfer.unflatten_state(received.nest, received.tensors), model_in_place=received.in_place
                )


def _step_extra(done: bool, last: bool) -> dict[str, Any]:
    """The lineage's ``extra`` of a synchronous line: whether the member had stopped, and ``last`` at the
    member's last ready step (where it keeps the values it trained with)."""
    return {"done": done, "last": True} if last else {"done": done}
