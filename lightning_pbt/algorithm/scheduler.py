"""The PBT decision as a pure function of a population snapshot, the seed and the ready step.

No torch, no process group: the callback gathers one :class:`MemberSnapshot` per member, calls
:meth:`PBTScheduler.plan` on population rank 0 (or on every rank: same seed, same inputs, same plan)
and carries out the returned :class:`MemberPlan` s. A population's plan at a ready step draws from that
step's own random stream (:meth:`PBTScheduler.population_stream`), so that an asynchronous member that
sees the whole population at its step draws what lockstep draws; an asynchronous member deciding alone
draws from a running stream of its own. The state is that running stream (which of the two a member
uses) and, with ``explore="pb2"``, PB2's observation window (:mod:`lightning_pbt.algorithm.pb2`), saved by
:meth:`PBTScheduler.state_dict` so that a resumed run plans as the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_pbt.algorithm.exploit import ExploitRule, check_mode, is_finite_score, make_exploit_rule, rank_members
from lightning_pbt.algorithm.explore import Explorer
from lightning_pbt.algorithm.space import Domain, check_space_not_empty
from lightning_pbt.algorithm.space_config import space_from_config

if TYPE_CHECKING:
    from lightning_pbt.algorithm.pb2 import PB2

__all__ = [
    "EXPLORE_METHODS",
    "PLAN_EVENTS",
    "MemberPlan",
    "MemberSnapshot",
    "PBTScheduler",
    "check_burn_in",
    "check_explore_method",
]

PLAN_EVENTS = ("keep", "exploit", "rejuvenate")
EXPLORE_METHODS = ("perturb", "pb2")


def _pb2(space: Mapping[str, Domain], mode: str, explorer: Explorer) -> PB2:
    """PB2, imported here: it needs scipy, which nothing else does (the callback imports without it)."""
    try:
        from lightning_pbt.algorithm.pb2 import PB2
    except ImportError as error:
        raise ImportError(f"explore='pb2' needs scipy (pip install 'scipy>=1.10'): {error}") from error
    return PB2(space, mode, explorer)


def check_burn_in(burn_in: int) -> int:
    """``burn_in`` itself if it is an integer >= 0; a ValueError naming it otherwise.

    Args:
        burn_in: the global step before which no member exploits.

    Raises:
        ValueError: any other value.
    """
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"burn_in must be an integer >= 0, got {burn_in!r}")
    return burn_in


def check_explore_method(explore: str) -> str:
    """``explore`` itself if it is one of :data:`EXPLORE_METHODS`; a ValueError naming it otherwise.

    Args:
        explore: ``"perturb"`` or ``"pb2"``.

    Raises:
        ValueError: any other value.
    """
    if explore not in EXPLORE_METHODS:
        raise ValueError(f"explore must be one of {EXPLORE_METHODS}, got {explore!r}")
    return explore


_STATE_VERSION = 2  # 2: adds "explore" and PB2's observations; version 1 (the RNG only) still loads for perturb
# SeedSequence spawn keys: separate streams for the plans and for each member's initial values.
_PLAN_STREAM = 0
_INIT_STREAM = 1
_STEP_STREAM = 2


@dataclass(frozen=True)
class MemberSnapshot:
    """What the scheduler needs to know about one member at a ready step.

    ``history`` holds the member's recent scores, oldest first. It should describe the weights the member
    holds now: the caller clears it after an exploit or a rejuvenation (the t-test and rejuvenation read
    it). ``can_exploit=False`` marks a member that may donate but is never replaced (e.g. it has finished).
    ``step`` is the member's own step when the snapshot was taken; ``None`` means the plan's step (every
    member at the same step, as in synchronous mode). PB2 measures each member's progress between them.
    ``training``: whether the member still trains (PB2 learns only from those); ``None`` means
    ``can_exploit`` (in synchronous mode only stopped members may not be replaced, while an asynchronous
    member deciding alone marks every other member ``can_exploit=False`` although they train on).
    ``ranked_score``: what the exploit rule ranks, when it differs from ``score`` (asynchronous mode ranks
    members at comparable progress, see :mod:`lightning_pbt.algorithm.comparable`); ``None`` means ``score``. PB2
    always learns from ``score`` at ``step``.

    Attributes:
        member: the member's id.
        score: its score at this ready step (``None`` or non-finite: unknown or diverged).
        hyperparameters: the values it trained with.
        history: its recent scores, oldest first.
        can_exploit: whether it may be replaced.
        step: its own step (``None``: the plan's step).
        training: whether it still trains (``None``: ``can_exploit``).
        ranked_score: what the exploit rule ranks (``None``: ``score``).
    """

    member: int
    score: float | None
    hyperparameters: Mapping[str, Any]
    history: tuple[float, ...] = ()
    can_exploit: bool = True
    step: int | None = None
    training: bool | None = None
    ranked_score: float | None = None

    @property
    def is_training(self) -> bool:
        return self.can_exploit if self.training is None else self.training


@dataclass(frozen=True)
class MemberPlan:
    """What one member does at a ready step; ``hyperparameters`` are the values in effect afterwards.

    Attributes:
        member: the member's id.
        event: ``"keep"``, ``"exploit"`` or ``"rejuvenate"``.
        parent: the donor for an exploit; the member itself otherwise.
        hyperparameters: the values in effect after the step.
        mutations: what explore (or a rejuvenation) changed, as text.

    Raises:
        ValueError: an unknown event, or a ``parent`` other than ``member`` for a keep or rejuvenation.
    """

    member: int
    event: str
    parent: int
    hyperparameters: dict[str, Any]
    mutations: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.event not in PLAN_EVENTS:
            raise ValueError(f"MemberPlan: event must be one of {PLAN_EVENTS}, got {self.event!r}")
        if self.event != "exploit" and self.parent != self.member:
            raise ValueError(f"MemberPlan: a {self.event!r} plan has parent = member, got {self.parent}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for broadcasting with ``broadcast_object_list`` or logging)."""
        return {
            "member": self.member,
            "event": self.event,
            "parent": self.parent,
            "hyperparameters": dict(self.hyperparameters),
            "mutations": list(self.mutations),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemberPlan:
        return cls(
            member=int(data["member"]),
            event=str(data["event"]),
            parent=int(data["parent"]),
            hyperparameters=dict(data["hyperparameters"]),
            mutations=tuple(data.get("mutations", ())),
        )


class PBTScheduler:
    """Population Based Training decisions: who exploits whom, the explored values, rejuvenation.

    ``quantile_fraction`` configures truncation selection when ``exploit`` is a rule *name*; it is
    ignored by the other rules and when ``exploit`` is an already built :class:`ExploitRule`.
    ``rejuvenate_patience`` (see :meth:`should_rejuvenate`) re-initialises stagnant members' weights.
    ``explore``: ``"perturb"`` (the ``explorer``'s perturb/resample) or ``"pb2"``
    (:class:`~lightning_pbt.algorithm.pb2.PB2` proposes the continuous values, the ``explorer`` the choices
    and everything until PB2 has enough data).

    Pure: it knows nothing of torch or Lightning; the callback runs it on population rank 0 (synchronous
    mode) and broadcasts its plans and state. The schedule benchmark drives it directly.

    Args:
        space: ``{name: Domain}`` or config forms (see :func:`lightning_pbt.algorithm.space_config.space_from_config`).
        mode: ``"max"`` or ``"min"``.
        exploit: a rule name (``"truncation"``, ``"tournament"``, ``"ttest"``) or an
            :class:`~lightning_pbt.algorithm.exploit.ExploitRule`.
        explorer: the perturb/resample policy (default: ``Explorer(space)``); its space must be this one.
        burn_in: every member keeps before this step.
        rejuvenate_patience: ready steps without improvement before fresh weights (``None``: never).
        seed: seeds the plan stream and, per member, the initial values.
        quantile_fraction: truncation's quantile, when ``exploit`` is the name ``"truncation"``.
        explore: ``"perturb"`` or ``"pb2"``.

    Raises:
        ValueError: an empty space (the callback's message), any argument out of its range, an unknown
            rule or explore method, or an explorer over another space.

    Examples:
        >>> from lightning_pbt.algorithm.space import LogUniform
        >>> scheduler = PBTScheduler({"lr": LogUniform(1e-4, 1e-1)}, mode="max", seed=0)
        >>> values = {m: scheduler.initial_hyperparameters(m) for m in range(4)}
        >>> plans = scheduler.plan(100, [MemberSnapshot(m, s, values[m]) for m, s in enumerate([0.9, 0.2, 0.8, 0.7])])
        >>> [(m, p.event, p.parent) for m, p in plans.items()]
        [(0, 'keep', 0), (1, 'exploit', 0), (2, 'keep', 2), (3, 'keep', 3)]
    """

    def __init__(
        self,
        space: Mapping[str, Domain | Any],
        mode: str = "max",
        exploit: str | ExploitRule = "truncation",
        explorer: Explorer | None = None,
        burn_in: int = 0,
        rejuvenate_patience: int | None = None,
        seed: int = 0,
        quantile_fraction: float | None = None,
        explore: str = "perturb",
    ) -> None:
        self.space: dict[str, Domain] = check_space_not_empty(space_from_config(space))
        self.mode = check_mode(mode)
        options: dict[str, Any] = {}
        if isinstance(exploit, str) and exploit.strip().lower() == "truncation" and quantile_fraction is not None:
            options["quantile_fraction"] = quantile_fraction
        self.exploit = make_exploit_rule(exploit, **options)
        self.explorer = explorer if explorer is not None else Explorer(self.space)
        if set(self.explorer.space) != set(self.space):
            raise ValueError(
                f"explorer space {sorted(self.explorer.space)} differs from the scheduler's {sorted(self.space)}"
            )
        check_burn_in(burn_in)
        p = rejuvenate_patience
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ValueError(f"rejuvenate_patience must be None or an integer >= 1, got {p!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        check_explore_method(explore)
        self.explore_method = explore
        self.pb2: PB2 | None = _pb2(self.space, self.mode, self.explorer) if explore == "pb2" else None
        self.burn_in = burn_in
        self.rejuvenate_patience = p
        self.seed = seed
        self._rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PLAN_STREAM,)))
        self._member_stream: int | None = None  # set: plans draw from self._rng, not from their step's stream

    def use_member_stream(self, member: int) -> None:
        """Draw plans from a running random stream of ``member``'s own (asynchronous mode: a member deciding
        alone at its own steps, where one shared stream would make members' decisions correlated)."""
        self._rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_PLAN_STREAM, 1 + int(member))))
        self._member_stream = int(member)

    def population_stream(self, step: int) -> np.random.Generator:
        """The draws of the whole population's plan at ready ``step``: a function of ``(seed, step)`` alone,
        so that every member that plans the same step from the same snapshots draws the same."""
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_STEP_STREAM, int(step))))

    def initial_hyperparameters(self, member: int, start_values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Starting values of ``member``: a function of ``(seed, member)`` only, so they do not depend on
        the population size or on the plan stream; ``start_values`` (possibly partial) override them."""
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_INIT_STREAM, int(member))))
        values = {name: self.space[name].sample(rng) for name in sorted(self.space)}
        for name, value in (start_values or {}).items():
            if name not in self.space:
                raise ValueError(
                    f"start value for unknown hyperparameter '{name}' (the space has {sorted(self.space)})"
                )
            if not self.space[name].contains(value):
                raise ValueError(f"{name}: start value {value!r} is outside {self.space[name]!r}")
            values[name] = self.space[name].normalize(value)
        return {name: values[name] for name in self.space}

    def should_rejuvenate(self, history: Sequence[float]) -> bool:
        """Whether a history (oldest first) has stagnated.

        True when ``rejuvenate_patience`` is set, the history has more than ``patience`` entries, some
        finite score exists before the last ``patience`` entries, and none of the last ``patience``
        entries is strictly better (per mode) than the best of those earlier ones.
        """
        p = self.rejuvenate_patience
        if p is None or len(history) <= p:
            return False
        before = [float(v) for v in history[:-p] if is_finite_score(v)]
        if not before:
            return False
        recent = [float(v) for v in history[-p:] if is_finite_score(v)]
        if self.mode == "max":
            return not any(v > max(before) for v in recent)
        return not any(v < min(before) for v in recent)

    def plan(
        self, step: int, snapshots: Sequence[MemberSnapshot], rng: np.random.Generator | None = None
    ) -> dict[int, MemberPlan]:
        """One plan per member: ``keep``, ``exploit`` (copy ``parent`` then explore) or ``rejuvenate``.

        Before ``burn_in`` (``step < burn_in``) everyone keeps and no random number is drawn (PB2 still
        records observations). A member is rejuvenated only if it is eligible, neither a loser nor a donor
        in this step's exploit plan, not the best-ranked member, and :meth:`should_rejuvenate` holds for
        its history.

        Args:
            step: the ready step's global step.
            snapshots: one per member.
            rng: the draws; by default :meth:`population_stream` of ``step``, or the member's running
                stream after :meth:`use_member_stream`.

        Returns:
            ``{member: MemberPlan}`` for every member of ``snapshots``.

        Raises:
            ValueError: a member id twice in ``snapshots``.
        """
        by_member: dict[int, MemberSnapshot] = {}
        for snap in snapshots:
            if snap.member in by_member:
                raise ValueError(f"duplicate member id {snap.member} in the population snapshot")
            by_member[snap.member] = snap
        members = sorted(by_member)
        steps = {m: step if by_member[m].step is None else int(by_member[m].step) for m in members}  # type: ignore[arg-type]
        if self.pb2 is not None:
            for m in members:
                snap = by_member[m]
                if snap.is_training:
                    self.pb2.log.observe(m, steps[m], snap.score, snap.hyperparameters)
                else:  # a finished member does not train: a plan's step passing is no observation of it
                    self.pb2.log.restart(m, steps[m], None, snap.hyperparameters)
        keep = {m: MemberPlan(m, "keep", m, dict(by_member[m].hyperparameters)) for m in members}
        if step < self.burn_in or not members:
            return keep
        scores = {
            m: by_member[m].score if by_member[m].ranked_score is None else by_member[m].ranked_score for m in members
        }
        histories = {m: tuple(by_member[m].history) for m in members}
        if rng is None:
            rng = self._rng if self._member_stream is not None else self.population_stream(step)
        eligible = {m for m in members if by_member[m].can_exploit}
        losers = self.exploit.select(members, scores, histories, self.mode, rng, eligible)
        plans = dict(keep)
        order = sorted(losers)
        if self.pb2 is not None:
            running = [by_member[m].hyperparameters for m in members if m not in losers and by_member[m].is_training]
            requests = [(steps[m], by_member[losers[m]].hyperparameters) for m in order]
            explored = self.pb2.explore_batch(requests, running, rng)
        else:
            explored = [self.explorer.explore(by_member[losers[m]].hyperparameters, rng) for m in order]
        for loser, (values, mutations) in zip(order, explored, strict=True):
            plans[loser] = MemberPlan(loser, "exploit", losers[loser], values, tuple(mutations))
        if self.rejuvenate_patience is not None:
            protected = set(losers) | set(losers.values()) | set(rank_members(members, scores, self.mode)[:1])
            for m in members:
                if m in eligible and m not in protected and self.should_rejuvenate(histories[m]):
                    plans[m] = MemberPlan(
                        m, "rejuvenate", m, dict(by_member[m].hyperparameters), ("weights re-initialised",)
                    )
        if self.pb2 is not None:  # a copy's score change is not an observation: its next interval starts now
            for m in members:
                if plans[m].event == "exploit":
                    self.pb2.log.restart(m, steps[m], by_member[plans[m].parent].score, plans[m].hyperparameters)
                elif plans[m].event == "rejuvenate":
                    self.pb2.log.restart(m, steps[m], None, plans[m].hyperparameters)
        return {m: plans[m] for m in members}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (dicts, lists, ints, strs): safe for ``torch.load(weights_only=True)``."""
        rng = _plain_state(self._rng.bit_generator.state)
        pb2 = self.pb2.state_dict() if self.pb2 is not None else None
        return {
            "version": _STATE_VERSION, "seed": self.seed, "rng": rng, "explore": self.explore_method, "pb2": pb2,
            "member_stream": self._member_stream,  # None: plans draw from their step's stream (lockstep)
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the RNG (and PB2's observations) so that the next :meth:`plan` continues the saved run."""
        if not isinstance(state, Mapping) or "rng" not in state:
            raise ValueError(f"not a PBTScheduler state_dict: {state!r}")
        version = state.get("version")
        if version == 1 and self.explore_method != "perturb":
            raise ValueError(
                f"PBTScheduler state_dict version 1 predates explore={self.explore_method!r}; resume it with "
                "explore='perturb' or start a new run"
            )
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"PBTScheduler state_dict version {version!r} != {_STATE_VERSION}")
        saved = state.get("explore", "perturb")
        if saved != self.explore_method:
            raise ValueError(
                f"PBTScheduler state_dict was saved with explore={saved!r}, this scheduler uses "
                f"explore={self.explore_method!r}"
            )
        rng_state = _plain_state(state["rng"])
        expected = type(self._rng.bit_generator).__name__
        if rng_state.get("bit_generator") != expected:
            raise ValueError(f"state_dict holds a {rng_state.get('bit_generator')!r} generator, expected {expected!r}")
        if self.pb2 is not None:
            self.pb2.load_state_dict(state["pb2"])
        self._rng.bit_generator.state = rng_state
        if "member_stream" in state:  # an older state leaves the stream as the caller set it
            self._member_stream = state["member_stream"]


def _plain_state(value: Any) -> Any:
    """Deep copy into plain dict/list/int/str (numpy states may hold numpy ints or arrays)."""
    if isinstance(value, Mapping):
        return {str(k): _plain_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain_state(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
