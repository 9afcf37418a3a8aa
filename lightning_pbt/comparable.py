"""An asynchronous member's decision, alone, comparing the population like with like.

In asynchronous mode a member decides at its own ready step from the others' latest *published*
records, which are older than its own fresh score when they lag behind it. On a curve that rises with
training an older score looks worse, so ranking fresh against stale makes the decider rarely a loser
and picks donors by their age. The rule here ranks every member at comparable progress:

- For another member ``m``, take its latest published score at a step not beyond the decider's step
  ``s`` (published histories carry their steps); call that step ``c``. A member whose history holds no
  step ``<= s`` (far ahead, history bounded) gives its oldest kept score.
- If ``c < s``, add the decider's own change in score since ``c`` (its fresh score minus its own latest
  score at a step ``<= c``): ``m`` is assumed to progress from ``c`` to ``s`` as the decider did. So the
  decider and ``m`` are compared at the same step ``c``, exactly; the others among themselves with the
  same shift. Without an own score at a step ``<= c`` no shift is added.
- A member whose latest score is NaN/inf/missing ranks last and is never a donor, whatever it scored
  before (its snapshot holds what produced the NaN).
- A donor's snapshot is its latest, which may lag the decider: a plan to copy a snapshot whose own score
  is worse than the decider's fresh score becomes ``keep`` (copying would throw progress away).

The exploit rule (truncation, tournament, t-test) runs on these comparable scores; PB2 still observes
each member's latest raw (step, score). :func:`decide_alone` is what ``AsynchronousReadySteps`` runs,
and what the benchmarks' simulated asynchronous populations run, so both measure the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_pbt.exploit import is_finite_score, ranking_key
from lightning_pbt.scheduler import MemberPlan, MemberSnapshot, PBTScheduler

__all__ = ["Compared", "Decision", "Published", "comparable_scores", "decide_alone", "score_at"]


@dataclass(frozen=True)
class Published:
    """What a member's latest record says: the ``step`` and ``score`` of its latest snapshot, the
    hyperparameters that trained it, its recent finite scores with their steps (oldest first),
    whether it has a snapshot to serve and whether it stopped training."""

    step: int
    score: float | None
    hyperparameters: Mapping[str, Any]
    history: tuple[tuple[int, float], ...] = ()
    servable: bool = True
    done: bool = False


@dataclass(frozen=True)
class Compared:
    """One member as the decision saw it: the ``step`` of the score compared, that ``score``, and
    ``ranked``, the value the exploit rule ranked (``score`` plus the decider's progress since)."""

    step: int
    score: float | None
    ranked: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "score": self.score, "ranked": self.ranked}


@dataclass(frozen=True)
class Decision:
    plan: MemberPlan
    compared: dict[int, Compared] = field(default_factory=dict)


def score_at(history: Sequence[tuple[int, float]], step: int) -> tuple[int, float] | None:
    """The latest ``(step, score)`` of ``history`` at a step ``<= step``; ``None`` if there is none."""
    found = None
    for entry in history:
        if entry[0] <= step and (found is None or entry[0] >= found[0]):
            found = entry
    return found


def comparable_scores(me: int, step: int, own: Published, others: Mapping[int, Published]) -> dict[int, Compared]:
    """Each member's score at comparable progress to the decider ``me`` at ``step`` (module docstring)."""
    own_score = own.score if is_finite_score(own.score) else None
    compared = {me: Compared(step, own_score, own_score)}
    for member, record in others.items():
        if not record.servable or not is_finite_score(record.score):
            compared[member] = Compared(record.step, None, None)
            continue
        entry = score_at(record.history, step)
        if entry is None:  # ahead beyond its kept history, or no history: the nearest score it has
            entry = min(record.history, default=(record.step, float(record.score)))  # type: ignore[arg-type]
        at, score = int(entry[0]), float(entry[1])
        shift = 0.0
        if own_score is not None and at < step:
            mine = score_at(own.history, at)
            if mine is not None:
                shift = own_score - float(mine[1])
        compared[member] = Compared(at, score, score + shift)
    return compared


def decide_alone(
    scheduler: PBTScheduler,
    me: int,
    step: int,
    own: Published,
    others: Mapping[int, Published],
    like_with_like: bool = True,
) -> Decision:
    """Member ``me``'s plan at its ready ``step``; only ``me`` may exploit, the others may donate.

    ``like_with_like=False`` is the earlier rule (the fresh own score against the others' latest
    records, no donor check), kept so that the benchmarks measure both in the same code.
    """
    if like_with_like:
        compared = comparable_scores(me, step, own, others)
    else:
        compared = {me: Compared(step, own.score, own.score)}
        for member, record in others.items():
            score = record.score if record.servable else None
            compared[member] = Compared(record.step, score, score)
    records = {me: own, **others}
    snapshots = [
        MemberSnapshot(
            member=member,
            score=record.score if member == me or record.servable else None,
            hyperparameters=record.hyperparameters,
            history=tuple(score for _, score in record.history),
            can_exploit=member == me,
            training=member == me or not record.done,
            step=step if member == me else record.step,
            ranked_score=compared[member].ranked,
        )
        for member, record in sorted(records.items())
    ]
    plan = scheduler.plan(step, snapshots)[me]
    if like_with_like and plan.event == "exploit" and is_finite_score(own.score):
        donor = others[plan.parent].score
        if ranking_key(donor, scheduler.mode) > ranking_key(own.score, scheduler.mode):
            plan = MemberPlan(
                me,
                "keep",
                me,
                dict(own.hyperparameters),
                (f"member {plan.parent}'s latest snapshot scores below this member's; kept",),
            )
    return Decision(plan, compared)
