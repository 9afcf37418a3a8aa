"""Ray Tune's ``pbt_function`` toy, simulated: accuracy grows only under the right learning-rate schedule.

The dynamics of Ray's ``python/ray/tune/examples/pbt_function.py`` (re-implemented, numpy streams per
member): each iteration the optimal rate is a triangle wave of the current accuracy (0.001 at 0, 0.01
at ``MIDPOINT``, back to 0.001 at twice that); within a factor ``Q_TOLERANCE`` of it accuracy grows by
``random() / q_err``, a rate too high by more than that loses ``(q_err - Q_TOLERANCE) * random()``, too
low gains nothing; Gaussian noise (sd ``NOISE``) is added and accuracy is clipped at 0. Ray's example
settings: lr starts at 1e-4 for every member (too low: only PBT gets it moving), resampled from
Uniform(1e-4, 0.02); a ready step every ``READY`` iterations, ``ITERATIONS`` iterations, target accuracy
> ``TARGET``. Population ``MEMBERS``; the library's default exploit/explore (truncation 25 %, perturb
x0.8 / x1.2, resample 25 %).

Arms, paired by seed (same member streams): lockstep; asynchronous at equal speeds; asynchronous with
the earlier decision rule (``like_with_like=False``); asynchronous with ``SLOW`` members ``SLOW_FACTOR``x
slower at the wall time lockstep needs with those stragglers (the fast members train ``SLOW_FACTOR``x
the iterations; the lockstep arm's result is unchanged by stragglers, it just waits). Reported per arm:
seeds whose best member passed ``TARGET`` at some ready step, the best final accuracy, exploits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bench.common import spread
from bench.simulate import run_asynchronous, run_lockstep
from lightning_pbt.algorithm.scheduler import PBTScheduler
from lightning_pbt.algorithm.space import Uniform

__all__ = ["ARMS", "PbtFunction", "run_pbt_function_benchmark", "step"]

MEMBERS, READY, ITERATIONS, TARGET = 4, 5, 300, 200.0
START_LR, LOW, HIGH = 1e-4, 1e-4, 0.02
MIDPOINT, Q_TOLERANCE, NOISE = 100.0, 3.0, 2.0
SLOW, SLOW_FACTOR = (2, 3), 3
ARMS = ("lockstep", "async", "async_old_rule", "async_stragglers", "async_stragglers_old_rule")


def step(accuracy: float, lr: float, noise: np.random.Generator) -> float:
    """One iteration of Ray's dynamics: the accuracy after training at ``lr`` (``noise``: the member's stream)."""
    optimal = 0.01 * accuracy / MIDPOINT if accuracy < MIDPOINT else 0.01 - 0.01 * (accuracy - MIDPOINT) / MIDPOINT
    optimal = min(0.01, max(0.001, optimal))
    q_err = max(lr, optimal) / min(lr, optimal)
    if q_err < Q_TOLERANCE:
        accuracy += noise.random() / q_err
    elif lr > optimal:
        accuracy -= (q_err - Q_TOLERANCE) * noise.random()
    return max(0.0, accuracy + NOISE * noise.normal())


class PbtFunction:
    """The task for :mod:`bench.simulate`: a member's state is its accuracy; its noise is its own stream."""

    def __init__(self, seed: int, members: int) -> None:
        self.streams = [np.random.default_rng([seed, 3, m]) for m in range(members)]
        self.best = 0.0  # the best accuracy any member reached at a ready step or the end

    def start(self, member: int) -> float:
        return 0.0

    def train(self, member: int, state: float, hyperparameters: Mapping[str, Any], steps: int) -> float:
        accuracy = float(state)
        for _ in range(steps):
            accuracy = step(accuracy, float(hyperparameters["lr"]), self.streams[member])
        self.best = max(self.best, accuracy)
        return accuracy

    def score(self, state: float) -> float:
        return float(state)

    def copy(self, state: float) -> float:
        return float(state)


def run_seed(seed: int, iterations: int = ITERATIONS) -> dict[str, Any]:
    space = {"lr": Uniform(LOW, HIGH)}

    def make() -> PBTScheduler:
        return PBTScheduler(space, mode="max", seed=seed)

    starts = [make().initial_hyperparameters(m, {"lr": START_LR}) for m in range(MEMBERS)]
    even, mixed = [1.0] * MEMBERS, [float(SLOW_FACTOR) if m in SLOW else 1.0 for m in range(MEMBERS)]
    budgets = [iterations if m in SLOW else iterations * SLOW_FACTOR for m in range(MEMBERS)]
    entry: dict[str, Any] = {"seed": seed}
    for arm in ARMS:
        task = PbtFunction(seed, MEMBERS)
        if arm == "lockstep":
            result = run_lockstep(task, make, starts, READY, iterations)
        else:
            stragglers = arm.startswith("async_stragglers")
            result = run_asynchronous(
                task,
                make,
                starts,
                READY,
                budgets if stragglers else [iterations] * MEMBERS,
                mixed if stragglers else even,
                seed,
                like_with_like=not arm.endswith("old_rule"),
            )
        entry[arm] = {
            "best": task.best,
            "final_best": max(result["states"]),
            "reached": task.best > TARGET,
            "exploits": result["exploits"],
        }
    return entry


def run_pbt_function_benchmark(seeds: tuple[int, ...], iterations: int = ITERATIONS) -> dict[str, Any]:
    per_seed = [run_seed(seed, iterations) for seed in seeds]
    summary = {
        arm: {
            "reached_target_seeds": sum(e[arm]["reached"] for e in per_seed),
            "final_best": spread([e[arm]["final_best"] for e in per_seed]),
            "exploits_per_run": spread([e[arm]["exploits"] for e in per_seed]),
        }
        for arm in ARMS
    }

    def wins(a: str, b: str) -> dict[str, int]:
        pairs = [(e[a]["final_best"], e[b]["final_best"]) for e in per_seed]
        return {
            "wins": sum(x > y for x, y in pairs),
            "ties": sum(x == y for x, y in pairs),
            "losses": sum(x < y for x, y in pairs),
        }

    return {
        "config": {
            "members": MEMBERS,
            "ready": READY,
            "iterations": iterations,
            "target": TARGET,
            "start_lr": START_LR,
            "space": f"lr ~ Uniform({LOW}, {HIGH})",
            "slow_members": list(SLOW),
            "slow_factor": SLOW_FACTOR,
            "seeds": list(seeds),
            "source": "dynamics of ray python/ray/tune/examples/pbt_function.py",
        },
        "per_seed": per_seed,
        "summary": summary,
        "wins": {f"{a}_vs_lockstep": wins(a, "lockstep") for a in ARMS[1:]}
        | {"async_vs_async_old_rule": wins("async", "async_old_rule")},
    }
