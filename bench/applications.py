"""7. Applications: PBT against its alternatives at equal compute on the three example apps.

The apps (``examples/image_classification.py``, ``examples/language_model.py``,
``examples/reinforcement_learning.py``) run with their own model, data and Hydra config, composed with
the overrides below, under ``PopulationStrategy``; ``MEMBERS`` members of one rank each per arm, every
member the same number of training steps (and the same validation cadence), so every arm costs
``MEMBERS x steps`` member-steps. Arms, paired by seed (member ``i`` of every arm starts from the same
weights and data/environment seed, ``seed + i``):

- ``pbt``: the callback as the app configures it (truncation 25 %, perturb x0.8 / x1.2, resample 25 %);
- ``pb2``: the same with ``pbt.explore=pb2`` (only where listed in ``PB2_APPS``);
- ``random_search``: the same callback with ``burn_in`` past the end: the same initial samples as PBT,
  never an exploit (the strategy's parallel random search, with a lineage);
- ``grid``: no callback; member ``i`` trains with the ``i``-th point of a 2 x 2 grid around the
  community's usual values (``GRIDS``), the other hyperparameters at the app's defaults.

After training every member is validated once more (its final weights) and tested; an arm's result is
the test metric of its member with the best final validation score: test accuracy (image), test
perplexity (language, lower is better), mean return over the held-out test seeds (RL).

Each arm's raw results stay under ``bench/results/tmp/applications/<app>/seed<S>_<arm>/`` with its
launch config; a later run keeps every arm whose config is unchanged, so raising ``SEEDS`` runs only
the new seeds and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, SCRATCH, LaunchError, clean_floats, launch, spread, worker_config
from bench.markdown import spread_cell, table

NAME = "applications"
EXAMPLES = REPO / "examples"
if str(EXAMPLES) not in sys.path:  # the apps are scripts; their modules are imported by file name
    sys.path.insert(0, str(EXAMPLES))
PRELOAD = ("image_classification", "language_model", "reinforcement_learning")

SEEDS = tuple(range(10))
MEMBERS = 4
APPS: dict[str, dict[str, Any]] = {
    # 256 training images instead of 1078: at full size every arm reaches 99+ % and ties.
    "image_classification": {
        "overrides": ["trainer.max_epochs=60", "pbt.every_n_epochs=6", "data.train_size=256", "data.batch_size=32"],
        "monitor": "val_acc", "mode": "max", "test": "test_acc", "test_mode": "max",
        "steps": "60 epochs x 8 batches of 32 = 480 SGD steps; validation every epoch",
    },
    "language_model": {
        "overrides": ["trainer.max_steps=300", "trainer.val_check_interval=50", "pbt.every_n_train_steps=50",
                      "data.batch_size=16", "data.eval_bytes=16384", "model.warmup_steps=30"],
        "monitor": "val_loss", "mode": "min", "test": "test_perplexity", "test_mode": "min",
        "steps": "300 AdamW steps of 16 x 64 bytes; validation every 50 steps",
    },
    # Acrobot-v1 instead of the app's CartPole-v1: CartPole's 500 is reached by every arm at this size.
    "reinforcement_learning": {
        "overrides": ["model.env_id=Acrobot-v1", "trainer.max_epochs=30", "trainer.check_val_every_n_epoch=3",
                      "pbt.every_n_epochs=3"],
        "monitor": "eval_return", "mode": "max", "test": "test_return", "test_mode": "max",
        "steps": "30 rollouts x 512 environment steps (15,360), 16 Adam steps per rollout; evaluation every 3",
    },
}
GRIDS: dict[str, list[dict[str, Any]]] = {
    # lr x augmentation, weight decay 5e-4 and label smoothing 0.1 (the usual CNN recipe)
    "image_classification": [{"lr": lr, "augment": a, "weight_decay": 5e-4, "label_smoothing": 0.1}
                             for lr in (0.02, 0.1) for a in (0.0, 0.5)],
    # lr x dropout, weight decay 0.1, warm-up 10 % of the steps (nanoGPT's habits)
    "language_model": [{"lr": lr, "dropout": d, "weight_decay": 0.1, "warmup_steps": 30}
                       for lr in (1e-3, 3e-3) for d in (0.0, 0.1)],
    # lr x entropy coefficient, clip 0.2, GAE lambda 0.95 (Stable-Baselines3's PPO defaults and a common variant)
    "reinforcement_learning": [{"lr": lr, "ent_coef": e, "clip_range": 0.2, "gae_lambda": 0.95}
                               for lr in (3e-4, 1e-3) for e in (0.0, 0.01)],
}
PB2_APPS = ("reinforcement_learning",)
SMOKE_OVERRIDES = {
    "image_classification": ["trainer.max_epochs=2", "pbt.every_n_epochs=1", "data.train_size=256"],
    "language_model": ["trainer.max_steps=20", "trainer.val_check_interval=10", "pbt.every_n_train_steps=10",
                       "data.num_files=20", "data.eval_bytes=4096", "model.d_model=32", "model.n_layer=1"],
    "reinforcement_learning": ["trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2",
                               "pbt.every_n_epochs=2", "model.rollout_steps=128", "model.eval_seeds=[1000]",
                               "model.test_seeds=[2000]"],
}


def arms_for(app: str) -> tuple[str, ...]:
    return ("pbt", "pb2", "random_search", "grid") if app in PB2_APPS else ("pbt", "random_search", "grid")


# -- the launcher side ------------------------------------------------------------------------------
def run(smoke: bool = False, timeout: float = 600) -> dict[str, Any]:
    """Every app x arm x seed; an arm whose results are there from an earlier run with the same launch
    config is kept (so more seeds can be added, and an interrupted run resumed, without redoing the rest)."""
    seeds, members = ((0,), 2) if smoke else (SEEDS, MEMBERS)
    root = SCRATCH / f"{NAME}{'_smoke' if smoke else ''}"
    if smoke:
        shutil.rmtree(root, ignore_errors=True)
    failures, kept = [], 0
    for seed in seeds:  # seed-major: an interrupted run still has every app at the seeds it finished
        for app, spec in APPS.items():
            for arm in arms_for(app):
                out = root / app / f"seed{seed}_{arm}"
                overrides = [*spec["overrides"], *(SMOKE_OVERRIDES[app] if smoke else [])]
                cfg = {"app": app, "arm": arm, "seed": seed, "out": str(out), "overrides": overrides}
                record = {**cfg, "members": members, "grid": GRIDS[app]}
                if (out / "wall.json").exists() and _read_json(out / "launch.json") == record:
                    kept += 1
                    continue
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                (out / "launch.json").write_text(json.dumps(record))
                started = time.perf_counter()
                try:
                    launch("bench.applications", members, cfg, timeout, out / "launch.log")
                except LaunchError as err:
                    failures.append(f"{app} seed {seed} {arm}: {str(err)[:300]}")
                    continue
                (out / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - started}))
    payload = collect(root, seeds)
    payload["failures"] = failures
    payload["config"]["seeds"] = list(seeds)
    payload["config"]["members"] = members
    payload["config"]["arms_kept_from_an_earlier_run"] = kept
    return payload


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def collect(root: Path, seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Summarise whatever finished under ``root`` (also usable on an interrupted run), for ``seeds``
    (default: every seed found)."""
    results: dict[str, Any] = {}
    for app, spec in APPS.items():
        per_seed: dict[int, dict[str, Any]] = {}
        for out in sorted((root / app).glob("seed*_*")):
            seed_text, arm = out.name.split("_", 1)
            if seeds is not None and int(seed_text.removeprefix("seed")) not in seeds:
                continue
            ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank_*.json"))]
            if not ranks or not (out / "wall.json").exists():
                continue
            entry = arm_result(ranks, spec["mode"])
            entry["wall_s"] = json.loads((out / "wall.json").read_text())["wall_s"]
            if (out / "pbt" / "lineage.jsonl").exists():
                entry.update(lineage_summary(out / "pbt" / "lineage.jsonl", entry["member"]))
            per_seed.setdefault(int(seed_text.removeprefix("seed")), {})[arm] = entry
        arms = arms_for(app)
        complete = {s: e for s, e in sorted(per_seed.items()) if all(a in e for a in arms)}
        summary = {arm: {"test": spread([e[arm]["test"] for e in complete.values()]),
                         "wall_s": spread([e[arm]["wall_s"] for e in complete.values()])}
                   for arm in arms} if complete else {}
        wins = {arm: paired_wins([e["pbt"]["test"] for e in complete.values()],
                                 [e[arm]["test"] for e in complete.values()], spec["test_mode"])
                for arm in arms if arm != "pbt"} if complete else {}
        results[app] = {"per_seed": {str(s): e for s, e in sorted(per_seed.items())},
                        "complete_seeds": list(complete), "summary": summary, "pbt_vs": wins}
    return clean_floats({
        "description": "PBT vs PB2 / random search / a 2x2 grid at equal member-steps on the three example apps; "
                       "test metric of each arm's member with the best final validation score",
        "config": {app: {"overrides": spec["overrides"], "score": f"{spec['monitor']} ({spec['mode']})",
                         "test": spec["test"], "steps": spec["steps"], "grid": GRIDS[app], "arms": list(arms_for(app))}
                   for app, spec in APPS.items()},
        "apps": results,
    })


def arm_result(ranks: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The member with the best final validation score (ties: the lower id) and its test metric."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [r for r in ranks if r["val"] is not None]
    best = max(scored, key=lambda r: (sign * r["val"], -r["member"])) if scored else ranks[0]
    return {"member": best["member"], "val": best["val"], "test": best["test"],
            "hyperparameters": best["hyperparameters"], "fit_s": max(r["fit_s"] for r in ranks),
            "members": len(ranks), "steps": sorted({r["steps"] for r in ranks})}


def paired_wins(pbt: list[float], other: list[float], mode: str) -> dict[str, int]:
    """PBT's wins / ties / losses against ``other``, seed by seed (higher is better unless mode is min)."""
    sign = 1.0 if mode == "max" else -1.0
    pairs = [(sign * a, sign * b) for a, b in zip(pbt, other, strict=True)]
    return {"wins": sum(a > b for a, b in pairs), "ties": sum(a == b for a, b in pairs),
            "losses": sum(a < b for a, b in pairs)}


def lineage_summary(path: Path, member: int) -> dict[str, Any]:
    from lightning_pbt.algorithm.lineage import member_schedule, read_lineage

    records = read_lineage(path)
    return {"exploits": sum(r.event == "exploit" for r in records),
            "schedule": [{"step": step, **values} for step, values in member_schedule(records, member)]}


# -- the report section ----------------------------------------------------------------------------
ARM_NAMES = {"pbt": "PBT (truncation)", "pb2": "PB2", "random_search": "random search (PBT, no exploit)",
             "grid": "best of a 2x2 grid"}
METRICS = {"test_acc": ("test accuracy", 3), "test_perplexity": ("test perplexity", 3),
           "test_return": ("return on 10 held-out seeds", 1)}


def render_section(r: dict[str, Any]) -> list[str]:
    """Section 7 of RESULTS.md (and the README's Applications table)."""
    cfg = r["config"]
    out = ["", "## 7. Applications: PBT against its alternatives at equal compute", "",
           f"`{r['command']}`, {r['date']}, {r['wall_s'] / 60:.0f} min. {cfg['members']} members x 1 rank per arm, "
           f"seeds {cfg['seeds']} (paired: member i of every arm starts from the same weights and data/environment "
           "seed); every arm trains every member the same number of steps, so every arm costs the same "
           "member-steps. Result: the test metric of the arm's member with the best final validation score, "
           "median [min, max] over seeds; PBT's wins/ties/losses against each arm, seed by seed; wall time of a "
           "launch (all members), median."]
    if cfg.get("arms_kept_from_an_earlier_run"):
        out += ["", f"{cfg['arms_kept_from_an_earlier_run']} arms were kept from an earlier run with the same launch "
                "configs (the wall time above is this run's only); every launch's own wall time is in the JSON."]
    for failure in r.get("failures", []):
        out += ["", f"Did not finish: {failure.splitlines()[0]}"]
    for app, a in r["apps"].items():
        c = cfg[app]
        name, digits = METRICS[c["test"]]
        out += ["", f"**{app}** (`examples/{app}.py`, {' '.join(c['overrides'])}): {c['steps']}; score "
                f"{c['score']}; {name}, {'lower' if c['test'] == 'test_perplexity' else 'higher'} is better; "
                f"{len(a['complete_seeds'])} complete seeds.", ""]
        rows = []
        for arm, s in a["summary"].items():
            w = a["pbt_vs"].get(arm)
            rows.append([ARM_NAMES[arm], spread_cell(s["test"], digits),
                         "" if w is None else f"{w['wins']}/{w['ties']}/{w['losses']}",
                         f"{s['wall_s']['median']:.0f}", f"{wall_ratio(a, arm):.2f}"])
        out += table(["arm", name, "PBT wins/ties/losses", "wall s", "PBT wall / this arm's (paired median)"], rows)
        grid = "; ".join(", ".join(f"{k}={v:g}" for k, v in point.items()) for point in c["grid"])
        out += ["", f"Grid points: {grid}."]
        first = next((e["pbt"] for e in a["per_seed"].values() if "schedule" in e.get("pbt", {})), None)
        if first is not None:
            names = sorted(first["schedule"][0]) if first["schedule"] else []
            names = [n for n in names if n != "step"]
            out += ["", f"Schedule of PBT's best member (member {first['member']}, first seed, "
                    f"{first['exploits']} exploits in the population; values set at the final step, which "
                    "nothing trained with, left out):", ""]
            out += table(["step", *names], [[str(e["step"]), *(f"{e[n]:.4g}" for n in names)]
                                             for e in trained_schedule(first)])
    return out


def wall_ratio(app_result: dict[str, Any], arm: str) -> float:
    """PBT's launch wall time over ``arm``'s, seed by seed, median: the machine's load drifts between seeds."""
    from statistics import median

    seeds = [app_result["per_seed"][str(s)] for s in app_result["complete_seeds"]]
    return median(e["pbt"]["wall_s"] / e[arm]["wall_s"] for e in seeds)


def trained_schedule(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The schedule entries some training used: not those set at the last step (after the last ready step)."""
    return [e for e in entry["schedule"] if e["step"] < max(entry["steps"])]


# -- the worker: one member of one arm --------------------------------------------------------------
def worker(cfg: dict[str, Any] | None = None) -> None:
    import importlib

    import pytorch_lightning as pl
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_pbt.plugin.strategy import member_id_from_env
    from lightning_pbt.tools.hydra_configs import build_callback, build_strategy

    cfg = worker_config(cfg)
    app_name, arm, seed, out = cfg["app"], cfg["arm"], int(cfg["seed"]), Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    app = importlib.import_module(app_name)
    spec = APPS[app_name]
    member = member_id_from_env()
    overrides = [f"seed={seed}", f"trainer.devices={os.environ['WORLD_SIZE']}", "report=false",
                 f"pbt.dirpath={out / 'pbt'}", *cfg["overrides"]]
    if arm == "pb2":
        overrides.append("pbt.explore=pb2")
    elif arm == "random_search":
        overrides.append("pbt.burn_in=1000000000")  # never exploits: the initial samples, trained as they are
    elif arm == "grid":
        overrides += [f"model.{name}={value}" for name, value in GRIDS[app_name][member].items()]
    with initialize_config_dir(config_dir=app.CONFIG_DIR, version_base="1.3"):
        conf = compose(config_name=app_name, overrides=overrides)
    callback = None if arm == "grid" else build_callback(conf.pbt)
    pl.seed_everything(seed, verbose=False)
    built = app.build(conf)
    model, data = built if isinstance(built, tuple) else (built, None)
    trainer = pl.Trainer(**OmegaConf.to_container(conf.trainer, resolve=True), strategy=build_strategy(conf.strategy),
                         callbacks=[callback] if callback else [], default_root_dir=str(out), logger=False)
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - started
    steps = trainer.global_step
    val = trainer.validate(model, datamodule=data, verbose=False)[0][spec["monitor"]]
    test = trainer.test(model, datamodule=data, verbose=False)[0][spec["test"]]
    values = dict(callback.hyperparameters) if callback else GRIDS[app_name][member]
    (out / f"rank_{trainer.strategy.world_rank}.json").write_text(json.dumps({
        "arm": arm, "member": member, "val": float(val), "test": float(test), "fit_s": fit_s, "steps": steps,
        "hyperparameters": {k: float(v) if isinstance(v, int | float) else v for k, v in values.items()},
    }))


if __name__ == "__main__":
    worker()
