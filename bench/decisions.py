"""7b. Asynchronous against lockstep decisions on the simulated tasks, at 100 paired seeds, with a noise band.

``quality`` and ``schedule`` compare the asynchronous mode with lockstep over 20 seeds, which cannot tell
a small difference from noise: two lockstep runs of the schedule task that differ only in the
scheduler's seed split 20 paired seeds anywhere from 7/13 to 15/5. This benchmark runs only the
simulated populations (:mod:`bench.simulate`, no Lightning, no process group: the decisions are the
library's own, ``PBTScheduler.plan`` in lockstep and :func:`lightning_pbt.algorithm.comparable.decide_alone`
asynchronously), which are cheap enough for ``SEEDS`` paired seeds, and adds the yardstick that the
targets' "within noise" needs:

- ``lockstep``: the reference, seeded as in ``quality`` and ``schedule``;
- ``lockstep_reseeded``: lockstep again on the same task (same data and noise streams) with the
  scheduler seeded ``RESEED`` higher (other initial values and explore draws): what a second run of
  the *same* method scores against the first, i.e. the noise band;
- ``async``: asynchronous at equal speeds (each interval jittered by ``exp(0.1 N(0, 1))``);
- ``async_stragglers``: asynchronous with the tasks' slow members 3x slower, at the wall time lockstep
  needs with them (lockstep's result is ``lockstep``'s: it waits);
- ``async_snapshots``: asynchronous at equal speeds with the callback's ``snapshot_every_n_train_steps`` at
  a quarter of the ready interval (``snapshot_every`` of :func:`bench.simulate.run_asynchronous`): a copy
  takes the donor's latest snapshot, at most a quarter interval old;
- ``async_snapshots_every_step``: the limit, a snapshot after every step (the donor's state at the moment
  of the copy). (With snapshots between ready steps, ``pbt_function``'s best accuracy also counts a
  donor's state when it is copied.)
- ``async_wait``, ``async_wait_snapshots``, ``async_stragglers_wait``: the same with ``wait=WAIT`` (the
  callback's ``wait_for_peers``): at equal speeds members then see the population in step and carry out
  lockstep's plan (:func:`lightning_pbt.algorithm.comparable.in_step`), so they tie lockstep seed for seed; with
  stragglers the fast members wait only until the stragglers have published one interval.

Tasks: Ray's ``pbt_function`` (4 members, 300 iterations; seeds whose best member passed the target,
best final accuracy), the paper's toy (2 members, 25 and 100 steps; best Q), and the schedule task (the
noisy quadratic model; 4 and 8 members, a ready step every 50 and 200 steps; excess risk of the member
with the best validation loss, lower is better). Every arm is paired by seed with ``lockstep``.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from typing import Any

from bench import pbt_function as pf
from bench import quality, schedule
from bench.common import clean_floats, spread
from bench.simulate import JITTER, fast_budget, run_asynchronous, run_lockstep

NAME = "decisions"
SEEDS = tuple(range(100))
RESEED = 1000
ARMS = (
    "lockstep",
    "lockstep_reseeded",
    "async",
    "async_stragglers",
    "async_snapshots",
    "async_snapshots_every_step",
    "async_wait",
    "async_wait_snapshots",
    "async_stragglers_wait",
)
WAIT = 1.0  # the wait arms' wait_for_peers: up to a whole interval (stragglers are not waited for)
TIE = 1e-9  # relative difference below which two arms' values tie (see paired)
TASKS = ("pbt_function", "toy_25", "toy_100", "schedule_4x50", "schedule_8x50", "schedule_4x200", "schedule_8x200")
SMOKE = {"seeds": (0, 1), "tasks": ("pbt_function", "toy_25", "schedule_4x50"), "schedule_steps": 300}


def snapshot_every(arm: str, ready: int) -> int | None:
    """The arm's ``snapshot_every``: a quarter of the ready interval, every step, or none."""
    if arm == "async_snapshots_every_step":
        return 1
    return max(1, ready // 4) if arm.endswith("snapshots") else None


def wait(arm: str) -> float | None:
    """The arm's ``wait`` (the callback's ``wait_for_peers``)."""
    return WAIT if "wait" in arm else None


def _pbt_function(seed: int, arm: str) -> dict[str, Any]:
    space = {"lr": pf.Uniform(pf.LOW, pf.HIGH)}
    scheduler_seed = seed + RESEED if arm == "lockstep_reseeded" else seed

    def make() -> pf.PBTScheduler:
        return pf.PBTScheduler(space, mode="max", seed=scheduler_seed)

    task = pf.PbtFunction(seed, pf.MEMBERS)
    starts = [make().initial_hyperparameters(m, {"lr": pf.START_LR}) for m in range(pf.MEMBERS)]
    if arm.startswith("lockstep"):
        result = run_lockstep(task, make, starts, pf.READY, pf.ITERATIONS)
    else:
        slow = set(pf.SLOW) if arm.startswith("async_stragglers") else set()
        result = run_asynchronous(
            task,
            make,
            starts,
            pf.READY,
            [
                pf.ITERATIONS
                if m in slow or not slow
                else fast_budget(pf.ITERATIONS, pf.SLOW_FACTOR, pf.READY, wait(arm))
                for m in range(pf.MEMBERS)
            ],
            [float(pf.SLOW_FACTOR) if m in slow else 1.0 for m in range(pf.MEMBERS)],
            seed,
            snapshot_every=snapshot_every(arm, pf.READY),
            wait=wait(arm),
        )
    return {"value": max(result["states"]), "reached": task.best > pf.TARGET, "exploits": result["exploits"]}


def _toy(seed: int, arm: str, steps: int) -> dict[str, Any]:
    toy = quality._load_toy()
    if arm.startswith("lockstep"):
        value = toy.run_toy(
            pbt=True,
            steps=steps,
            lr=toy.LR,
            ready=toy.READY,
            seed=seed + RESEED if arm == "lockstep_reseeded" else seed,
        )
    else:
        value = quality.run_toy_async(
            toy,
            seed,
            steps,
            "async_straggler" if arm.startswith("async_stragglers") else "async",
            snapshot_every=snapshot_every(arm, toy.READY),
            wait=wait(arm),
        )
    return {"value": value}


def _schedule(seed: int, arm: str, members: int, ready: int, steps: int) -> dict[str, Any]:
    task = schedule.Task(seed)
    if arm.startswith("lockstep"):
        result = schedule.run_population(
            task, members, steps, ready, "perturb", scheduler_seed=seed + RESEED if arm == "lockstep_reseeded" else None
        )
    else:
        result = schedule.run_asynchronous_population(
            task,
            members,
            steps,
            ready,
            arm.startswith("async_stragglers"),
            True,
            snapshot_every=snapshot_every(arm, ready),
            wait=wait(arm),
        )
    return {"value": result["excess_risk"], "exploits": result["exploits"]}


def run_one(job: tuple[str, int, str, int]) -> tuple[str, int, str, dict[str, Any]]:
    """One (task, seed, arm): its result."""
    task, seed, arm, schedule_steps = job
    if task == "pbt_function":
        return task, seed, arm, _pbt_function(seed, arm)
    if task.startswith("toy_"):
        return task, seed, arm, _toy(seed, arm, int(task.removeprefix("toy_")))
    members, ready = (int(x) for x in task.removeprefix("schedule_").split("x"))
    return task, seed, arm, _schedule(seed, arm, members, ready, schedule_steps)


def paired(a: list[float | None], b: list[float | None], higher_is_better: bool) -> dict[str, int]:
    """Wins, ties and losses of ``a`` against ``b``, seed by seed; a missing (diverged) value loses. Values
    within ``TIE`` (relative) tie: the schedule task's lockstep population trains its members as rows of
    one matrix, the simulations one member at a time, and the same run rounds differently in the last bits."""
    worst = -math.inf if higher_is_better else math.inf
    pairs = [(worst if x is None else x, worst if y is None else y) for x, y in zip(a, b, strict=True)]
    if not higher_is_better:
        pairs = [(-x, -y) for x, y in pairs]
    ties = [x == y or math.isclose(x, y, rel_tol=TIE) for x, y in pairs]
    return {
        "wins": sum(x > y and not tie for (x, y), tie in zip(pairs, ties, strict=True)),
        "ties": sum(ties),
        "losses": sum(x < y and not tie for (x, y), tie in zip(pairs, ties, strict=True)),
    }


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test over the decided pairs (ties dropped): the chance of a split at least this
    uneven between two arms that are equally good."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def summarise(task: str, per_arm: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    higher = not task.startswith("schedule")
    values = {arm: [r["value"] for r in rows] for arm, rows in per_arm.items()}
    out: dict[str, Any] = {"higher_is_better": higher, "arms": {}}
    for arm, rows in per_arm.items():
        finite = [v for v in values[arm] if v is not None]
        entry: dict[str, Any] = {"value": spread(finite), "missing": len(values[arm]) - len(finite)}
        if "exploits" in rows[0]:
            entry["exploits_per_run"] = spread([r["exploits"] for r in rows])
        if "reached" in rows[0]:
            entry["reached_target_seeds"] = sum(r["reached"] for r in rows)
        if arm != "lockstep":
            w = entry["vs_lockstep"] = paired(values[arm], values["lockstep"], higher)
            entry["sign_test_p"] = sign_test_p(w["wins"], w["losses"])
        out["arms"][arm] = entry
    return out


def run(smoke: bool = False, timeout: float = 600) -> dict[str, Any]:
    seeds = SMOKE["seeds"] if smoke else SEEDS
    tasks = SMOKE["tasks"] if smoke else TASKS
    steps = SMOKE["schedule_steps"] if smoke else schedule.STEPS
    jobs = [(task, seed, arm, steps) for task in tasks for arm in ARMS for seed in seeds]
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pending = pool.map_async(run_one, jobs, chunksize=4)
        results = pending.get(timeout=timeout)
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for task, _seed, arm, result in sorted(results, key=lambda r: (r[0], r[2], r[1])):
        by_task.setdefault(task, {}).setdefault(arm, []).append(result)
    return clean_floats(
        {
            "description": "asynchronous vs lockstep decisions on the simulated tasks, paired by seed, with a second "
            "lockstep run (the scheduler reseeded) as the noise band",
            "config": {
                "seeds": len(seeds),
                "first_seed": seeds[0],
                "reseed_offset": RESEED,
                "arms": list(ARMS),
                "jitter": f"exp({JITTER} N(0,1)) per interval",
                "schedule_steps": steps,
                "pbt_function": f"{pf.MEMBERS} members, ready every {pf.READY}, {pf.ITERATIONS} iterations, "
                f"target {pf.TARGET:g}; stragglers: members {list(pf.SLOW)} {pf.SLOW_FACTOR}x slower",
                "toy": f"2 members; stragglers: member 1 {quality.TOY_SLOW_FACTOR}x slower",
                "schedule": f"stragglers: the upper half of the members {schedule.SLOW_FACTOR}x slower",
                "wall_s": time.perf_counter() - started,
            },
            "tasks": {task: summarise(task, by_task[task]) for task in tasks},
        }
    )


def verdict(task: dict[str, Any], arm: str = "async") -> str:
    """The issue's target at equal speeds: no worse in median and at least 40 % of the decided pairs won."""
    entry, lock = task["arms"][arm], task["arms"]["lockstep"]
    sign = 1 if task["higher_is_better"] else -1
    w = entry["vs_lockstep"]
    decided = w["wins"] + w["losses"]
    median_ok = sign * (entry["value"]["median"] - lock["value"]["median"]) >= -TIE * abs(lock["value"]["median"])
    share_ok = decided == 0 or w["wins"] / decided >= 0.4
    return "met" if median_ok and share_ok else "missed"


__all__ = ["ARMS", "SEEDS", "TASKS", "paired", "run", "run_one", "sign_test_p", "summarise", "verdict"]


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(run(), indent=1))
