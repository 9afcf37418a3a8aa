"""5. Schedules: a task where the best learning rate changes during training, at equal compute.

The task (the noisy quadratic model of Zhang et al. 2019, sampled rather than in expectation): linear
regression in ``DIM`` dimensions with input variances log-spaced from 1 to 1e-3, label noise 1, trained
by minibatch SGD (batch ``BATCH``) on fresh samples. A large learning rate makes fast progress on the
low-variance directions but leaves a noise floor proportional to the rate; a small one has a low floor
but never reaches those directions in ``STEPS`` steps. So a rate that decays wins, and no constant rate
can match it. Members are scored on a fixed validation set of ``VAL`` samples (noisy, as a real
validation loss is); the test metric is the exact excess risk ``(w - w*)^T S (w - w*)`` (lower is better)
of the member with the best final validation loss. The learning rate ranges over LogUniform(1e-3, 1);
rates above ~0.9 diverge (NaN scores, which PBT replaces).

The population is simulated in one process: members are rows of a weight matrix trained together,
each with its own stream of minibatches, and at every ready step (every ``ready`` steps) the library's own
``PBTScheduler`` (the code the callback runs) decides; an exploit copies the donor's weights (plain SGD
has no optimizer state). No process group, no Lightning: this measures search quality, not transport.

Arms, per seed (paired: the same task, validation set, initial rates and minibatch streams):

- PBT: truncation 25 %, perturb x0.8 / x1.2, resample 25 % (the callback's defaults);
- PB2: the same with ``explore="pb2"``;
- random search: the same population and initial rates, no exploit;
- cosine: every member with a cosine decay from the grid's best rate to 0 (uses the grid's result);
- grid: ``len(GRID)`` constant rates log-spaced over the range, one run each, the best by final
  validation loss: an oracle that costs ``len(GRID) / members`` times the others' compute;
- asynchronous PBT (:mod:`bench.simulate`, the callback's ``synchronous=False`` decision): ``pbt_async``
  at equal speeds, ``pbt_async_stragglers`` with the upper half of the members ``SLOW_FACTOR``x slower at
  the wall time lockstep needs with them (lockstep waits for the stragglers, so its result is ``pbt``'s;
  the fast members train ``SLOW_FACTOR``x the steps); ``*_old_rule``: the same with the earlier decision
  rule (``like_with_like=False``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from bench.common import clean_floats, spread
from bench.simulate import JITTER

NAME = "schedule"
SEEDS = tuple(range(20))
SETTINGS = ((4, 50), (8, 50), (4, 200), (8, 200))  # (members, ready interval in steps)
STEPS = 2000
DIM, BATCH, VAL, NOISE = 32, 4, 1024, 1.0
LOW, HIGH = 1e-3, 1.0
GRID = tuple(float(v) for v in np.logspace(math.log10(LOW), math.log10(HIGH), 16))
ARMS = ("pbt", "pb2", "random_search", "cosine", "grid", "pbt_async", "pbt_async_old_rule", "pbt_async_stragglers",
        "pbt_async_stragglers_old_rule")
SMOKE = {"seeds": (0, 1), "settings": ((4, 50),), "steps": 300}
SLOW_FACTOR = 3
ASYNC_ARMS = {  # name: (stragglers, like_with_like)
    "pbt_async": (False, True),
    "pbt_async_old_rule": (False, False),
    "pbt_async_stragglers": (True, True),
    "pbt_async_stragglers_old_rule": (True, False),
}


class Task:
    """One seed's regression problem: true weights, input scales and a fixed validation set."""

    def __init__(self, seed: int) -> None:
        g = np.random.default_rng([seed, 0])
        self.seed = seed
        self.scales = np.sqrt(np.logspace(0, -3, DIM))
        self.w_star = g.normal(size=DIM)
        self.x_val = g.normal(size=(VAL, DIM)) * self.scales
        self.y_val = self.x_val @ self.w_star + NOISE * g.normal(size=VAL)

    def val_loss(self, w: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.mean((w @ self.x_val.T - self.y_val) ** 2, axis=1)

    def excess_risk(self, w: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.sum((self.scales * (w - self.w_star)) ** 2, axis=1)


class Population:
    """``members`` SGD runs advanced together; row ``m`` draws its minibatches from its own stream."""

    def __init__(self, task: Task, members: int) -> None:
        self.task = task
        self.w = np.zeros((members, DIM))
        self._data = [np.random.default_rng([task.seed, 1, m]) for m in range(members)]

    def train(self, lrs: np.ndarray, steps: int) -> None:
        task = self.task
        for _ in range(steps):
            z = np.stack([g.standard_normal((BATCH, DIM + 1)) for g in self._data])
            x = z[:, :, :DIM] * task.scales
            y = x @ task.w_star + NOISE * z[:, :, DIM]
            with np.errstate(all="ignore"):
                residual = np.einsum("mbd,md->mb", x, self.w) - y
                self.w = self.w - lrs[:, None] * np.einsum("mbd,mb->md", x, residual) / BATCH

    def best(self) -> dict[str, Any]:
        """The member with the best final validation loss: its test excess risk, and the population's mean."""
        val = self.task.val_loss(self.w)
        risk = self.task.excess_risk(self.w)
        finite = np.isfinite(val) & np.isfinite(risk)
        if not finite.any():
            return {"member": None, "val_loss": None, "excess_risk": None, "mean_excess_risk": None}
        best = int(np.argmin(np.where(finite, val, np.inf)))
        return {
            "member": best,
            "val_loss": float(val[best]),
            "excess_risk": float(risk[best]),
            "mean_excess_risk": float(np.mean(np.where(finite, risk, np.nan)[finite])),
        }


def run_population(
    task: Task, members: int, steps: int, ready: int, explore: str | None, scheduler_seed: int | None = None
) -> dict[str, Any]:
    """PBT (``explore`` = "perturb" or "pb2") or, with ``explore=None``, random search; the scheduler's
    seed (initial rates, explore) is the task's unless ``scheduler_seed`` is given."""
    from lightning_pbt.algorithm.scheduler import MemberSnapshot, PBTScheduler
    from lightning_pbt.algorithm.space import LogUniform

    seed = task.seed if scheduler_seed is None else scheduler_seed
    scheduler = PBTScheduler({"lr": LogUniform(LOW, HIGH)}, mode="min", seed=seed, explore=explore or "perturb")
    lrs = np.array([scheduler.initial_hyperparameters(m)["lr"] for m in range(members)])
    schedules = [[(0, float(lr))] for lr in lrs]  # per member: (step, lr) whenever it changes
    population = Population(task, members)
    exploits, proposals, decide_s = 0, 0, 0.0
    for step in range(ready, steps, ready):
        population.train(lrs, ready)
        if explore is None:
            continue
        val = task.val_loss(population.w)
        snaps = [
            MemberSnapshot(m, float(val[m]) if math.isfinite(val[m]) else None, {"lr": float(lrs[m])})
            for m in range(members)
        ]
        started = time.perf_counter()
        plans = scheduler.plan(step, snaps)
        decide_s += time.perf_counter() - started
        parents = [plans[m].parent for m in range(members)]
        population.w = population.w[parents].copy()
        schedules = [list(schedules[p]) for p in parents]
        for m in range(members):
            new = float(plans[m].hyperparameters["lr"])
            exploits += plans[m].event == "exploit"
            proposals += any(text.endswith("(pb2)") for text in plans[m].mutations)
            if new != schedules[m][-1][1]:
                schedules[m].append((step, new))
            lrs[m] = new
    population.train(lrs, steps - (steps - 1) // ready * ready)
    result = population.best()
    if result["member"] is not None:
        result["schedule"] = schedules[result["member"]]
    result.update(
        exploits=exploits,
        pb2_proposals=proposals,
        decide_s=decide_s,
        start_lrs=sorted(float(s[0][1]) for s in schedules) if explore is None else None,
    )
    return result


class MemberTask:
    """The task for :mod:`bench.simulate`, one member at a time: its state is its weight vector; member
    ``m`` draws its minibatches from the same stream as row ``m`` of :class:`Population`."""

    def __init__(self, task: Task, members: int) -> None:
        self.task = task
        self._data = [np.random.default_rng([task.seed, 1, m]) for m in range(members)]

    def start(self, member: int) -> np.ndarray:
        return np.zeros(DIM)

    def train(self, member: int, w: np.ndarray, hyperparameters: dict[str, float], steps: int) -> np.ndarray:
        task, g, lr = self.task, self._data[member], float(hyperparameters["lr"])
        with np.errstate(all="ignore"):
            for _ in range(steps):
                z = g.standard_normal((BATCH, DIM + 1))
                x = z[:, :DIM] * task.scales
                y = x @ task.w_star + NOISE * z[:, DIM]
                w = w - lr * (x.T @ (x @ w - y)) / BATCH
        return w

    def score(self, w: np.ndarray) -> float | None:
        loss = float(self.task.val_loss(w[None, :])[0])
        return loss if math.isfinite(loss) else None

    def copy(self, w: np.ndarray) -> np.ndarray:
        return w.copy()


def run_asynchronous_population(
    task: Task, members: int, steps: int, ready: int, stragglers: bool, like_with_like: bool,
    snapshot_every: int | None = None, wait: float | None = None,
) -> dict[str, Any]:
    """PBT (perturb) with asynchronous ready steps; ``stragglers``: the upper half of the members are
    ``SLOW_FACTOR``x slower and the others train ``SLOW_FACTOR``x the steps (equal wall time with lockstep,
    which waits for them; fewer when they idle ``wait`` of each interval, see ``fast_budget``)."""
    from bench.simulate import fast_budget, run_asynchronous
    from lightning_pbt.algorithm.scheduler import PBTScheduler
    from lightning_pbt.algorithm.space import LogUniform

    def make() -> PBTScheduler:
        return PBTScheduler({"lr": LogUniform(LOW, HIGH)}, mode="min", seed=task.seed)

    slow = set(range(members // 2, members)) if stragglers else set()
    result = run_asynchronous(
        MemberTask(task, members),
        make,
        [make().initial_hyperparameters(m) for m in range(members)],
        ready,
        [steps if m in slow else fast_budget(steps, SLOW_FACTOR, ready, wait) if stragglers else steps
         for m in range(members)],
        [float(SLOW_FACTOR) if m in slow else 1.0 for m in range(members)],
        task.seed,
        like_with_like=like_with_like,
        snapshot_every=snapshot_every,
        wait=wait,
    )
    w = np.stack(result["states"])
    val, risk = task.val_loss(w), task.excess_risk(w)
    finite = np.isfinite(val) & np.isfinite(risk)
    if not finite.any():
        return {"member": None, "val_loss": None, "excess_risk": None, "mean_excess_risk": None,
                "exploits": result["exploits"]}
    best = int(np.argmin(np.where(finite, val, np.inf)))
    return {"member": best, "val_loss": float(val[best]), "excess_risk": float(risk[best]),
            "mean_excess_risk": float(np.mean(risk[finite])), "exploits": result["exploits"],
            "steps": result["steps"]}


def lr_at(schedule: list[tuple[int, float]], step: int) -> float:
    return [lr for s, lr in schedule if s <= step][-1]


def run_fixed(task: Task, lr_of_step: Any, members: int, steps: int) -> dict[str, Any]:
    """Members trained with ``lr_of_step(step) -> (members,)`` rates, no exploit."""
    population = Population(task, members)
    for step in range(steps):
        population.train(np.asarray(lr_of_step(step), dtype=float), 1)
    return population.best()


def run_seed(seed: int, members: int, steps: int, ready: int) -> dict[str, Any]:
    task = Task(seed)
    grid = run_fixed(task, lambda _: np.array(GRID), len(GRID), steps)
    best_lr = GRID[grid["member"]]
    grid.update(lr=best_lr)
    cosine = run_fixed(
        task, lambda s: np.full(members, best_lr * 0.5 * (1 + math.cos(math.pi * s / steps))), members, steps
    )
    cosine.update(peak_lr=best_lr)
    entry = {
        "seed": seed,
        "grid": grid,
        "cosine": cosine,
        "random_search": run_population(task, members, steps, ready, None),
        "pbt": run_population(task, members, steps, ready, "perturb"),
        "pb2": run_population(task, members, steps, ready, "pb2"),
        **{
            arm: run_asynchronous_population(task, members, steps, ready, stragglers, like_with_like)
            for arm, (stragglers, like_with_like) in ASYNC_ARMS.items()
        },
    }
    for arm in ("pbt", "pb2"):
        schedule = entry[arm].get("schedule")
        if schedule:
            entry[arm]["lr_at"] = {f"{q}%": lr_at(schedule, int(steps * q / 100)) for q in (10, 50, 90)}
            # One line in the JSON: "step:lr" whenever the best member's rate changed
            entry[arm]["schedule"] = " ".join(f"{step}:{lr:.4g}" for step, lr in schedule)
    entry["random_search"].pop("schedule", None)  # a constant: start_lrs has it
    return entry


def _wins(a: list[float | None], b: list[float | None]) -> dict[str, int]:
    """Lower is better; a missing (diverged) result loses to any finite one."""

    def key(v: float | None) -> float:
        return math.inf if v is None else v

    pairs = [(key(x), key(y)) for x, y in zip(a, b, strict=True)]
    return {
        "wins": sum(x < y for x, y in pairs),
        "ties": sum(x == y for x, y in pairs),
        "losses": sum(x > y for x, y in pairs),
    }


def summarise(per_seed: list[dict[str, Any]], steps: int, ready: int) -> dict[str, Any]:
    risk = {arm: [e[arm]["excess_risk"] for e in per_seed] for arm in ARMS}
    summary: dict[str, Any] = {}
    for arm in ARMS:
        finite = [v for v in risk[arm] if v is not None]
        ratios = [v / g for v, g in zip(risk[arm], risk["grid"], strict=True) if v is not None and g]
        summary[arm] = {
            "excess_risk": spread(finite),
            "ratio_to_grid": spread(ratios),
            "diverged_seeds": len(risk[arm]) - len(finite),
            "mean_member_excess_risk": spread(
                [e[arm]["mean_excess_risk"] for e in per_seed if e[arm]["mean_excess_risk"] is not None]
            ),
        }
    for arm in ("pbt", "pb2"):
        summary[arm]["lr_at"] = {
            q: spread([e[arm]["lr_at"][q] for e in per_seed if "lr_at" in e[arm]]) for q in ("10%", "50%", "90%")
        }
        summary[arm]["decide_ms_per_ready_step"] = spread(
            [1000 * e[arm]["decide_s"] / max(1, len(range(ready, steps, ready))) for e in per_seed]
        )
    summary["grid"]["lr"] = spread([e["grid"]["lr"] for e in per_seed])
    for arm in ("pbt", *ASYNC_ARMS):
        summary[arm]["exploits_per_run"] = spread([e[arm]["exploits"] for e in per_seed])
    pairs = [
        ("pb2", "pbt"),
        ("pb2", "random_search"),
        ("pbt", "random_search"),
        ("pb2", "grid"),
        ("pbt", "grid"),
        ("pb2", "cosine"),
        ("pbt", "cosine"),
        ("cosine", "grid"),
        *((arm, "pbt") for arm in ASYNC_ARMS),
        ("pbt_async", "pbt_async_old_rule"),
    ]
    wins = {f"{a}_vs_{b}": _wins(risk[a], risk[b]) for a, b in pairs}
    return {"summary": summary, "wins": wins}


def run(smoke: bool = False, timeout: float = 600) -> dict[str, Any]:
    seeds = SMOKE["seeds"] if smoke else SEEDS
    settings = SMOKE["settings"] if smoke else SETTINGS
    steps = SMOKE["steps"] if smoke else STEPS
    started = time.perf_counter()
    rows = []
    for members, ready in settings:
        per_seed = []
        for seed in seeds:
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"bench/schedule.py ran past {timeout:.0f} s")
            per_seed.append(run_seed(seed, members, steps, ready))
        rows.append({"members": members, "ready": ready, "per_seed": per_seed, **summarise(per_seed, steps, ready)})
    return clean_floats(
        {
            "description": "search quality where the best learning rate changes during training (noisy quadratic "
            "model, SGD): test excess risk of the member with the best final validation loss, at "
            "equal compute, paired by seed; the population runs in-process with the library's "
            "PBTScheduler",
            "config": {
                "seeds": list(seeds),
                "settings": [list(x) for x in settings],
                "steps": steps,
                "dim": DIM,
                "batch": BATCH,
                "val_samples": VAL,
                "label_noise": NOISE,
                "input_variances": "log-spaced from 1 to 1e-3",
                "space": f"lr ~ LogUniform({LOW}, {HIGH})",
                "grid": list(GRID),
                "pbt": "truncation 0.25, perturb (0.8, 1.2), resample 0.25, mode min",
                "pb2": "the same with explore='pb2'",
                "cosine": "lr(t) = grid's best lr * (1 + cos(pi t / steps)) / 2, every member",
                "compute": f"members x {steps} steps for every arm but the grid ({len(GRID)} x {steps}) and the "
                "asynchronous stragglers (equal wall time)",
                "asynchronous": f"bench/simulate.py, jitter exp({JITTER} N(0,1)) per interval; stragglers: the upper "
                f"half of the members {SLOW_FACTOR}x slower, the others {SLOW_FACTOR}x the steps",
            },
            "rows": rows,
        }
    )
