"""PB2 explore (Parker-Holder et al., NeurIPS 2020): a time-varying GP bandit proposes a loser's new values.

Random perturbation needs many members to find good values by chance; PB2 instead fits a Gaussian
process to the population's history of *(time, hyperparameters) -> score change per step* and gives a
loser the continuous values that maximise an upper confidence bound (GP-UCB) at the current time.

What is modelled, and how (the choices the paper leaves open are documented here):

- Observations: for each member, the score change per optimizer step between two successive snapshots
  in which that member's own step advanced, attributed to the hyperparameters it trained with in between
  and to the step at which that interval *began* (a proposal is queried at the step where its interval
  begins). Scores are oriented so that larger is better (``mode="min"`` negates them). A member that
  copied a donor starts its next interval from the donor's score; a rejuvenated member (fresh weights,
  no score) starts it at its next snapshot. Only the most recent ``max_observations`` are kept.
- Inputs: continuous hyperparameters scaled to [0, 1] (``LogUniform`` in log space; ``IntUniform`` is
  treated as continuous and rounded to the nearest integer afterwards); time in units of the median
  interval length of the window. ``Choice`` values are not modelled: they keep the perturb/resample
  explore, and so does everything until the window holds ``min_observations`` observations (default
  ``max(4, 2 * (continuous dimensions + 1))``) whose values are not all equal.
- Kernel (the paper's time-varying squared exponential): ``k = s2 * exp(-|x - x'|^2 / (2 l^2)) *
  (1 - eps)^(|t - t'| / 2)``, plus noise; ``s2, l, eps`` and the noise are fitted by maximum marginal
  likelihood (L-BFGS-B with analytic gradients) on standardised targets, the first time from two fixed
  starting points, then from the previous fit (kept in the state), so a ready step costs a few
  iterations rather than a full search (~10-100 ms with 256 observations on one CPU core).
- Acquisition: ``mean + kappa * std`` with ``kappa = sqrt(0.2 + max(0, log(0.4 n)))`` (``n`` the number
  of observations, as in the authors' implementation in Ray Tune), maximised inside [0, 1]^d by
  multi-start L-BFGS-B from the best of 256 random points plus the donor's values.
- Batches (after GP-BUCB, Desautels et al. 2014): the values every other member trains with next, and
  the proposals already made in this plan, are added as pending inputs at the current time. They
  shrink the posterior standard deviation around them (it does not depend on the unknown outcomes)
  while the mean uses real observations only, so several losers in one plan spread out instead of
  colliding. Unlike GP-BUCB, pending inputs are conditioned on without observation noise, so the
  standard deviation vanishes at them even when the fitted noise is large.

Pure: numpy + scipy, an explicit RNG, state as plain JSON-able data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import linalg, optimize
from scipy.spatial.distance import cdist

from lightning_pbt.algorithm.exploit import check_mode, is_finite_score
from lightning_pbt.algorithm.explore import Explorer, format_value
from lightning_pbt.algorithm.space import Choice, Domain, IntUniform, LogUniform, Uniform

__all__ = ["DEFAULT_MAX_OBSERVATIONS", "PB2", "Observation", "ObservationLog", "TimeVaryingGP", "continuous_names"]

DEFAULT_MAX_OBSERVATIONS = 256
_CANDIDATES = 256  # random points scored before the local searches
_STARTS = 5  # local searches (L-BFGS-B) per proposal
# Kernel parameters (log s2, log l, eps, log noise): bounds and starting points of the likelihood fit.
_BOUNDS = ((math.log(0.05), math.log(20.0)), (math.log(0.05), math.log(2.0)), (1e-3, 0.9), (math.log(1e-4), 0.0))
_THETA_STARTS = ((0.0, math.log(0.3), 0.1, math.log(0.1)), (0.0, math.log(1.0), 0.01, math.log(0.5)))


def continuous_names(space: Mapping[str, Domain]) -> list[str]:
    """The hyperparameters PB2 models (every domain but ``Choice``), sorted.

    Args:
        space: ``{name: Domain}``.

    Examples:
        >>> from lightning_pbt.algorithm.space import Choice, IntUniform, LogUniform
        >>> continuous_names({"lr": LogUniform(1e-4, 0.1), "act": Choice(["relu", "gelu"]), "layers": IntUniform(1, 4)})
        ['layers', 'lr']
    """
    return sorted(name for name, domain in space.items() if not isinstance(domain, Choice))


def _to_unit(domain: Domain, value: Any) -> float:
    if isinstance(domain, LogUniform):
        return (math.log(float(value)) - math.log(domain.low)) / (math.log(domain.high) - math.log(domain.low))
    if isinstance(domain, (Uniform, IntUniform)):  # halved first: high - low may overflow for +-1e308 bounds
        return (float(value) / 2 - domain.low / 2) / (domain.high / 2 - domain.low / 2)
    raise TypeError(f"PB2 does not model {domain!r}")


def _from_unit(domain: Domain, u: float) -> Any:
    """The domain's value at ``u`` in [0, 1], always inside the domain (clipped after rounding errors)."""
    u = min(max(float(u), 0.0), 1.0)
    if isinstance(domain, LogUniform):
        value = math.exp(math.log(domain.low) + u * (math.log(domain.high) - math.log(domain.low)))
        return float(min(max(value, domain.low), domain.high))
    if isinstance(domain, IntUniform):
        return int(min(max(round(domain.low + u * (domain.high - domain.low)), domain.low), domain.high))
    if isinstance(domain, Uniform):
        return float(min(max(domain.low * (1.0 - u) + domain.high * u, domain.low), domain.high))
    raise TypeError(f"PB2 does not model {domain!r}")


@dataclass(frozen=True)
class Observation:
    """One member's training interval: ``improvement`` is the oriented score change per step.

    Attributes:
        member: the member that trained.
        start: the member's step when the interval began (the time the GP sees).
        end: its step when the interval ended.
        values: the continuous hyperparameters it trained with, in :func:`continuous_names` order.
        improvement: the score change per step, oriented so that larger is better.
    """

    member: int
    start: int
    end: int
    values: tuple[float, ...]  # the continuous hyperparameters, in ``continuous_names`` order
    improvement: float


class ObservationLog:
    """Turns successive member snapshots into :class:`Observation` s (see the module docstring).

    Args:
        space: ``{name: Domain}``; only its continuous hyperparameters are recorded.
        mode: ``"max"`` or ``"min"`` (``"min"`` negates score changes).
        max_observations: how many of the most recent observations are kept.

    Raises:
        ValueError: a bad ``mode`` or ``max_observations`` below 1.
    """

    def __init__(
        self, space: Mapping[str, Domain], mode: str = "max", max_observations: int = DEFAULT_MAX_OBSERVATIONS
    ) -> None:
        if isinstance(max_observations, bool) or not isinstance(max_observations, int) or max_observations < 1:
            raise ValueError(f"max_observations must be an integer >= 1, got {max_observations!r}")
        self.names = continuous_names(space)
        self.sign = 1.0 if check_mode(mode) == "max" else -1.0
        self.max_observations = max_observations
        self.observations: list[Observation] = []
        # member -> [start step, oriented start score or None, continuous values]
        self._open: dict[int, tuple[int, float | None, tuple[float, ...]]] = {}

    def _values(self, hyperparameters: Mapping[str, Any]) -> tuple[float, ...]:
        return tuple(float(hyperparameters[name]) for name in self.names)

    def _oriented(self, score: float | None) -> float | None:
        return self.sign * float(score) if is_finite_score(score) else None  # type: ignore[arg-type]

    def observe(self, member: int, step: int, score: float | None, hyperparameters: Mapping[str, Any]) -> None:
        """A member's snapshot: closes its open interval into an observation when its step advanced."""
        values, now = self._values(hyperparameters), self._oriented(score)
        opened = self._open.get(member)
        if opened is not None and step == opened[0]:
            return  # the same snapshot again (asynchronous callers): nothing new
        if (
            opened is not None
            and step > opened[0]
            and opened[2] == values
            and opened[1] is not None
            and now is not None
        ):
            start, before, _ = opened
            rate = (now - before) / (step - start)
            if math.isfinite(rate):  # scores near the float limits can overflow
                self.observations.append(Observation(member, start, step, values, rate))
                del self.observations[: -self.max_observations]
        self._open[member] = (int(step), now, values)

    def restart(self, member: int, step: int, score: float | None, hyperparameters: Mapping[str, Any]) -> None:
        """A new interval after an exploit (``score``: the donor's) or a rejuvenation (``None``)."""
        self._open[member] = (int(step), self._oriented(score), self._values(hyperparameters))

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "open": {str(m): [s, v, list(x)] for m, (s, v, x) in sorted(self._open.items())},
            "observations": [[o.member, o.start, o.end, list(o.values), o.improvement] for o in self.observations],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or not {"names", "open", "observations"} <= set(state):
            raise ValueError(f"not a PB2 observation state: {state!r}")
        if list(state["names"]) != self.names:
            raise ValueError(f"PB2 state models {state.get('names')!r}, this space has {self.names!r}")
        self._open = {
            int(m): (int(s), None if v is None else float(v), tuple(map(float, x)))
            for m, (s, v, x) in state["open"].items()
        }
        self.observations = [
            Observation(int(m), int(s), int(e), tuple(map(float, x)), float(y))
            for m, s, e, x, y in state["observations"]
        ][-self.max_observations :]


class TimeVaryingGP:
    """GP regression with the time-varying kernel, fitted by maximum marginal likelihood (scipy).

    Args:
        x: inputs, shape ``(n, d)``, in [0, 1].
        t: times, shape ``(n,)``.
        y: targets, shape ``(n,)`` (standardised inside).
        start: a previous fit's :attr:`theta` to start the likelihood search from (else two fixed
            starting points).
    """

    def __init__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray, start: Sequence[float] | None = None) -> None:
        """Fit on inputs ``x`` (n, d) in [0, 1], times ``t`` (n,) and targets ``y`` (n,); ``start``: a previous
        fit's :attr:`theta` to start the likelihood search from (else two fixed starting points)."""
        self.x, self.t = np.asarray(x, float), np.asarray(t, float)
        y = np.asarray(y, float)
        self.y_mean, self.y_std = float(y.mean()), float(y.std())
        self.y = (y - self.y_mean) / (self.y_std if self.y_std > 0 else 1.0)
        self._sq = cdist(self.x, self.x, "sqeuclidean")
        self._dt = np.abs(self.t[:, None] - self.t[None, :])
        # A previous fit is usually close (the window changed by one plan), so one search from it is enough;
        # the first fixed point replaces it when it is already more likely (a previous fit gone stale).
        starts: Sequence[Any] = _THETA_STARTS
        if start is not None:
            starts = [min((np.clip(start, *np.array(_BOUNDS).T), np.array(_THETA_STARTS[0])), key=self._nll_only)]
        fits = [optimize.minimize(self._nll, np.array(s), jac=True, method="L-BFGS-B", bounds=_BOUNDS) for s in starts]
        self.theta = np.array(min(fits, key=lambda r: (float(r.fun), tuple(r.x))).x)
        self._chol = linalg.cho_factor(self._gram(self.theta)[1], lower=True)
        self._alpha = linalg.cho_solve(self._chol, self.y)

    @staticmethod
    def kernel(theta: np.ndarray, xa: np.ndarray, ta: np.ndarray, xb: np.ndarray, tb: np.ndarray) -> np.ndarray:
        return TimeVaryingGP._kernel(theta, cdist(xa, xb, "sqeuclidean"), np.abs(ta[:, None] - tb[None, :]))

    @staticmethod
    def _kernel(theta: np.ndarray, sq: np.ndarray, dt: np.ndarray) -> np.ndarray:
        s2, length, eps = math.exp(theta[0]), math.exp(theta[1]), float(theta[2])
        return s2 * np.exp(-sq / (2.0 * length**2) + 0.5 * math.log1p(-eps) * dt)

    def _gram(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The kernel matrix of the observations, and the same plus the noise."""
        k = self._kernel(theta, self._sq, self._dt)
        return k, k + (math.exp(theta[3]) + 1e-8) * np.eye(len(self.y))

    def _nll_only(self, theta: np.ndarray) -> float:
        return self._nll(theta)[0]

    def _nll(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Negative log marginal likelihood and its gradient in (log s2, log l, eps, log noise)."""
        k, gram = self._gram(theta)
        try:
            chol = linalg.cho_factor(gram, lower=True)
        except linalg.LinAlgError:
            return 1e25, np.zeros(4)
        alpha = linalg.cho_solve(chol, self.y)
        nll = (
            0.5 * float(self.y @ alpha)
            + float(np.sum(np.log(np.diag(chol[0]))))
            + 0.5 * len(self.y) * math.log(2 * math.pi)
        )
        # d nll / d theta_i = -1/2 tr((alpha alpha^T - K^-1) dK/dtheta_i)
        inverse, info = linalg.lapack.dpotri(chol[0], lower=1)  # K^-1 from the factor (lower triangle)
        if info != 0:
            return 1e25, np.zeros(4)
        inverse = np.tril(inverse)
        inverse += inverse.T - np.diag(np.diag(inverse))
        inner = np.outer(alpha, alpha) - inverse
        weighted = inner * k
        length, eps = math.exp(theta[1]), float(theta[2])
        grad = -0.5 * np.array(
            [
                np.sum(weighted),
                np.sum(weighted * self._sq) / length**2,
                -0.5 * np.sum(weighted * self._dt) / (1.0 - eps),
                math.exp(theta[3]) * np.trace(inner),
            ]
        )
        return nll, grad

    def mean(self, x: np.ndarray, t: float) -> np.ndarray:
        """Posterior mean (standardised units) at the points ``x`` and time ``t``."""
        x = np.atleast_2d(x)
        return self.kernel(self.theta, x, np.full(len(x), t), self.x, self.t) @ self._alpha

    def acquisition(self, t: float, kappa: float, pending: np.ndarray) -> Any:
        """``x -> mean + kappa * std`` at time ``t``; the std is conditioned also on ``pending`` inputs."""
        xs, ts = self.x, self.t
        noise = np.full(len(self.y), math.exp(self.theta[3]) + 1e-8)
        if len(pending):
            xs, ts = np.vstack([xs, pending]), np.concatenate([ts, np.full(len(pending), t)])
            noise = np.concatenate([noise, np.full(len(pending), 1e-6)])  # noise-free: the std vanishes there
        chol = linalg.cholesky(self.kernel(self.theta, xs, ts, xs, ts) + np.diag(noise), lower=True)
        prior = math.exp(self.theta[0])

        def ucb(x: np.ndarray) -> np.ndarray:
            x = np.atleast_2d(x)
            ks = self.kernel(self.theta, x, np.full(len(x), t), xs, ts)
            v = linalg.solve_triangular(chol, ks.T, lower=True)
            std = np.sqrt(np.maximum(prior - np.sum(v * v, axis=0), 1e-12))
            return ks[:, : len(self.y)] @ self._alpha + kappa * std

        return ucb


class PB2:
    """Proposes losers' continuous values with GP-UCB; ``fallback`` explores the rest (and everything
    until there is enough data). Holds the :class:`ObservationLog` the scheduler feeds.

    Args:
        space: ``{name: Domain}`` with at least one continuous hyperparameter.
        mode: ``"max"`` or ``"min"``.
        fallback: explores the choices, and everything until the model has data (default:
            ``Explorer(space)``); it must not have a ``custom_explore``.
        max_observations: the window of most recent observations the GP is fitted on.
        min_observations: observations needed before the GP proposes (default
            ``max(4, 2 * (continuous hyperparameters + 1))``), at least 2.

    Raises:
        ValueError: a space of choices only, a fallback with ``custom_explore``, or a bad count.
    """

    def __init__(
        self,
        space: Mapping[str, Domain],
        mode: str = "max",
        fallback: Explorer | None = None,
        max_observations: int = DEFAULT_MAX_OBSERVATIONS,
        min_observations: int | None = None,
    ) -> None:
        self.space = dict(space)
        self.names = continuous_names(self.space)
        if not self.names:
            raise ValueError(
                "explore='pb2' needs at least one continuous hyperparameter (Uniform, LogUniform or IntUniform); "
                f"the space has only choices: {sorted(self.space)}"
            )
        self.fallback = fallback if fallback is not None else Explorer(self.space)
        if self.fallback.custom_explore is not None:
            raise ValueError("explore='pb2' and custom_explore exclude each other: choose one")
        default_min = max(4, 2 * (len(self.names) + 1))
        if min_observations is not None and (
            isinstance(min_observations, bool) or not isinstance(min_observations, int) or min_observations < 2
        ):
            raise ValueError(f"min_observations must be None or an integer >= 2, got {min_observations!r}")
        self.min_observations = default_min if min_observations is None else min_observations
        self.log = ObservationLog(self.space, mode, max_observations)
        self.theta: list[float] | None = None  # the last fit's kernel parameters: the next fit starts there

    def model(self) -> tuple[TimeVaryingGP, float] | None:
        """The GP on the current window and its time unit (steps), or ``None`` without enough data."""
        obs = self.log.observations
        if len(obs) < self.min_observations:
            return None
        y = np.array([o.improvement for o in obs])
        if not np.all(np.isfinite(y)) or float(np.ptp(y)) <= 1e-12 * max(1.0, float(np.max(np.abs(y)))):
            return None
        unit = float(max(np.median([o.end - o.start for o in obs]), 1))
        x = np.array([self._unit(o.values) for o in obs])
        gp = TimeVaryingGP(x, np.array([o.start for o in obs]) / unit, y, start=self.theta)
        self.theta = [float(v) for v in gp.theta]
        return gp, unit

    def _unit(self, values: Sequence[float]) -> list[float]:
        return [_to_unit(self.space[name], v) for name, v in zip(self.names, values, strict=True)]

    def explore_batch(
        self,
        requests: Sequence[tuple[int, Mapping[str, Any]]],
        running: Sequence[Mapping[str, Any]],
        rng: np.random.Generator,
    ) -> list[tuple[dict[str, Any], list[str]]]:
        """New values for each ``(step, donor's hyperparameters)`` request, in order.

        ``running``: the values other members train with next (pending inputs, see the module docstring).
        Each result is ``(values, mutations)`` like :meth:`Explorer.explore`; PB2's values say ``(pb2)``.
        """
        results = [self.fallback.explore(hyperparameters, rng) for _, hyperparameters in requests]
        fitted = self.model() if requests else None
        if fitted is None:
            return results
        gp, unit = fitted
        kappa = math.sqrt(0.2 + max(0.0, math.log(0.4 * len(gp.y))))
        pending = [self._unit([float(h[n]) for n in self.names]) for h in running]
        out = []
        for (step, donor), (values, mutations) in zip(requests, results, strict=True):
            point = self._maximise(
                gp,
                step / unit,
                kappa,
                np.array(pending).reshape(-1, len(self.names)),
                np.array(self._unit([float(donor[n]) for n in self.names])),
                rng,
            )
            values = dict(values)
            by_name = dict(zip(sorted(self.space), mutations, strict=True))  # one per name, in sorted order
            for name, u in zip(self.names, point, strict=True):
                values[name] = _from_unit(self.space[name], u)
                by_name[name] = f"{name}: {format_value(donor[name])} -> {format_value(values[name])} (pb2)"
            pending.append(self._unit([float(values[n]) for n in self.names]))
            out.append((values, [by_name[name] for name in sorted(by_name)]))
        return out

    @staticmethod
    def _maximise(
        gp: TimeVaryingGP, t: float, kappa: float, pending: np.ndarray, donor: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """argmax of the UCB in [0, 1]^d: best random candidates refined by L-BFGS-B."""
        dims = len(donor)
        ucb = gp.acquisition(t, kappa, pending)
        candidates = np.vstack([donor[None, :], rng.random((_CANDIDATES, dims))])
        scores = ucb(candidates)
        starts = candidates[np.argsort(-scores, kind="stable")[:_STARTS]]
        best_x, best = candidates[int(np.argmax(scores))], float(np.max(scores))
        for start in starts:
            res = optimize.minimize(
                lambda x: -float(ucb(x[None, :])[0]), start, method="L-BFGS-B", bounds=[(0.0, 1.0)] * dims
            )
            if np.all(np.isfinite(res.x)) and -float(res.fun) > best:
                best_x, best = np.clip(res.x, 0.0, 1.0), -float(res.fun)
        return best_x

    def state_dict(self) -> dict[str, Any]:
        return {**self.log.state_dict(), "theta": self.theta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.log.load_state_dict(state)
        theta = state.get("theta")
        self.theta = None if theta is None else [float(v) for v in theta]
