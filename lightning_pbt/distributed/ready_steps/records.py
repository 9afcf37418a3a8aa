"""An asynchronous member's published record, and the questions a member asks of the population's
records: has everyone diverged, what does a record tell a decision, have the peers caught up, is a
snapshot due. Pure functions of the records (no process group), so the tests and the simulator
(``bench.simulate``) call them directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from lightning_pbt.algorithm.comparable import Published

__all__ = [
    "decision_extra",
    "everyone_diverged",
    "history_steps",
    "peers_caught_up",
    "peers_finished",
    "public_record",
    "published",
    "snapshot_due",
    "wait_bound",
    "wait_for_peers",
    "wait_until",
]


FIRST_POLL_S = 0.0002  # a store round trip takes about as long
LAST_POLL_S = 0.02
# The shortest interval the wait's bound is measured on: a busy machine deschedules a process for longer
# than an interval of fast steps (0.1 ms steps: under a ms), and a bound shorter than that ended before a
# peer of equal speed arrived.
SHORTEST_INTERVAL_S = 0.05


def wait_bound(fraction: float, interval_s: float) -> float:
    """The longest wait for peers: ``fraction`` of the member's last interval, measured as at least
    :data:`SHORTEST_INTERVAL_S`. At equal speeds the peers' arrival ends the wait, not this bound; it costs
    only when a peer within a round never comes (it is a straggler from its next round on).

    Examples:
        >>> wait_bound(1.0, 2.0), wait_bound(0.5, 0.0004)
        (2.0, 0.025)
    """
    return fraction * max(interval_s, SHORTEST_INTERVAL_S)


def _finite(score: float | None) -> bool:
    return score is not None and math.isfinite(score)


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
        "history_steps": history_steps(status, step),
        "progress": step + offset,
        "ready_progress": step + offset if version >= 0 else None,
        "ready_step": step if version >= 0 else None,
        "snapshot_step": step,
        "version": version,
        "ready": version >= 0,  # scored at a ready step (a snapshot between ready steps does not make it so)
    }


def decision_extra(message: Mapping[str, Any], waited: float | None) -> dict[str, Any]:
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
        history=tuple(zip(history_steps(record, record["step"]), record["history"], strict=True)),
        servable=record["version"] >= 0,
        done=record["done"],
        progress=record.get("progress"),
        copied=bool(record.get("copied", False)),
        ready_progress=record.get("ready_progress"),
        held=None
        if record.get("held") is None
        else (int(record["held"][0]), float(record["held"][1]), int(record["held"][2])),
    )


def wait_for_peers(
    read: Callable[[], Mapping[int, Mapping[str, Any]]],
    me: int,
    step: int,
    seconds: float,
    since: int | None = None,
) -> float:
    """Poll the population's records until every other member has stopped or scored at a ready step at
    its own ``step`` or beyond, or is a straggler (:func:`peers_caught_up`), for ``seconds`` at
    most; returns the seconds waited. At near-equal speeds a decision then sees the population in step,
    as lockstep does (``wait_for_peers``).

    Polls start at :data:`FIRST_POLL_S` and back off to a twentieth of ``seconds`` (at most
    :data:`LAST_POLL_S`): the last peer to arrive decides at once and trains on, and a waiter that noticed
    it one pause late found it at its next ready step when steps are fast (its snapshot moved on: the
    decision was no longer in step). A pause that never exceeds a twentieth of the wait keeps the waiter
    at most that late whatever the step time."""
    return wait_until(read, lambda records: peers_caught_up(records, me, step, since), seconds)


def wait_until(
    read: Callable[[], Mapping[int, Mapping[str, Any]]],
    condition: Callable[[Mapping[int, Mapping[str, Any]]], bool],
    seconds: float,
) -> float:
    """Poll ``read()`` until ``condition`` holds of what it returns, for ``seconds`` at most (polls as
    :func:`wait_for_peers` says); returns the seconds waited."""
    started = time.monotonic()
    deadline, pause = started + seconds, FIRST_POLL_S
    longest = min(LAST_POLL_S, max(seconds / 20, FIRST_POLL_S))
    while not condition(read()) and time.monotonic() < deadline:
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
        pause = min(pause * 2, longest)
    return time.monotonic() - started


def peers_finished(records: Mapping[int, Mapping[str, Any]], me: int, step: int) -> bool:
    """Whether every other member that scored at a ready step at ``step`` has finished it (decided and
    copied: ``finished_step``), or moved on, or stopped. With ``wait_for_peers`` a member that finished its
    ready step waits for this before it trains on: the last member to arrive decides at once, and at fast
    steps it reached its next ready step (a new snapshot, a new record) before the others had read the
    round, so their decisions were no longer in step and their copies of it failed. Members that have not
    scored at ``step`` (late, stragglers), and members that do not wait themselves (``waits``: they never say
    they finished), are not waited for here.

    Examples:
        >>> scored = {"done": False, "ready_step": 50, "waits": True}
        >>> peers_finished({1: scored}, me=0, step=50), peers_finished({1: {**scored, "finished_step": 50}}, 0, 50)
        (False, True)
        >>> peers_finished({1: {"ready_step": 54}, 2: {"ready_step": 46}, 3: {"ready_step": None}}, me=0, step=50)
        True
        >>> peers_finished({1: {**scored, "waits": False}}, me=0, step=50)
        True
    """
    return all(
        record.get("done")
        or not record.get("waits")
        or record.get("ready_step") != step
        or (record.get("finished_step") or -1) >= step
        for member, record in records.items()
        if member != me
    )


def peers_caught_up(records: Mapping[int, Mapping[str, Any]], me: int, step: int, since: int | None = None) -> bool:
    """Whether every member but ``me`` has stopped or scored at a ready step at its own ``step`` or beyond
    (a member that copied since counts: its decision there is made), or is a straggler: it has not scored
    at ``since``, the waiting member's previous ready step, or after it (``None``: its first, where nobody
    is a straggler yet). Progress, not time: at equal speeds, with the wait, no member falls a whole round
    behind, while at fast steps on a busy machine the time an interval took swings by several times (a rule
    that skipped peers whose last interval took longer than the waiter's and its wait together skipped
    peers of equal speed, and the first to arrive ran ahead). Steps, not progress: a member that copied a
    snapshot ahead of its own step would otherwise wait a whole interval at every ready step after.

    Examples:
        >>> behind = {"done": False, "ready_step": 40}
        >>> peers_caught_up({0: {"done": False, "ready_step": 50}, 1: behind}, me=0, step=50, since=40)
        False
        >>> peers_caught_up({0: {}, 1: {**behind, "ready_step": 60}, 2: {"done": True}}, me=0, step=50)
        True
        >>> peers_caught_up({1: behind}, me=0, step=50, since=45), peers_caught_up({1: {"ready_step": None}}, 0, 50)
        (True, False)
    """

    def caught_up(record: Mapping[str, Any]) -> bool:
        scored = record.get("ready_step")
        if record.get("done") or (scored is not None and scored >= step):
            return True
        return since is not None and (scored is None or scored < since)

    return all(caught_up(record) for member, record in records.items() if member != me)


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


def history_steps(status: Mapping[str, Any], step: int) -> list[int]:
    """The progress of each score of ``status["history"]`` (see :mod:`lightning_pbt.algorithm.comparable`); a
    history saved without it (an older checkpoint) gets ``step`` for every score."""
    history, steps = list(status.get("history", [])), status.get("history_steps")
    if steps is None or len(steps) != len(history):
        return [int(step)] * len(history)
    return [int(at) for at in steps]
