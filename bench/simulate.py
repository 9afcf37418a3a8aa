"""Populations simulated in one process: lockstep PBT, and asynchronous PBT with members of any speed.

No process group, no Lightning: a task trains one member for some steps, scores it and copies it, and
the decisions are the library's own (``PBTScheduler.plan`` in lockstep; in asynchronous mode
:func:`lightning_pbt.algorithm.comparable.decide_alone`, which ``AsynchronousReadySteps`` runs). This measures
search quality, not transport.

Asynchronous mode is event driven: member ``m`` needs ``speed[m]`` time units per step, each interval
stretched by a random factor ``exp(JITTER * N(0, 1))`` (machines never run in perfect step); when it
reaches a ready step it publishes its score and a snapshot of its state, decides alone from the others'
latest records and, to exploit, copies the donor's latest *snapshot* (not its current state) and marks
its record as copied, as the callback does. A member stops at its own step budget and stays a donor.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from lightning_pbt.algorithm.comparable import Published, decide_alone
from lightning_pbt.algorithm.exploit import is_finite_score
from lightning_pbt.algorithm.scheduler import MemberSnapshot, PBTScheduler
from lightning_pbt.distributed.ready_steps.records import peers_caught_up

__all__ = ["JITTER", "SimTask", "fast_budget", "run_asynchronous", "run_lockstep"]

JITTER = 0.1
HISTORY = 32  # as AsynchronousReadySteps keeps


class SimTask(Protocol):
    """One member's training, as the simulations need it; states are the task's own objects."""

    def start(self, member: int) -> Any: ...

    def train(self, member: int, state: Any, hyperparameters: Mapping[str, Any], steps: int) -> Any: ...

    def score(self, state: Any) -> float | None: ...

    def copy(self, state: Any) -> Any: ...


def _finite(value: float | None) -> float | None:
    return value if is_finite_score(value) else None


def fast_budget(steps: int, slow_factor: int, ready: int, wait: float | None) -> int:
    """A fast member's steps in the wall time of a straggler's ``steps`` (``slow_factor``x slower, more than
    ``1 + wait``), whole intervals. With ``wait`` it idles ``wait`` of its first interval (nobody is a
    straggler before anyone has scored) and no longer waits for them after that: they have not scored at its
    previous ready step (counted on a timeline without jitter)."""
    if not wait:
        return steps * slow_factor
    if slow_factor <= 1 + wait:
        raise ValueError(f"stragglers {slow_factor}x slower are waited for with wait={wait}: not a straggler budget")
    return int(steps * slow_factor - wait * ready) // ready * ready


def run_lockstep(
    task: SimTask,
    make_scheduler: Callable[[], PBTScheduler],
    start_values: Sequence[Mapping[str, Any]],
    ready: int,
    steps: int,
    on_ready: Callable[[int, list[Any]], None] | None = None,
) -> dict[str, Any]:
    """Every member reaches each ready step together; one decision for all (the synchronous callback)."""
    scheduler = make_scheduler()
    members = len(start_values)
    hps = [dict(v) for v in start_values]
    states = [task.start(m) for m in range(members)]
    exploits, done = 0, 0
    while done < steps:
        n = min(ready, steps - done)
        states = [task.train(m, states[m], hps[m], n) for m in range(members)]
        done += n
        if on_ready is not None:
            on_ready(done, states)
        if done % ready or done >= steps:
            continue
        snaps = [MemberSnapshot(m, _finite(task.score(states[m])), hps[m]) for m in range(members)]
        plans = scheduler.plan(done, snaps)
        states = [
            task.copy(states[plans[m].parent]) if plans[m].event == "exploit" else states[m] for m in range(members)
        ]
        exploits += sum(plans[m].event == "exploit" for m in range(members))
        hps = [dict(plans[m].hyperparameters) for m in range(members)]
    return {"states": states, "hyperparameters": hps, "exploits": exploits, "steps": [steps] * members}


def run_asynchronous(
    task: SimTask,
    make_scheduler: Callable[[], PBTScheduler],
    start_values: Sequence[Mapping[str, Any]],
    ready: int,
    steps: Sequence[int],
    speeds: Sequence[float],
    seed: int,
    like_with_like: bool = True,
    on_ready: Callable[[int, int, Any], None] | None = None,
    snapshot_every: int | None = None,
    wait: float | None = None,
) -> dict[str, Any]:
    """Each member at its own pace (module docstring); ``steps[m]`` is member ``m``'s own budget.

    ``snapshot_every``: as the callback's ``snapshot_every_n_train_steps``, a member also snapshots every
    that many steps after its last ready step, and a copy takes the donor's latest snapshot: its state
    after the last multiple of ``snapshot_every`` steps of the interval it is training (which it then goes
    on from). ``1`` is the limit: the donor's state at the moment of the copy.

    ``wait``: as the callback's ``wait_for_peers``, a member that reaches its ready step before every
    other member still training has published a score at its step idles until they have (it decides
    right after the last of them publishes) or for ``wait`` times its interval's nominal time
    (``ready * speed``), then decides with what is published. It does not wait for a member that has not
    scored at its own previous ready step yet (a straggler).
    ``"waited"`` counts the idle time.
    """
    members = len(start_values)
    jitter = np.random.default_rng([seed, 7919])
    schedulers = []
    for m in range(members):
        scheduler = make_scheduler()
        scheduler.use_member_stream(m)
        schedulers.append(scheduler)
    hps = [dict(v) for v in start_values]
    states = [task.start(m) for m in range(members)]
    at = [0] * members
    offset = [0] * members  # progress minus own step (see lightning_pbt.algorithm.comparable)
    histories: list[list[tuple[int, float]]] = [[] for _ in range(members)]
    records = {m: Published(0, None, dict(hps[m]), (), servable=False) for m in range(members)}
    snapshots: dict[int, Any] = {}
    exploits, waited, order = 0, 0.0, 0
    events: list[tuple[float, int, int, str]] = []  # (time, order, member, "ready" | "timeout")
    interval: dict[int, tuple[float, float]] = {}  # member: (start, end) of the interval it is training
    partial = [0] * members  # steps of that interval already trained (to serve an in-between snapshot)
    idle: dict[int, tuple[float, int]] = {}  # a waiting member: (since when, its timeout's order)
    previous: dict[int, int] = {}  # member: its previous ready step (stragglers have not scored there yet)

    def push(time: float, m: int, kind: str) -> int:
        nonlocal order
        order += 1
        heapq.heappush(events, (time, order, m, kind))
        return order

    def schedule(m: int, now: float) -> None:
        n = min(ready, steps[m] - at[m])
        end = now + n * speeds[m] * math.exp(JITTER * jitter.standard_normal())
        interval[m] = (now, end)
        push(end, m, "ready")

    def latest_snapshot(d: int, now: float) -> tuple[Any, int]:
        """Donor ``d``'s latest snapshot at ``now`` and its progress: the steps of its interval that have
        passed, down to a multiple of ``snapshot_every``, are trained (for good: the donor goes on from
        there) and copied; none yet, or not training (at its ready step, waiting): its ready step's."""
        assert snapshot_every is not None
        start, end = interval[d]
        if now >= end:
            return task.copy(snapshots[d]), records[d].at
        n = min(ready, steps[d] - at[d])
        due = min(n, int(n * (now - start) / (end - start))) // snapshot_every * snapshot_every
        if due == 0:
            return task.copy(snapshots[d]), records[d].at
        if due > partial[d]:
            states[d] = task.train(d, states[d], hps[d], due - partial[d])
            partial[d] = due
        return task.copy(states[d]), at[d] + partial[d] + offset[d]

    def caught_up(m: int) -> bool:  # the callback's own rule, on what the records say
        seen = {o: {"done": r.done, "ready_step": r.step if r.servable else None} for o, r in records.items()}
        return peers_caught_up(seen, m, records[m].step, since=previous.get(m))

    def decide(m: int, now: float) -> None:
        nonlocal exploits
        own, step = records[m], at[m]
        others = {o: r for o, r in records.items() if o != m}
        plan = decide_alone(schedulers[m], m, step, own, others, like_with_like=like_with_like).plan
        if plan.event == "exploit":
            donor = records[plan.parent]
            if snapshot_every is not None and not donor.done:
                states[m], progress = latest_snapshot(plan.parent, now)
            else:
                states[m], progress = task.copy(snapshots[plan.parent]), donor.at
            histories[m] = list(donor.history)
            offset[m] = progress - step
            exploits += 1
            records[m] = dataclasses.replace(own, copied=True)  # as the callback marks its record
        hps[m] = dict(plan.hyperparameters)
        schedule(m, now)

    def stop_waiting(m: int, now: float) -> None:
        nonlocal waited
        waited += now - idle.pop(m)[0]
        decide(m, now)

    def release(now: float) -> None:
        """A record changed: the waiting members whose peers have all scored at their progress decide."""
        for w in sorted(idle):
            if w in idle and caught_up(w):
                stop_waiting(w, now)

    for m in range(members):
        schedule(m, 0.0)
    while events:
        now, token, m, kind = heapq.heappop(events)
        if kind == "timeout":
            if m in idle and idle[m][1] == token:
                stop_waiting(m, now)
            continue
        n = min(ready, steps[m] - at[m])
        states[m] = task.train(m, states[m], hps[m], n - partial[m])
        partial[m] = 0
        at[m] += n
        if on_ready is not None:
            on_ready(m, at[m], states[m])
        if at[m] >= steps[m]:  # stopped: its last snapshot stays served
            records[m] = dataclasses.replace(records[m], done=True)
            release(now)
            continue
        if records[m].servable:
            previous[m] = records[m].step
        step, score = at[m], _finite(task.score(states[m]))
        if score is not None:
            histories[m] = (histories[m] + [(step + offset[m], score)])[-HISTORY:]
        snapshots[m] = task.copy(states[m])
        records[m] = Published(step, score, dict(hps[m]), tuple(histories[m]), progress=step + offset[m])
        release(now)
        if wait is not None and not caught_up(m):
            idle[m] = (now, push(now + wait * ready * speeds[m], m, "timeout"))
        else:
            decide(m, now)
    return {"states": states, "hyperparameters": hps, "exploits": exploits, "steps": list(at), "waited": waited}
