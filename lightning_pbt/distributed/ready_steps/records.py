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
    "public_record",
    "published",
    "snapshot_due",
    "wait_for_peers",
]


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
        held=None if record.get("held") is None else (int(record["held"][0]), float(record["held"][1])),
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


def history_steps(status: Mapping[str, Any], step: int) -> list[int]:
    """The progress of each score of ``status["history"]`` (see :mod:`lightning_pbt.algorithm.comparable`); a
    history saved without it (an older checkpoint) gets ``step`` for every score."""
    history, steps = list(status.get("history", [])), status.get("history_steps")
    if steps is None or len(steps) != len(history):
        return [int(step)] * len(history)
    return [int(at) for at in steps]
