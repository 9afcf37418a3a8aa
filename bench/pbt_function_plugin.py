"""Ray's ``pbt_function`` through the plugin: lockstep, asynchronous, asynchronous + wait, paired by seed.

The simulator (:mod:`bench.pbt_function`, :mod:`bench.decisions`) takes the library's decisions but
not its timing; this benchmark takes the path a user's run takes. Four members of one rank each
(``PopulationStrategy`` + ``PopulationBasedTraining``, forked ranks, 2 cores) train a LightningModule
whose whole state is a buffer holding Ray's "accuracy": each training step applies one iteration of
:func:`bench.pbt_function.step` at the optimizer's current ``lr`` with the member's own noise stream
(``np.random.default_rng([seed, 3, member])``, as in the simulator; never copied by an exploit), so an
exploit copies the accuracy (the weights) and the ``lr`` (a hyperparameter) over the plugin's real
transfer. Ray's settings: every member starts at lr 1e-4, space ``Uniform(1e-4, 0.02)``, a ready step
(validation) every 5 steps, 300 steps, target accuracy 200; the library's default exploit/explore.

Steps take what Lightning takes for a step that computes almost nothing (about a millisecond): the
fast end of natural step times, where the asynchronous mode's members drift apart most. No padding.

Arms (each seed runs all three, in alternating order ABC / CBA):

- ``lockstep``: ``synchronous=True`` (deterministic given the seed);
- ``async``: ``synchronous=False``, the default asynchronous mode;
- ``async_wait``: ``synchronous=False, wait_for_peers=1.0``.

Per seed and arm: the best accuracy any member had at a ready step or the end, whether it passed the
target, the best member's final accuracy, exploits, and (asynchronous arms) the share of decisions
taken with every peer at the same step and the mean wait. Targets (issue 33): ``async`` reaches the
target on at least lockstep's count of seeds minus one, its median best final accuracy within 3 % of
lockstep's; ``async_wait`` reaches the target on at least as many seeds as lockstep and takes >= 80 %
of its decisions in step.

Worker: ``torchrun --standalone --nproc_per_node=4 -m bench.pbt_function_plugin '<json>'``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench import pbt_function as pf
from bench.common import SCRATCH, clean_floats, launch, median, spread, worker_config

NAME = "pbt_function_plugin"
ARMS = {"lockstep": {"synchronous": True}, "async": {"synchronous": False},
        "async_wait": {"synchronous": False, "wait_for_peers": 1.0}}
FULL = {"seeds": tuple(range(300, 310)), "iterations": pf.ITERATIONS}  # seeds no decision rule was tuned on
SMOKE = {"seeds": (300,), "iterations": 40}
IN_STEP_TARGET = 0.8
MEDIAN_TOLERANCE = 0.03


# -- the launcher side ----------------------------------------------------------------------------
def run(smoke: bool = False, timeout: float = 300, seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    size = SMOKE if smoke else FULL
    seeds = tuple(seeds or size["seeds"])
    root = SCRATCH / f"{NAME}{'_smoke' if smoke else ''}"
    shutil.rmtree(root, ignore_errors=True)
    per_seed = []
    for index, seed in enumerate(seeds):
        entry: dict[str, Any] = {"seed": seed}
        for arm in list(ARMS) if index % 2 == 0 else list(reversed(ARMS)):
            out = root / f"seed{seed}_{arm}"
            started = time.perf_counter()
            launch("bench.pbt_function_plugin", pf.MEMBERS,
                   {"out": str(out), "seed": seed, "iterations": size["iterations"], **ARMS[arm]}, timeout,
                   root / f"seed{seed}_{arm}.log")
            entry[arm] = summarise_run(out) | {"launch_s": time.perf_counter() - started}
        per_seed.append(entry)
    return clean_floats(summarise(per_seed, size["iterations"], smoke))


def summarise_run(out: Path) -> dict[str, Any]:
    """One launch: the population's best accuracy, the best final one, exploits, decisions in step."""
    members = [json.loads(p.read_text()) for p in sorted(out.glob("member_*.json"))]
    if len(members) != pf.MEMBERS:
        raise RuntimeError(f"{out}: {len(members)} of {pf.MEMBERS} members wrote a result")
    lines = [json.loads(x) for x in (out / "pbt" / "lineage.jsonl").read_text().splitlines() if x.strip()]
    # the last ready step decides nothing (no exploit at the end of training)
    decisions = [x for x in lines if x["event"] != "init" and not x["extra"].get("done") and not x["extra"].get("last")]
    timed = [x for x in decisions if "in_step" in x["extra"]]
    best = max(m["best"] for m in members)
    return {
        "best": best,
        "reached": best > pf.TARGET,
        "final_best": max(m["final"] for m in members),
        "exploits": sum(1 for x in lines if x["event"] == "exploit"),
        "decisions": len(decisions),
        "in_step": sum(bool(x["extra"]["in_step"]) for x in timed) / len(timed) if timed else None,
        "mean_wait_ms": 1e3 * sum(x["extra"].get("waited_s", 0.0) for x in timed) / len(timed) if timed else None,
        "ms_per_step": median(1e3 * m["fit_s"] / m["steps"] for m in members),  # fit time, ready steps included
    }


def summarise(per_seed: list[dict[str, Any]], iterations: int, smoke: bool) -> dict[str, Any]:
    def reached(arm: str) -> int:
        return sum(e[arm]["reached"] for e in per_seed)

    def final(arm: str) -> float:
        return median(e[arm]["final_best"] for e in per_seed)

    def wins(a: str, b: str) -> dict[str, int]:
        pairs = [(e[a]["final_best"], e[b]["final_best"]) for e in per_seed]
        return {"wins": sum(x > y for x, y in pairs), "ties": sum(x == y for x, y in pairs),
                "losses": sum(x < y for x, y in pairs)}

    arms = {arm: {"reached_target_seeds": reached(arm), "best": spread([e[arm]["best"] for e in per_seed]),
                  "final_best": spread([e[arm]["final_best"] for e in per_seed]),
                  "exploits_per_run": spread([e[arm]["exploits"] for e in per_seed]),
                  "in_step": spread([e[arm]["in_step"] for e in per_seed]) if arm != "lockstep" else None,
                  "mean_wait_ms": spread([e[arm]["mean_wait_ms"] for e in per_seed]) if arm != "lockstep" else None,
                  "ms_per_step": spread([e[arm]["ms_per_step"] for e in per_seed]),
                  "launch_s": spread([e[arm]["launch_s"] for e in per_seed])} for arm in ARMS}
    lockstep_median = final("lockstep")
    relative = (final("async") - lockstep_median) / lockstep_median if lockstep_median else float("nan")
    wait_in_step = arms["async_wait"]["in_step"]["median"]
    applies = not smoke
    return {
        "description": "Ray's pbt_function through the plugin (4 members x 1 rank, natural step times, no padding): "
                       "lockstep, asynchronous and asynchronous with wait_for_peers=1.0, paired by seed",
        "config": {"members": pf.MEMBERS, "ready": pf.READY, "iterations": iterations, "target": pf.TARGET,
                   "start_lr": pf.START_LR, "space": f"lr ~ Uniform({pf.LOW}, {pf.HIGH})",
                   "seeds": [e["seed"] for e in per_seed], "arms": {k: dict(v) for k, v in ARMS.items()},
                   "task": "a LightningModule whose state is Ray's accuracy (a buffer), one iteration of "
                           "bench.pbt_function.step per training step at the optimizer's lr"},
        "per_seed": per_seed,
        "arms": arms,
        "wins": {f"{arm}_vs_lockstep": wins(arm, "lockstep") for arm in ("async", "async_wait")},
        "targets": {
            "async_reached": {"target": f">= lockstep's {reached('lockstep')} - 1", "value": reached("async"),
                              "met": reached("async") >= reached("lockstep") - 1, "applies": applies},
            "async_median": {"target": f"within {MEDIAN_TOLERANCE:.0%} of lockstep's median best final accuracy",
                             "value": relative, "met": abs(relative) <= MEDIAN_TOLERANCE, "applies": applies},
            "async_wait_reached": {"target": f">= lockstep's {reached('lockstep')}", "value": reached("async_wait"),
                                   "met": reached("async_wait") >= reached("lockstep"), "applies": applies},
            "async_wait_in_step": {"target": f"median >= {IN_STEP_TARGET:.0%} of decisions in step",
                                   "value": wait_in_step, "met": (wait_in_step or 0.0) >= IN_STEP_TARGET,
                                   "applies": applies},
        },
    }


# -- the worker (a Lightning run) -----------------------------------------------------------------
def worker(cfg: dict[str, Any] | None = None) -> None:
    import numpy as np
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_pbt import PopulationBasedTraining, PopulationStrategy, Uniform
    from lightning_pbt.plugin.strategy import member_id_from_env

    cfg = worker_config(cfg)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    seed, member, iterations = int(cfg["seed"]), member_id_from_env(), int(cfg["iterations"])

    class RayAccuracy(pl.LightningModule):
        """Ray's pbt_function as a module: the accuracy is the state an exploit copies."""

        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(()))  # an optimizer needs a parameter; the task has no gradient
            self.register_buffer("accuracy", torch.zeros((), dtype=torch.float64))
            self.noise = np.random.default_rng([seed, 3, member])
            self.best = 0.0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.accuracy.fill_(pf.step(float(self.accuracy), lr, self.noise))
            return self.unused * 0.0

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.best = max(self.best, float(self.accuracy))
            self.log("accuracy", self.accuracy.float())

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=pf.START_LR)

    pbt = PopulationBasedTraining({"lr": Uniform(pf.LOW, pf.HIGH)}, monitor="accuracy", mode="max",
                                  every_n_train_steps=pf.READY, seed=seed, start_hyperparameters={"lr": pf.START_LR},
                                  dirpath=str(out / "pbt"), synchronous=cfg["synchronous"],
                                  wait_for_peers=cfg.get("wait_for_peers"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=PopulationStrategy(timeout=120),
        max_steps=iterations, max_epochs=None, val_check_interval=pf.READY, check_val_every_n_epoch=None,
        limit_val_batches=1, default_root_dir=str(out), callbacks=[pbt], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    model = RayAccuracy()
    started = time.perf_counter()
    trainer.fit(model, DataLoader(TensorDataset(torch.zeros(iterations, 1)), batch_size=1),
                DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1))
    fit_s = time.perf_counter() - started
    final = float(model.accuracy)
    (out / f"member_{member}.json").write_text(json.dumps({
        "member": member, "best": max(model.best, final), "final": final, "steps": trainer.global_step,
        "fit_s": fit_s, "lr": trainer.optimizers[0].param_groups[0]["lr"],
    }))


if __name__ == "__main__":
    worker()


def render_section(r: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: one row per arm, then the targets."""
    cfg, arms = r["config"], r["arms"]
    out = ["", "## Ray's pbt_function through the plugin: lockstep vs asynchronous (natural step times)", "",
           f"`{r['command']}`, {r['date']}. {pf.MEMBERS} members x 1 rank, {cfg['iterations']} steps, a ready step "
           f"every {cfg['ready']}, seeds {cfg['seeds'][0]}-{cfg['seeds'][-1]} (never used to tune a rule), no "
           "padding. Best accuracy: the population's best at a ready step or the end; final: the best member's "
           "at the end.", "",
           "| arm | seeds > 200 | best final accuracy, median (IQR) | exploits per run | decisions in step | "
           "mean wait ms | ms per step | launch s |", "|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        f = a["final_best"]
        in_step = f"{a['in_step']['median']:.0%}" if a.get("in_step") else "all (lockstep)"
        wait = f"{a['mean_wait_ms']['median']:.1f}" if a.get("mean_wait_ms") else "-"
        out.append(f"| {name.replace('_', ' + ') if name == 'async_wait' else name} | {a['reached_target_seeds']} of "
                   f"{len(cfg['seeds'])} | {f['median']:.1f} ({f['q1']:.1f}-{f['q3']:.1f}) | "
                   f"{a['exploits_per_run']['median']:.0f} | {in_step} | {wait} | {a['ms_per_step']['median']:.2f} | "
                   f"{a['launch_s']['median']:.0f} |")
    w = r["wins"]
    out += ["", "Best final accuracy, seed by seed, against lockstep (wins/ties/losses): async "
            "{wins}/{ties}/{losses}; ".format(**w["async_vs_lockstep"])
            + "async + wait {wins}/{ties}/{losses}.".format(**w["async_wait_vs_lockstep"]), ""]
    for name, t in r["targets"].items():
        value = f"{t['value']:+.1%}" if name == "async_median" else (
            f"{t['value']:.0%}" if name.endswith("in_step") else t["value"])
        state = "n/a (smoke size)" if not t["applies"] else ("met" if t["met"] else "missed")
        out.append(f"- `{name}`: {t['target']}: {value} ({state})")
    return out
