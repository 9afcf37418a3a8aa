"""The toy example of Jaderberg et al. 2017 (Fig. 2), on the pure core only (numpy, no torch).

Two members start at theta = [0.9, 0.9] with h = [1, 0] and [0, 1]. The true objective is
Q = 1.2 - (theta0^2 + theta1^2), but each member ascends its surrogate Qhat = 1.2 - (h0 theta0^2 +
h1 theta1^2), so with a fixed h a member only shrinks one coordinate: the best Q of grid search tends
to 1.2 - 0.81 = 0.39. With PBT, every ``READY`` steps the members are scored with Q; truncation selection
(population 2: the worse copies the better) copies theta and h, and the explorer perturbs h by x0.8 / x1.2
or resamples it (probability 0.25: a multiplicative perturbation cannot move h_i away from 0).

Parameters used: ``STEPS = 100`` gradient steps, learning rate ``LR = 0.05``, ``READY = 4``, seed 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from lightning_pbt.algorithm.scheduler import MemberSnapshot, PBTScheduler
from lightning_pbt.algorithm.space import Uniform

STEPS, LR, READY, SEED = 100, 0.05, 4, 0


def true_q(theta: np.ndarray) -> float:
    return float(1.2 - np.sum(theta**2))


def run_toy(pbt: bool, steps: int = STEPS, lr: float = LR, ready: int = READY, seed: int = SEED) -> float:
    """Simulate the toy; returns the best Q over members and over training (the paper's y axis)."""
    scheduler = PBTScheduler({"h0": Uniform(0.0, 1.0), "h1": Uniform(0.0, 1.0)}, mode="max", seed=seed)
    theta = [np.array([0.9, 0.9]), np.array([0.9, 0.9])]
    hps = [{"h0": 1.0, "h1": 0.0}, {"h0": 0.0, "h1": 1.0}]
    best = max(true_q(t) for t in theta)
    for step in range(1, steps + 1):
        for m in range(2):
            h = np.array([hps[m]["h0"], hps[m]["h1"]])
            theta[m] = theta[m] + lr * (-2.0 * h * theta[m])  # gradient ascent on Qhat
        best = max(best, *(true_q(t) for t in theta))
        if pbt and step % ready == 0:
            snaps = [MemberSnapshot(m, true_q(theta[m]), hps[m]) for m in range(2)]
            plans = scheduler.plan(step, snaps)
            new_theta = [theta[plans[m].parent].copy() for m in range(2)]
            theta = new_theta
            hps = [dict(plans[m].hyperparameters) for m in range(2)]
    return best


@pytest.mark.parametrize("seed", range(5))
def test_pbt_reaches_the_optimum(seed: int) -> None:
    assert run_toy(pbt=True, seed=seed) >= 1.18


def test_grid_search_stays_near_one_coordinate_optimum() -> None:
    q = run_toy(pbt=False)
    assert q < 0.45
    assert q > 0.3


def test_toy_is_deterministic() -> None:
    assert run_toy(pbt=True) == run_toy(pbt=True)
