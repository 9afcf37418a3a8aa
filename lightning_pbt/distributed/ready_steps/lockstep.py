"""Lockstep ready steps (``synchronous=True``, the default, deterministic): every member reaches each
ready step at the same global step; one all-gather of scores, population rank 0 decides for everyone, the
decision is broadcast, donors send to losers. Every rank runs the same collectives whatever the outcome.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from lightning_pbt.algorithm.lineage import LineageRecord
from lightning_pbt.algorithm.scheduler import MemberPlan, MemberSnapshot
from lightning_pbt.distributed import transfer
from lightning_pbt.distributed.ready_steps.base import HISTORY, Observation, ReadyStepResult, ReadySteps

__all__ = ["SynchronousReadySteps"]

# Columns of the per-rank row in the synchronous ready step's all-gather.
_SCORE, _STEP, _EPOCH, _MISSING, _DONE = range(5)


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
            history = (list(status["history"]) + ([score] if finite and not row[_DONE] else []))[-HISTORY:]
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
