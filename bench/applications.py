"""7. Applications: PBT against its alternatives at equal compute on the three example apps.

The apps (``examples/image_classification.py``, ``examples/language_model.py``,
``examples/reinforcement_learning.py``) run with their own model, data and Hydra config, composed with
the overrides below, under ``PopulationStrategy``. A population of P members (``--population``, 16 by
default) runs as P / K processes of K members taking turns (``--members-per-process``;
``strategy.members_per_process=K``, plugin/turns.py), one rank per member; every member trains the same
number of steps with the same validation cadence, so every arm costs ``P x steps`` member-steps. Arms,
paired by seed (member ``i`` of every arm starts from the same weights and data/environment seed,
``P * seed + i``, whatever the layout: the populations of different seeds share no member seed):

- ``pbt``: the callback as the app configures it (truncation 25 %, perturb x0.8 / x1.2, resample 25 %);
- ``pbt_tournament``, ``pbt_ttest``: the same with the binary-tournament or Welch t-test exploit rule;
- ``pb2``: the same with ``pbt.explore=pb2`` (every app's space is continuous or integer, so it applies);
- ``random_search``: the same callback with ``burn_in`` past the end: the same P initial samples as
  PBT, never an exploit (the strategy's parallel random search, with a lineage);
- ``grid``: no PBT; member ``i`` trains with the ``i``-th point of a sqrt(P) x sqrt(P) grid around the
  community's usual values (``GRID_AXES``; 2 x 2 at P = 4, 4 x 4 at P = 16), the other
  hyperparameters at the app's defaults;
- ``default``: no PBT; every member trains the app's default configuration (P seeds of one
  configuration: its spread is the seed noise).

After training every member validates and tests its final weights (``bench/app_members.py``: the
apps' ``Trainer.validate`` / ``Trainer.test`` are refused with members taking turns); an arm's result
is the test metric of its member with the best final validation score: test accuracy (image), test
perplexity (language, lower is better), mean return over the held-out test seeds (RL). The statistics
(``bench/stats.py``) are the median and interquartile range over seeds, PBT's wins/ties/losses against
every arm with the sign test and the Wilcoxon signed-rank p-value, and, per seed, the spread of the
random search's P configurations against the default arm's seed noise (the pilot criterion).

Each arm's raw results stay under ``bench/results/tmp/applications_p<P>x<K>/<app>/seed<S>_<arm>/`` with
its launch config; a later run keeps every arm whose config is unchanged, so adding seeds runs only the
new seeds and an interrupted run resumes where it stopped.
``python -m bench`` then merges the run into the published ``applications.json`` (``merge_published``):
the table of a task can be built over several sessions.

    python -m bench --only applications --seeds 10 11 --population 16 --members-per-process 8 \\
        --apps language_model --arms pbt random_search
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.app_figures import best_member_curve, schedule_source
from bench.applications_report import render_section
from bench.common import REPO, SCRATCH, LaunchError, clean_floats, command_line, launch, now, worker_config
from bench.stats import median_iqr, paired_outcomes, separation, sign_test, wilcoxon_signed_rank

__all__ = ["APPS", "ARMS", "DEFAULT_ARMS", "SEEDS", "base_seed", "collect", "grid_points", "merge_published", "plan",
           "render_section", "run", "summarise_app", "worker_overrides"]

NAME = "applications"
EXAMPLES = REPO / "examples"
if str(EXAMPLES) not in sys.path:  # the apps are scripts; their modules are imported by file name
    sys.path.insert(0, str(EXAMPLES))
PRELOAD = ("image_classification", "language_model", "reinforcement_learning")

SEEDS = tuple(range(10))  # the table's seeds (preregistered); pilots use PILOT_SEEDS, never these
PILOT_SEEDS = (100, 101, 102)
MEMBER_SEEDS = "P s + i"  # member i of table seed s at population P (amendment 1; results before it: s + i)
POPULATION = 16
SMOKE_POPULATION, SMOKE_MEMBERS_PER_PROCESS = 4, 2  # 2 processes x 2: the smoke run takes turns too
APPS: dict[str, dict[str, Any]] = {
    # 128 training images instead of 1078 (pilots, 2026-12-07): with 256 images the best random
    # configuration reached 0.994 (480 steps) and 0.986 (240 steps), at the ceiling; with 128, 0.961.
    "image_classification": {
        "overrides": ["trainer.max_epochs=60", "pbt.every_n_epochs=6", "data.train_size=128", "data.batch_size=32"],
        "monitor": "val_acc", "mode": "max", "test": "test_acc", "test_mode": "max",
        "steps": "60 epochs x 4 batches of 32 = 240 SGD steps; validation every epoch",
    },
    "language_model": {
        "overrides": ["trainer.max_steps=300", "trainer.val_check_interval=50", "pbt.every_n_train_steps=50",
                      "data.batch_size=16", "data.eval_bytes=16384", "model.warmup_steps=30"],
        "monitor": "val_loss", "mode": "min", "test": "test_perplexity", "test_mode": "min",
        "steps": "300 AdamW steps of 16 x 64 bytes; validation every 50 steps",
    },
    # Acrobot-v1 instead of the app's CartPole-v1: CartPole's 500 is reached by every arm at this size.
    # 60 rollouts (pilots, 2026-12-07): at 30 the random configurations did not separate from seed noise.
    "reinforcement_learning": {
        "overrides": ["model.env_id=Acrobot-v1", "trainer.max_epochs=60", "trainer.check_val_every_n_epoch=6",
                      "pbt.every_n_epochs=6"],
        "monitor": "eval_return", "mode": "max", "test": "test_return", "test_mode": "max",
        "steps": "60 rollouts x 512 environment steps (30,720), 16 Adam steps per rollout; evaluation every 6",
    },
}


@dataclass(frozen=True)
class Arm:
    """One way to spend the population's member-steps."""

    label: str
    pbt: bool  # whether the arm trains with the PopulationBasedTraining callback
    overrides: tuple[str, ...] = ()


ARMS: dict[str, Arm] = {
    "pbt": Arm("PBT (truncation)", True),
    "pbt_tournament": Arm("PBT (binary tournament)", True, ("pbt.exploit=tournament",)),
    "pbt_ttest": Arm("PBT (Welch t-test)", True, ("pbt.exploit=ttest",)),
    "pb2": Arm("PB2", True, ("pbt.explore=pb2",)),
    "random_search": Arm("random search", True, ("pbt.burn_in=1000000000",)),  # never exploits
    "grid": Arm("grid", False),
    "default": Arm("the app's defaults", False),
}
DEFAULT_ARMS = ("pbt", "pbt_tournament", "pb2", "random_search", "grid", "default")

# Grid axes per side (2: the 2 x 2 grid of the population-4 results; 4: population 16), the first axis
# outermost, and the values every grid point shares.
GRID_AXES: dict[str, dict[int, dict[str, tuple[float, ...]]]] = {
    # lr x augmentation (SGD with Nesterov momentum; the space: lr 1e-3..0.5, augment 0..1)
    "image_classification": {2: {"lr": (0.02, 0.1), "augment": (0.0, 0.5)},
                             4: {"lr": (0.01, 0.03, 0.1, 0.3), "augment": (0.0, 0.25, 0.5, 1.0)}},
    # lr x dropout (AdamW; the space: lr 1e-4..1e-2, dropout 0..0.3)
    "language_model": {2: {"lr": (1e-3, 3e-3), "dropout": (0.0, 0.1)},
                       4: {"lr": (3e-4, 1e-3, 3e-3, 1e-2), "dropout": (0.0, 0.1, 0.2, 0.3)}},
    # lr x entropy coefficient (PPO; the space: lr 1e-4..3e-3, ent_coef 1e-4..0.05; 0 is SB3's default)
    "reinforcement_learning": {2: {"lr": (3e-4, 1e-3), "ent_coef": (0.0, 0.01)},
                               4: {"lr": (1e-4, 3e-4, 1e-3, 3e-3), "ent_coef": (0.0, 0.003, 0.01, 0.03)}},
}
GRID_FIXED: dict[str, dict[str, float]] = {
    "image_classification": {"weight_decay": 5e-4, "label_smoothing": 0.1},  # the usual CNN recipe
    "language_model": {"weight_decay": 0.1, "warmup_steps": 30},  # nanoGPT's habits, warm-up 10 % of steps
    "reinforcement_learning": {"clip_range": 0.2, "gae_lambda": 0.95},  # Stable-Baselines3's PPO defaults
}
SMOKE_OVERRIDES = {
    "image_classification": ["trainer.max_epochs=2", "pbt.every_n_epochs=1", "data.train_size=256"],
    "language_model": ["trainer.max_steps=20", "trainer.val_check_interval=10", "pbt.every_n_train_steps=10",
                       "data.num_files=20", "data.eval_bytes=4096", "model.d_model=32", "model.n_layer=1"],
    "reinforcement_learning": ["trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2",
                               "pbt.every_n_epochs=2", "model.rollout_steps=128", "model.eval_seeds=[1000]",
                               "model.test_seeds=[2000]"],
}




def grid_points(app: str, population: int) -> list[dict[str, Any]]:
    """The ``population`` points of the app's square grid, member ``i`` the ``i``-th (first axis outermost).

    Raises:
        ValueError: ``population`` is not the square of a side the app has axes for.
    """
    side = math.isqrt(population)
    axes = GRID_AXES[app].get(side) if side * side == population else None
    if axes is None:
        sides = sorted(GRID_AXES[app])
        raise ValueError(f"the grid arm needs a population of {' or '.join(str(s * s) for s in sides)} "
                         f"({' or '.join(f'{s}x{s}' for s in sides)}); got {population}")
    (first, first_values), (second, second_values) = axes.items()
    return [{first: a, second: b, **GRID_FIXED[app]} for a in first_values for b in second_values]


@dataclass(frozen=True)
class Plan:
    """What one ``run`` launches: seeds x apps x arms, each a population of ``processes x members_per_process``."""

    seeds: tuple[int, ...]
    apps: tuple[str, ...]
    arms: tuple[str, ...]
    population: int
    members_per_process: int
    overrides: tuple[str, ...] = ()  # Hydra overrides after each app's own (pilots: a changed budget or data)

    @property
    def processes(self) -> int:
        return self.population // self.members_per_process


def plan(smoke: bool = False, seeds: list[int] | None = None, population: int | None = None,
         members_per_process: int | None = None, apps: list[str] | None = None,
         arms: list[str] | None = None, overrides: list[str] | None = None) -> Plan:
    """The options of ``python -m bench --only applications``, checked before anything is launched.

    Defaults: ``SEEDS`` (smoke: seed 0), population 16 (smoke: 4), members per process
    ``population // 2`` (two processes: this machine's two cores; 1 at population 4 and below, the
    layout of the population-4 results; smoke: 2), every app, ``DEFAULT_ARMS``.

    Raises:
        ValueError: an unknown app or arm, a population the layout or the grid cannot hold.
    """
    population = population or (SMOKE_POPULATION if smoke else POPULATION)
    if members_per_process is None:
        members_per_process = SMOKE_MEMBERS_PER_PROCESS if smoke and population == SMOKE_POPULATION else (
            1 if population <= 4 else population // 2)
    chosen = Plan(tuple(seeds) if seeds else ((0,) if smoke else SEEDS), tuple(apps or APPS),
                  tuple(arms or DEFAULT_ARMS), population, members_per_process, tuple(overrides or ()))
    malformed = [o for o in chosen.overrides if "=" not in o]
    if malformed:
        raise ValueError(f"--overrides {malformed}: each must be a Hydra override KEY=VALUE")
    if population < 2 or members_per_process < 1 or population % members_per_process:
        raise ValueError(f"--population {population} must be at least 2 and a multiple of --members-per-process "
                         f"{members_per_process}")
    for kind, names, known in (("app", chosen.apps, APPS), ("arm", chosen.arms, ARMS)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown {kind} {unknown}: choose from {', '.join(known)}")
    if "grid" in chosen.arms:
        for app in chosen.apps:
            grid_points(app, population)
    return chosen


# -- the launcher side ------------------------------------------------------------------------------
def run(smoke: bool = False, timeout: float = 600, **options: Any) -> dict[str, Any]:
    """Every seed x app x arm of ``plan(smoke, **options)``; an arm whose results are there from an
    earlier run with the same launch config is kept (so more seeds can be added, and an interrupted run
    resumed, without redoing the rest).

    ``timeout`` is per launch and per member a process hosts: a process of K members trains them one
    after the other.
    """
    chosen = plan(smoke, **options)
    root = SCRATCH / f"{NAME}{'_smoke' if smoke else ''}_p{chosen.population}x{chosen.members_per_process}"
    if smoke:
        shutil.rmtree(root, ignore_errors=True)
    failures, kept = [], 0
    for seed in chosen.seeds:  # seed-major: an interrupted run still has every app at the seeds it finished
        for app in chosen.apps:
            for arm in chosen.arms:
                out = root / app / f"seed{seed}_{arm}"
                overrides = [*APPS[app]["overrides"], *(SMOKE_OVERRIDES[app] if smoke else []), *chosen.overrides]
                cfg = {"app": app, "arm": arm, "seed": seed, "base_seed": base_seed(seed, chosen.population),
                       "out": str(out), "overrides": overrides, "population": chosen.population,
                       "members_per_process": chosen.members_per_process}
                record = {**cfg, "grid": grid_points(app, chosen.population) if arm == "grid" else None}
                if (out / "wall.json").exists() and _read_json(out / "launch.json") == record:
                    kept += 1
                    continue
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                (out / "launch.json").write_text(json.dumps(record))
                started = time.perf_counter()
                try:
                    launch("bench.applications", chosen.processes, cfg, timeout * chosen.members_per_process,
                           out / "launch.log")
                except LaunchError as err:
                    failures.append(f"{app} seed {seed} {arm}: {str(err)[:300]}")
                    continue
                (out / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - started}))
    payload = collect(root, chosen.seeds, chosen.apps, chosen.arms)
    payload["failures"] = failures
    for app in chosen.apps if chosen.overrides else ():  # a pilot's changes: the report names them
        config = payload["config"][app]
        config["overrides"] = [*config["overrides"], *chosen.overrides]
        config["steps"] += f" (before {' '.join(chosen.overrides)})"
    payload["config"].update(seeds=list(chosen.seeds), population=chosen.population, processes=chosen.processes,
                             members_per_process=chosen.members_per_process, arms=list(chosen.arms),
                             pilot_seeds=list(PILOT_SEEDS), arms_kept_from_an_earlier_run=kept)
    return payload


def base_seed(seed: int, population: int) -> int:
    """The app's ``seed`` for the table's seed ``seed``: member ``i`` trains with ``base_seed + i``
    (the strategy's rule), so the P members of seed ``s`` are ``P s .. P s + P - 1``, disjoint from every
    other seed's. (Amendment 1 of the protocol: ``seed + i`` made seeds ``s`` and ``s + 1`` share P - 1
    member seeds.) The callback's seed, which draws PBT's and random search's configurations, is the
    same ``base_seed``."""
    return seed * population


def worker_overrides(cfg: dict[str, Any], world_size: int) -> list[str]:
    """The Hydra overrides of one launch: the member seeds, the layout, then the app's, then the arm's."""
    return [f"seed={cfg['base_seed']}", f"trainer.devices={world_size}", "report=false",
            f"strategy.members_per_process={cfg['members_per_process']}", f"pbt.dirpath={Path(cfg['out']) / 'pbt'}",
            *cfg["overrides"], *ARMS[cfg["arm"]].overrides]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def collect(root: Path, seeds: tuple[int, ...] | None = None, apps: tuple[str, ...] | None = None,
            arms: tuple[str, ...] = DEFAULT_ARMS) -> dict[str, Any]:
    """Summarise whatever finished under ``root`` (also usable on an interrupted run), for ``seeds``
    (default: every seed found); a seed counts in the summary once every one of ``arms`` finished it."""
    results: dict[str, Any] = {}
    for app in apps or tuple(APPS):
        spec = APPS[app]
        per_seed: dict[int, dict[str, Any]] = {}
        for out in sorted((root / app).glob("seed*_*")):
            seed_text, arm = out.name.split("_", 1)
            seed = int(seed_text.removeprefix("seed"))
            if seeds is not None and seed not in seeds:
                continue
            members = [json.loads(p.read_text()) for p in sorted(out.glob("member_*.json"))]
            if not members or not (out / "wall.json").exists():
                continue
            entry = arm_result(members, spec["mode"])
            entry["wall_s"] = json.loads((out / "wall.json").read_text())["wall_s"]
            entry["finished"] = _dt.datetime.fromtimestamp((out / "wall.json").stat().st_mtime).astimezone().isoformat(
                timespec="seconds")
            entry["curve"] = best_member_curve(out, members, entry["member"])
            if (out / "pbt" / "lineage.jsonl").exists():
                entry.update(lineage_summary(out / "pbt" / "lineage.jsonl", entry["member"]))
            per_seed.setdefault(seed, {})[arm] = entry
        results[app] = summarise_app(per_seed, arms, spec["test_mode"])
        # The schedule figure: PBT's lineage at the first complete seed (else the first seed PBT finished).
        first = next((s for s in [*results[app]["complete_seeds"], *sorted(per_seed)] if "pbt" in per_seed[s]), None)
        if first is not None:
            results[app]["schedule_figure"] = schedule_source(root / app / f"seed{first}_pbt", first,
                                                              per_seed[first]["pbt"]["member"])
    return clean_floats({
        "description": "PBT vs its alternatives at equal member-steps on the three example apps; test metric of "
                       "each arm's member with the best final validation score",
        "config": {app: {"overrides": spec["overrides"], "score": f"{spec['monitor']} ({spec['mode']})",
                         "test": spec["test"], "steps": spec["steps"]} for app, spec in APPS.items()
                   if app in (apps or APPS)},
        "apps": results,
    })


def summarise_app(per_seed: dict[int, dict[str, Any]], arms: tuple[str, ...], test_mode: str) -> dict[str, Any]:
    """One app's results from its arms' entries seed by seed: the seeds where every arm finished, the
    statistics over them, and per seed the random configurations' spread against the seed noise."""
    per_seed = dict(sorted(per_seed.items()))
    complete = {s: e for s, e in per_seed.items() if all(a in e for a in arms)}
    return {"per_seed": {str(s): e for s, e in per_seed.items()}, "complete_seeds": list(complete),
            **summarise(complete, arms, test_mode),
            "separation": {str(s): separation(e["random_search"]["member_tests"], e["default"]["member_tests"])
                           for s, e in per_seed.items() if "random_search" in e and "default" in e}}


def merge_published(payload: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """``payload`` (this run's results) with what the results file already held and this run did not
    measure, so that a table can be built over several runs (a language table takes more than one
    session): every app this run left out, and, for an app it ran, the arms and seeds an earlier run
    measured under the same protocol (same population, member seeds and app overrides), on the table's
    ``SEEDS`` only; this run's launches win. Anything else (a pilot's overrides, seeds off the table,
    another population or member-seed rule) replaces what was there for the apps it ran. Each app
    lists the runs its results come from."""
    cfg = payload["config"]
    run_record = {"command": command_line(), "date": now(), "seeds": cfg["seeds"], "arms": cfg["arms"]}
    for result in payload["apps"].values():
        result["runs"] = [run_record]
    cfg["member_seeds"] = MEMBER_SEEDS
    old_cfg = (previous or {}).get("config", {})
    if (old_cfg.get("member_seeds"), old_cfg.get("population")) != (MEMBER_SEEDS, cfg["population"]):
        return payload
    on_table = set(cfg["seeds"]) <= set(SEEDS)
    arms = tuple(a for a in ARMS if a in {*cfg["arms"], *old_cfg["arms"]})
    for app, old in previous["apps"].items():
        if app not in payload["apps"]:
            payload["apps"][app], cfg[app] = old, old_cfg[app]
            continue
        if not on_table or old_cfg[app]["overrides"] != cfg[app]["overrides"]:
            continue
        per_seed = {int(s): dict(e) for s, e in old["per_seed"].items() if int(s) in SEEDS}
        for seed, entries in payload["apps"][app]["per_seed"].items():
            per_seed.setdefault(int(seed), {}).update(entries)
        merged = summarise_app(per_seed, arms, APPS[app]["test_mode"])
        # as collect() chooses it: PBT's lineage at the first complete seed, whichever run measured it
        figures = [f for f in (payload["apps"][app].get("schedule_figure"), old.get("schedule_figure")) if f]
        merged["schedule_figure"] = min(figures, key=lambda f: (f["seed"] not in merged["complete_seeds"], f["seed"]),
                                        default=None)
        payload["apps"][app] = {**merged, "runs": [*old.get("runs", []), run_record]}
    cfg["arms"] = list(arms)
    cfg["seeds"] = sorted({int(s) for a in payload["apps"].values() for s in a["per_seed"]})
    payload["apps"] = {app: payload["apps"][app] for app in APPS if app in payload["apps"]}  # the report's order
    return clean_floats(payload)


def summarise(complete: dict[int, dict[str, Any]], arms: tuple[str, ...], test_mode: str) -> dict[str, Any]:
    """Per arm the median and IQR of the test metric and of the wall time; PBT against every other arm."""
    if not complete:
        return {"summary": {}, "pbt_vs": {}}
    summary = {arm: {"test": median_iqr([e[arm]["test"] for e in complete.values()]),
                     "wall_s": median_iqr([e[arm]["wall_s"] for e in complete.values()])} for arm in arms}
    versus = {}
    if "pbt" in arms:
        higher = test_mode == "max"
        ours = [e["pbt"]["test"] for e in complete.values()]
        for arm in arms:
            if arm == "pbt":
                continue
            theirs = [e[arm]["test"] for e in complete.values()]
            outcome = paired_outcomes(ours, theirs, higher_is_better=higher)
            differences = [(a - b) * (1 if higher else -1) for a, b in zip(ours, theirs, strict=True)
                           if a is not None and b is not None]
            versus[arm] = {**outcome, "sign_p": sign_test(outcome["wins"], outcome["losses"]),
                           "wilcoxon_p": wilcoxon_signed_rank(differences)["p"]}
    return {"summary": summary, "pbt_vs": versus}


def arm_result(members: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The member with the best final validation score (ties: the lower id), its test metric, and every
    member's test metric (the spread of an arm's configurations, or of its seeds)."""
    sign = 1.0 if mode == "max" else -1.0
    members = sorted(members, key=lambda r: r["member"])
    scored = [r for r in members if r["val"] is not None]
    best = max(scored, key=lambda r: (sign * r["val"], -r["member"])) if scored else members[0]
    return {"member": best["member"], "val": best["val"], "test": best["test"],
            "hyperparameters": best["hyperparameters"], "fit_s": max(r["fit_s"] for r in members),
            "members": len(members), "steps": sorted({r["steps"] for r in members}),
            "member_tests": [r["test"] for r in members]}


def lineage_summary(path: Path, member: int) -> dict[str, Any]:
    from lightning_pbt.algorithm.lineage import member_schedule, read_lineage

    records = read_lineage(path)
    return {"exploits": sum(r.event == "exploit" for r in records),
            "schedule": [{"step": step, **values} for step, values in member_schedule(records, member)]}


# -- the worker: one process of one arm -------------------------------------------------------------
def worker(cfg: dict[str, Any] | None = None) -> None:
    import importlib

    import pytorch_lightning as pl
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench.app_members import FinalEvaluation, GridPoint
    from lightning_pbt.tools.hydra_configs import build_callback, build_strategy

    cfg = worker_config(cfg)
    app_name, arm, out = cfg["app"], ARMS[cfg["arm"]], Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    app = importlib.import_module(app_name)
    overrides = worker_overrides(cfg, int(os.environ["WORLD_SIZE"]))
    with initialize_config_dir(config_dir=app.CONFIG_DIR, version_base="1.3"):
        conf = compose(config_name=app_name, overrides=overrides)
    # Callbacks, not per-process overrides: the K members of a process are copies of what is built here.
    callbacks: list[pl.Callback] = [build_callback(conf.pbt)] if arm.pbt else []
    if cfg["arm"] == "grid":
        callbacks.append(GridPoint(grid_points(app_name, int(cfg["population"]))))
    # last: after PBT's own validation end (its score history is the member's own) and train end
    callbacks.append(FinalEvaluation(app_name, cfg["arm"], out, monitor=APPS[app_name]["monitor"]))
    pl.seed_everything(int(conf.seed), verbose=False)  # member i is then seeded conf.seed + i by the strategy
    built = app.build(conf)
    model, data = built if isinstance(built, tuple) else (built, None)
    trainer = pl.Trainer(**OmegaConf.to_container(conf.trainer, resolve=True), strategy=build_strategy(conf.strategy),
                         callbacks=callbacks, default_root_dir=str(out), logger=False)
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    worker()
