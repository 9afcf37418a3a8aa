"""The statistics of the applications table, in plain Python (no torch, no numpy): what people in the
field report for a comparison over paired seeds.

- :func:`median_iqr`: median and interquartile range (quartiles by linear interpolation between order
  statistics, numpy's default and ``statistics.quantiles(method="inclusive")``);
- :func:`paired_outcomes`: wins / ties / losses of one arm against another, seed by seed;
- :func:`sign_test`: the exact two-sided binomial test of wins against losses (ties dropped);
- :func:`wilcoxon_signed_rank`: the exact two-sided Wilcoxon signed-rank test of paired differences
  (zeros dropped, tied magnitudes given their average rank, the null distribution enumerated);
- :func:`separation`: whether a task can tell arms apart at all, by comparing the spread of the
  population's random configurations with the seed noise of one configuration (the pilot criterion).

Every function takes plain lists and returns plain numbers, so a test can check it against values
worked out by hand.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["SEPARATION_FACTOR", "median_iqr", "paired_outcomes", "separation", "sign_test", "wilcoxon_signed_rank"]

# The pilot criterion of the preregistered protocol: the 16 random configurations' interquartile range
# must be at least this many times that of one configuration trained with 16 seeds.
SEPARATION_FACTOR = 3.0


def median_iqr(values: Sequence[float | None]) -> dict[str, Any]:
    """Median, first and third quartile, interquartile range and count of the finite ``values``."""
    finite = sorted(float(v) for v in values if v is not None and math.isfinite(v))
    if not finite:
        return {"median": math.nan, "q1": math.nan, "q3": math.nan, "iqr": math.nan, "n": 0}
    if len(finite) == 1:
        q1 = q3 = finite[0]
    else:
        q1, _, q3 = statistics.quantiles(finite, n=4, method="inclusive")
    return {"median": statistics.median(finite), "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(finite)}


def paired_outcomes(
    ours: Sequence[float | None], theirs: Sequence[float | None], *, higher_is_better: bool, tolerance: float = 0.0
) -> dict[str, int]:
    """Wins, ties and losses of ``ours`` against ``theirs``, pair by pair.

    Two values within ``tolerance`` of each other (relative to the larger magnitude) tie; a missing or
    non-finite value (a diverged run) loses to a finite one, and two missing values tie.
    """
    counts = {"wins": 0, "ties": 0, "losses": 0}
    for a, b in zip(ours, theirs, strict=True):
        a_ok = a is not None and math.isfinite(a)
        b_ok = b is not None and math.isfinite(b)
        if not (a_ok and b_ok):
            counts["ties" if a_ok == b_ok else ("wins" if a_ok else "losses")] += 1
            continue
        if abs(a - b) <= tolerance * max(abs(a), abs(b)):
            counts["ties"] += 1
        elif (a > b) == higher_is_better:
            counts["wins"] += 1
        else:
            counts["losses"] += 1
    return counts


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the probability, with wins and losses equally likely, of a split at
    least as uneven as ``wins`` : ``losses`` (ties are left out before calling). 1.0 with no pairs."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilcoxon_signed_rank(differences: Sequence[float]) -> dict[str, Any]:
    """Exact two-sided Wilcoxon signed-rank test of paired differences (ours minus theirs).

    Zero differences are dropped (Wilcoxon's convention); equal magnitudes share their average rank. The
    null distribution of the positive rank sum is enumerated over every sign assignment (exact also with
    tied ranks), so the p-value is ``2 * min(P(T+ <= t), P(T+ >= t))``, capped at 1.

    Returns:
        ``{"n": pairs used, "w_plus": positive rank sum, "w_minus": negative rank sum, "p": p-value}``.
    """
    nonzero = [float(d) for d in differences if d != 0 and math.isfinite(d)]
    n = len(nonzero)
    if n == 0:
        return {"n": 0, "w_plus": 0.0, "w_minus": 0.0, "p": 1.0}
    ranks = _average_ranks([abs(d) for d in nonzero])
    w_plus = sum(r for r, d in zip(ranks, nonzero, strict=True) if d > 0)
    w_minus = sum(ranks) - w_plus
    # Ranks are multiples of 1/2: count sign assignments by twice the positive rank sum.
    doubled = [round(2 * r) for r in ranks]
    counts = [0] * (sum(doubled) + 1)
    counts[0] = 1
    for r in doubled:
        for total in range(len(counts) - 1, r - 1, -1):
            counts[total] += counts[total - r]
    t = round(2 * w_plus)
    below = sum(counts[: t + 1]) / 2**n
    above = sum(counts[t:]) / 2**n
    return {"n": n, "w_plus": w_plus, "w_minus": w_minus, "p": min(1.0, 2 * min(below, above))}


def _average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values``; a run of equal values gets the mean of the ranks it spans."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def separation(
    random_configurations: Sequence[float | None], seed_noise: Sequence[float | None],
    factor: float = SEPARATION_FACTOR,
) -> dict[str, Any]:
    """Can this task tell hyperparameters apart? The spread of one seed's random configurations (each
    trained once) against the spread of one configuration trained with different seeds.

    Returns both spreads (interquartile range and full range), their ratio, and ``separates``: the
    random configurations' IQR is at least ``factor`` times the seed noise's IQR (an IQR of 0 for the
    seed noise separates whenever the random configurations spread at all).
    """
    configurations, noise = median_iqr(random_configurations), median_iqr(seed_noise)
    ratio = configurations["iqr"] / noise["iqr"] if noise["iqr"] > 0 else (math.inf if configurations["iqr"] > 0
                                                                            else math.nan)
    return {
        "random_configurations": {**configurations, "range": _range(random_configurations)},
        "seed_noise": {**noise, "range": _range(seed_noise)},
        "iqr_ratio": ratio,
        "factor": factor,
        "separates": bool(configurations["iqr"] >= factor * noise["iqr"] and configurations["iqr"] > 0),
    }


def _range(values: Sequence[float | None]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return max(finite) - min(finite) if finite else math.nan
