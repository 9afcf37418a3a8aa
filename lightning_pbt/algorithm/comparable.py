"""An asynchronous member's decision, alone, comparing the population like with like.

In asynchronous mode a member decides at its own ready step from the others' latest *published*
records. Two things made those records compare badly with the decider's fresh score: a member that
has just copied a donor still shows the score of the weights it threw away until its next ready step
(it sits at the bottom of everyone's ranking, so nobody else exploits), and a member ahead shows a
score from further in training. The rule here:

- *Progress* is the number of steps the weights a member holds have trained: its own step while it
  has never copied; a copy takes over the donor snapshot's progress (a member that copied a snapshot
  of step 300 at its own step 100 is 200 steps further along than its step count says). Published
  histories are stamped with progress.
- A member that exploited since its last record is left out of the ranking (neither loser nor donor)
  until it publishes again: its record no longer describes what it holds.
- Never without a comparison: when that leaves the decider no other member with a finite score (every
  other member copied since its last record: the first to run ahead, once the others have copied it, would
  otherwise keep its weights however far its score falls), the members that copied come back, as Ray Tune's
  asynchronous PBT ranks every member's last result. One that still serves the snapshot it scored with
  counts with that score (the pair is what a copy of it gets); one that has snapshotted since serves the
  weights it copied, trained on, and counts with the score those weights had (``held``, published when it
  copied), as any member's snapshot between ready steps counts with the score of its last ready step.
- Every other member is ranked by its latest published score at a progress not beyond the decider's
  (a member whose kept history holds nothing that early, being far ahead, by its oldest kept score),
  and the exploit rule (truncation, tournament, t-test) picks the loser and the donor from that table.
  The copy is the donor's latest snapshot.
- A member whose latest score is NaN/inf/missing ranks last and is never a donor, whatever it scored
  before (its snapshot holds what produced the NaN).
- *In step* (:func:`in_step`): when every other member has scored at a ready step at the decider's very
  step and progress, or stopped before it (at equal speeds, with ``wait_for_peers``), the decider plans
  the whole population as lockstep would, from the same snapshots and with the step's own random stream
  (:meth:`PBTScheduler.population_stream`), and carries out its own part of that plan. Every member that
  sees the population in step computes the same plan, so when every member decides in step at every
  ready step the population decides as lockstep does (with ``explore="pb2"`` each member still fits its
  own PB2 model); ``extra.in_step`` says which decisions were made so. A copy of a snapshot taken after
  the donor's ready step (``snapshot_every_n_train_steps``, or a donor ahead) leaves the copier ahead in
  progress: lockstep has no such member, and the decisions that see it are made alone.

PB2 still observes each member's latest raw (step, score). :func:`decide_alone` is what
``AsynchronousReadySteps`` runs and what the benchmarks' simulated asynchronous populations run, so both
measure the same rule. (A variant that also shifted lagging members by the decider's own progress since
their score, to compare at exactly the same progress, chose worse in the benchmarks, as did the other
rules listed in docs/benchmarks.md.) What a rule cannot do is rank a score nobody has published yet: the
first member to reach a ready step at equal speeds ranks the others' previous scores. ``wait_for_peers``
lets it wait (boundedly) for them, and the decision is then lockstep's:
``python -m bench --only decisions``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_pbt.algorithm.exploit import is_finite_score
from lightning_pbt.algorithm.scheduler import MemberPlan, MemberSnapshot, PBTScheduler

__all__ = [
    "Compared",
    "Decision",
    "Published",
    "comparable_scores",
    "copied_score",
    "decide_alone",
    "held_by_copy",
    "in_step",
    "score_at",
]


@dataclass(frozen=True)
class Published:
    """What a member's latest record says: the own ``step`` and ``score`` of its latest snapshot, the
    hyperparameters that trained it, its recent finite scores with their progress (oldest first),
    whether it has a snapshot to serve, whether it stopped training, the snapshot's ``progress``
    (``None``: ``step``, a member that never copied), whether it copied a donor since, and the progress
    its ``score`` is at (``None``: the snapshot's; a snapshot between ready steps moves only ``progress``),
    and, once it copied, the ``(progress, score, origin)`` of the donor's snapshot it holds, ``origin`` being
    the member whose weights those are (``held``; ``None``: unknown, e.g. fresh weights)."""

    step: int
    score: float | None
    hyperparameters: Mapping[str, Any]
    history: tuple[tuple[int, float], ...] = ()
    servable: bool = True
    done: bool = False
    progress: int | None = None
    copied: bool = False
    ready_progress: int | None = None
    held: tuple[int, float, int] | None = None

    @property
    def at(self) -> int:
        """The snapshot's progress."""
        return self.step if self.progress is None else self.progress

    @property
    def scored_at(self) -> int:
        """The progress its ``score`` is at."""
        return self.at if self.ready_progress is None else self.ready_progress


@dataclass(frozen=True)
class Compared:
    """One member as the decision saw it: the ``progress`` of the score compared, and that ``score``."""

    progress: int
    score: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"progress": self.progress, "score": self.score}


@dataclass(frozen=True)
class Decision:
    """A member's own plan, what it compared, and whether it was lockstep's plan (:func:`in_step`)."""

    plan: MemberPlan
    compared: dict[int, Compared] = field(default_factory=dict)
    in_step: bool = False


def score_at(history: Sequence[tuple[int, float]], step: int) -> tuple[int, float] | None:
    """The latest ``(progress, score)`` of ``history`` at ``<= step``; ``None`` if there is none."""
    found = None
    for entry in history:
        if entry[0] <= step and (found is None or entry[0] >= found[0]):
            found = entry
    return found


def comparable_scores(me: int, own: Published, others: Mapping[int, Published]) -> dict[int, Compared]:
    """The score of each member the decider ``me`` ranks, at progress not beyond its own (module
    docstring); members that copied since their last record are left out, unless that leaves the decider
    no other member with a finite score (then they count as :func:`copied_score` says).

    Examples:
        >>> me = Published(step=80, score=0.1, hyperparameters={}, history=((80, 0.1),))  # ran ahead, diverged
        >>> copied = Published(20, 0.6, {}, ((20, 0.6),), copied=True)  # copied (me) after scoring 0.6
        >>> sorted(comparable_scores(0, me, {1: copied, 2: Published(20, 0.5, {}, ((20, 0.5),))}))
        [0, 2]
        >>> comparable_scores(0, me, {1: copied})[1]
        Compared(progress=20, score=0.6)
    """
    progress = own.at
    compared = {me: Compared(progress, own.score if is_finite_score(own.score) else None)}
    for member, record in others.items():
        if not record.copied:
            compared[member] = _comparable(record, progress)
    if not any(seen.score is not None for member, seen in compared.items() if member != me):
        for member, record in others.items():  # never without a comparison: the members that copied come back
            seen = copied_score(record, progress, me) if record.copied else None
            if seen is not None:
                compared[member] = seen
    return compared


def _comparable(record: Published, progress: int) -> Compared:
    """A member that did not copy since its record, ranked at ``progress`` (module docstring)."""
    if not record.servable or not is_finite_score(record.score):
        return Compared(record.at, None)
    entry = score_at(record.history, progress)
    if entry is None:  # ahead beyond its kept history, or no history: the nearest score it has
        entry = min(record.history, default=(record.at, float(record.score)))  # type: ignore[arg-type]
    return Compared(int(entry[0]), float(entry[1]))


def copied_score(record: Published, progress: int, me: int | None = None) -> Compared | None:
    """What a member that copied since its record counts with when the decider ``me`` has nobody else to
    compare with: while it serves the snapshot it scored with, that score (at ``progress`` as any member);
    once it has snapshotted since, the score of the weights it copied (``held``), unless those are ``me``'s
    own (comparing with them is comparing with itself: a tie would make it copy a copy of itself);
    ``None`` when neither is known.

    Examples:
        >>> Published(20, 0.6, {}, ((20, 0.6),), copied=True).at  # serves what scored 0.6 at 20
        20
        >>> copied_score(Published(20, 0.6, {}, ((20, 0.6),), copied=True), progress=80)
        Compared(progress=20, score=0.6)
        >>> moved_on = Published(20, 0.6, {}, progress=36, ready_progress=20, copied=True, held=(30, 0.9, 2))
        >>> copied_score(moved_on, progress=80), copied_score(moved_on, progress=80, me=2)
        (Compared(progress=30, score=0.9), None)
    """
    if not record.servable:
        return None
    if record.at == record.scored_at:
        seen = _comparable(record, progress)
        return seen if seen.score is not None else None
    if record.held is not None and is_finite_score(record.held[1]) and record.held[2] != me:
        return Compared(int(record.held[0]), float(record.held[1]))
    return None


def held_by_copy(member: int, donor: Published) -> tuple[int, float, int] | None:
    """The ``(progress, score, origin)`` a copy of ``donor`` (member ``member``)'s latest snapshot holds, for
    the copier's ``held``: the score of its last ready step (at the progress it scored at), or, for a donor
    that copied and snapshotted since, what it holds itself; ``None`` when unknown.

    Examples:
        >>> held_by_copy(1, Published(40, 0.8, {}, ((40, 0.8),), progress=48, ready_progress=40))
        (40, 0.8, 1)
        >>> held_by_copy(1, Published(40, 0.2, {}, (), progress=48, ready_progress=40, copied=True, held=(56, 0.9, 3)))
        (56, 0.9, 3)
    """
    if donor.copied and donor.at != donor.scored_at:
        return donor.held
    return (donor.scored_at, float(donor.score), member) if is_finite_score(donor.score) else None  # type: ignore[arg-type]


def in_step(step: int, own: Published, others: Mapping[int, Published]) -> bool:
    """Whether the population is as lockstep would see it at the decider's ready ``step``: every other
    member has scored at a ready step at this very step and progress (lockstep's round, nobody ahead or
    behind in training through a copy), or stopped before it. A member that copied or was re-initialised
    since counts with the score it had while it still serves the snapshot it scored with; once it has
    taken a snapshot since, a loser would copy other weights than those lockstep's plan copies. Not when
    every other member stopped before: there is no round to share, and lockstep's plan, which ranks them
    without a score, would leave the decider nobody to copy, while they still serve their last snapshots.

    Examples:
        >>> own = Published(step=50, score=0.7, hyperparameters={})
        >>> copied = Published(50, None, {}, copied=True)  # copied a donor after scoring at step 50
        >>> on_ahead = Published(50, 0.9, {}, progress=58, ready_progress=50)  # an in-between snapshot since
        >>> stopped = Published(30, 0.8, {}, done=True)  # stopped at step 30
        >>> in_step(50, own, {1: copied, 2: on_ahead, 3: stopped})
        True
        >>> in_step(50, own, {1: Published(50, 0.8, {}), 2: Published(55, 0.9, {})})
        False
        >>> in_step(50, own, {1: Published(50, 0.8, {}, progress=58, ready_progress=50, copied=True)})
        False
        >>> in_step(50, own, {3: stopped})
        False
    """

    def counts(record: Published) -> bool:
        if not record.servable:
            return False
        if _stopped_before(record, step):
            return True
        same = record.step == step and record.scored_at == own.at
        return same and (not record.copied or record.at == record.scored_at)

    alone = bool(others) and all(_stopped_before(record, step) for record in others.values())
    return not alone and all(counts(record) for record in others.values())


def _stopped_before(record: Published, step: int) -> bool:
    """It stopped at an earlier ready step: lockstep ranks it without a score and never replaces it."""
    return record.done and record.step < step


def _plan_in_step(scheduler: PBTScheduler, me: int, step: int, records: Mapping[int, Published]) -> Decision:
    """The whole population's plan at ``step`` as lockstep makes it (``SynchronousReadySteps``), and ``me``'s
    part of it: the same snapshots (a member that stopped earlier has no score and is never replaced), the
    step's own random stream."""
    stopped = {member for member, record in records.items() if _stopped_before(record, step)}
    scores = {
        member: None if member in stopped or not is_finite_score(record.score) else record.score
        for member, record in records.items()
    }
    snapshots = [
        MemberSnapshot(
            member,
            scores[member],
            record.hyperparameters,
            tuple(score for _, score in record.history),
            can_exploit=member not in stopped,
        )
        for member, record in sorted(records.items())
    ]
    plan = scheduler.plan(step, snapshots, rng=scheduler.population_stream(step))[me]
    compared = {member: Compared(record.scored_at, scores[member]) for member, record in sorted(records.items())}
    return Decision(plan, compared, in_step=True)


def decide_alone(
    scheduler: PBTScheduler,
    me: int,
    step: int,
    own: Published,
    others: Mapping[int, Published],
    like_with_like: bool = True,
) -> Decision:
    """Member ``me``'s plan at its own ready ``step``; only ``me`` may exploit, the others may donate.

    ``like_with_like=False`` is the earlier rule (the fresh own score against every other member's
    latest record), kept so that the benchmarks measure both in the same code; it never plans in step.
    """
    records = {me: own, **others}
    if like_with_like and in_step(step, own, others):
        return _plan_in_step(scheduler, me, step, records)
    if like_with_like:
        compared = comparable_scores(me, own, others)
    else:
        compared = {me: Compared(step, own.score)}
        compared.update({m: Compared(r.at, r.score if r.servable else None) for m, r in others.items()})
    snapshots = [
        MemberSnapshot(
            member=member,
            score=record.score if member == me or record.servable else None,
            hyperparameters=record.hyperparameters,
            history=tuple(score for _, score in record.history),
            can_exploit=member == me,
            training=member == me or not record.done,
            step=step if member == me else record.step,
            ranked_score=compared[member].score,
        )
        for member, record in sorted(records.items())
        if member in compared
    ]
    return Decision(scheduler.plan(step, snapshots)[me], compared)
