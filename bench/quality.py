"""4. Search quality at equal compute, median and spread over seeds.

Toy (Jaderberg et al. 2017, Fig. 2; pure code, ``run_toy`` of tests/unit/test_paper_toy.py): two
members, best true Q over members and training after a fixed number of steps. Arms: PBT; the paper's
grid search (h = [1, 0] and [0, 1], deterministic); and, as an extra honest baseline, random search
(two members with h drawn uniformly from [0, 1]^2, seeded, same dynamics, no exploit). Asynchronous PBT
(:mod:`bench.simulate`, the callback's ``synchronous=False`` decision), paired by seed with PBT: at equal
speeds, and with member 1 ``TOY_SLOW_FACTOR``x slower at the wall time lockstep needs with it (member 0
trains that many times the steps); ``*_old_rule``: the earlier decision rule.

Ray Tune's ``pbt_function`` toy (:mod:`bench.pbt_function`): lockstep and asynchronous PBT, paired.

Digits (sklearn ``load_digits``, fixed stratified split 60/20/20 train/val/test; the test split is
never seen by PBT): MLP 64-64-10, plain SGD with a constant learning rate, no momentum, batch 32,
``EPOCHS`` epochs, population of ``MEMBERS`` (one rank each), lr ~ LogUniform(1e-4, 1). Arms, at
equal compute (``MEMBERS`` members x ``EPOCHS`` epochs each):

- PBT: the callback with its defaults (truncation 25 %, perturb x0.8 / x1.2, resample 25 %), a ready
  step at the end of every epoch, scored on the validation accuracy; ``pbt_async``: the same with
  ``synchronous=False`` (equal speeds; for stragglers at equal wall time see ``bench/asynchronous.py``);
- ``pbt_async_snapshots``: asynchronous with ``snapshot_every_n_train_steps=SNAPSHOT_EVERY``;
- ``pbt_async_wait``: asynchronous with ``wait_for_peers=WAIT_FOR_PEERS``, on emulated devices of equal
  speed (each training step padded to ``STEP_S`` with ``time.sleep``): the wait is a fraction of an epoch,
  and unpadded epochs on 2 shared cores are short enough for the OS scheduler to decide who is late
  (lockstep's results do not depend on how long a step takes);
- ``pbt_reseeded``: lockstep again with the plans (exploit and explore draws) from another random stream,
  the same start values and weights: what lockstep scores against itself, the noise band the
  asynchronous arms (each member with a plan stream of its own) are compared within;
- random search: the same population (the same initial learning rates, weights and data order per
  member) under ``PopulationStrategy`` without the callback;
- default: ``MEMBERS`` members with lr = 0.01 (Keras' SGD default; torch has none), differing only in
  weights and data order.

Each arm reports the test accuracy of its member with the best final validation accuracy.
Random search and default members run in one launch (members there are independent).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from bench.common import REPO, SCRATCH, clean_floats, launch, spread, worker_config

NAME = "quality"
SEEDS = tuple(range(30))  # digits; 10 could not tell the asynchronous arms from lockstep
MEMBERS = 4
EPOCHS = 10
DEFAULT_LR = 0.01
DIGITS_ARMS = ("pbt", "pbt_reseeded", "pbt_async", "pbt_async_snapshots", "pbt_async_wait", "random_search", "default")
SNAPSHOT_EVERY = 8  # pbt_async_snapshots: a quarter of an epoch (34 optimizer steps of 32 samples)
WAIT_FOR_PEERS = 1.0  # pbt_async_wait: up to the member's last epoch
STEP_S = 0.005  # pbt_async_wait: each training step padded to this (equal-speed devices; see _padded_steps)
RESEED_PLANS = 1000  # pbt_reseeded: lockstep with the plans drawn from another stream (the noise band)
PBT_VARIANTS = {  # arm: what it changes against ``pbt``
    "pbt_reseeded": {"plan_stream": RESEED_PLANS},
    "pbt_async": {"synchronous": False},
    "pbt_async_snapshots": {"synchronous": False, "snapshot_every": SNAPSHOT_EVERY},
    "pbt_async_wait": {"synchronous": False, "wait_for_peers": WAIT_FOR_PEERS, "step_s": STEP_S},
}
PBT_FUNCTION_SEEDS = tuple(range(20))
TOY_SEEDS = tuple(range(20))
TOY_BUDGETS = (25, 100)
PRELOAD = ("sklearn.datasets", "sklearn.model_selection")
SMOKE = {"seeds": (0,), "members": 2, "epochs": 2, "toy_seeds": (0, 1), "toy_budgets": (25,),
         "pbt_function_seeds": (0,), "pbt_function_iterations": 20}


# -- the toy --------------------------------------------------------------------------------------
def _load_toy() -> Any:
    path = REPO / "tests" / "unit" / "test_paper_toy.py"
    spec = importlib.util.spec_from_file_location("bench_paper_toy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toy_fixed_h(hs: list[list[float]], steps: int, lr: float) -> float:
    """The toy's dynamics with fixed h per member and no exploit: best true Q over members and steps."""
    import numpy as np

    theta = [np.array([0.9, 0.9]) for _ in hs]
    best = max(1.2 - float(np.sum(t**2)) for t in theta)
    for _ in range(steps):
        for m, h in enumerate(hs):
            theta[m] = theta[m] + lr * (-2.0 * np.asarray(h) * theta[m])
        best = max(best, *(1.2 - float(np.sum(t**2)) for t in theta))
    return best


class ToyTask:
    """The toy for :mod:`bench.simulate`: a member's state is its theta; ``best`` tracks the best true Q
    over members and steps (the paper's y axis), as ``run_toy`` does."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.best = 1.2 - 2 * 0.81

    def start(self, member: int) -> Any:
        import numpy as np

        return np.array([0.9, 0.9])

    def train(self, member: int, state: Any, hyperparameters: dict[str, float], steps: int) -> Any:
        import numpy as np

        h = np.array([hyperparameters["h0"], hyperparameters["h1"]])
        for _ in range(steps):
            state = state + self.lr * (-2.0 * h * state)
            self.best = max(self.best, 1.2 - float(np.sum(state**2)))
        return state

    def score(self, state: Any) -> float:
        return 1.2 - float((state**2).sum())

    def copy(self, state: Any) -> Any:
        return state.copy()


TOY_ARMS = ("async", "async_old_rule", "async_straggler", "async_straggler_old_rule")
TOY_SLOW_FACTOR = 3  # member 1 of 2 is this much slower in the straggler arms (equal wall time)


def run_toy_async(
    toy: Any, seed: int, steps: int, arm: str, snapshot_every: int | None = None, wait: float | None = None
) -> float:
    """The toy under asynchronous PBT (:func:`bench.simulate.run_asynchronous`); best true Q."""
    from bench.simulate import fast_budget, run_asynchronous
    from lightning_pbt.algorithm.scheduler import PBTScheduler
    from lightning_pbt.algorithm.space import Uniform

    def make() -> PBTScheduler:
        return PBTScheduler({"h0": Uniform(0.0, 1.0), "h1": Uniform(0.0, 1.0)}, mode="max", seed=seed)

    task = ToyTask(toy.LR)
    straggler = arm.startswith("async_straggler")
    run_asynchronous(task, make, [{"h0": 1.0, "h1": 0.0}, {"h0": 0.0, "h1": 1.0}], toy.READY,
                     [fast_budget(steps, TOY_SLOW_FACTOR, toy.READY, wait), steps] if straggler else [steps, steps],
                     [1.0, float(TOY_SLOW_FACTOR)] if straggler else [1.0, 1.0], seed,
                     like_with_like=not arm.endswith("old_rule"), snapshot_every=snapshot_every, wait=wait)
    return task.best


def run_toy_benchmark(seeds: tuple[int, ...], budgets: tuple[int, ...]) -> list[dict[str, Any]]:
    import numpy as np

    toy = _load_toy()
    lr, ready = toy.LR, toy.READY
    grid_h = [[1.0, 0.0], [0.0, 1.0]]
    rows = []
    for steps in budgets:
        grid = toy.run_toy(pbt=False, steps=steps, lr=lr, ready=ready, seed=0)
        if abs(grid - toy_fixed_h(grid_h, steps, lr)) > 1e-12:
            raise RuntimeError("bench/quality.py: the toy's dynamics changed; update toy_fixed_h")
        pbt = [toy.run_toy(pbt=True, steps=steps, lr=lr, ready=ready, seed=s) for s in seeds]
        random = [toy_fixed_h(np.random.default_rng(s).uniform(0, 1, size=(2, 2)).tolist(), steps, lr) for s in seeds]
        arms = {arm: [run_toy_async(toy, s, steps, arm) for s in seeds] for arm in TOY_ARMS}
        rows.append({"steps": steps, "lr": lr, "ready": ready, "seeds": len(seeds), "optimum": 1.2,
                     "pbt": spread(pbt), "grid": spread([grid]), "random_search": spread(random),
                     "pbt_beats_grid_seeds": sum(p > grid for p in pbt),
                     "pbt_beats_random_seeds": sum(p > r for p, r in zip(pbt, random, strict=True)),
                     **{f"pbt_{arm}": spread(values) for arm, values in arms.items()},
                     "vs_lockstep": {f"pbt_{arm}": _wins(values, pbt) for arm, values in arms.items()}})
    return rows


# -- digits: the launcher side ----------------------------------------------------------------------
def run(smoke: bool = False, timeout: float = 400) -> dict[str, Any]:
    from bench.pbt_function import ITERATIONS, run_pbt_function_benchmark

    seeds = SMOKE["seeds"] if smoke else SEEDS
    members = SMOKE["members"] if smoke else MEMBERS
    epochs = SMOKE["epochs"] if smoke else EPOCHS
    toy_rows = run_toy_benchmark(SMOKE["toy_seeds"] if smoke else TOY_SEEDS,
                                 SMOKE["toy_budgets"] if smoke else TOY_BUDGETS)
    pbt_function = run_pbt_function_benchmark(SMOKE["pbt_function_seeds"] if smoke else PBT_FUNCTION_SEEDS,
                                              SMOKE["pbt_function_iterations"] if smoke else ITERATIONS)
    root = SCRATCH / f"{NAME}{'_smoke' if smoke else ''}"
    shutil.rmtree(root, ignore_errors=True)
    per_seed = []
    for seed in seeds:
        common = {"seed": seed, "epochs": epochs, "default_lr": DEFAULT_LR, "random_members": members}
        pbt_out = root / f"seed{seed}_pbt"
        launch("bench.quality", members, {**common, "out": str(pbt_out), "pbt": True, "default_members": 0},
                 timeout, root / f"seed{seed}_pbt.log")
        for arm, options in PBT_VARIANTS.items():
            launch("bench.quality", members, {**common, "out": str(root / f"seed{seed}_{arm}"), "pbt": True,
                                              "default_members": 0, **options},
                   timeout, root / f"seed{seed}_{arm}.log")
        # In smoke mode one random-search member and one default member keep the launch at 2 ranks.
        base_random, base_default = (1, 1) if smoke else (members, members)
        base_out = root / f"seed{seed}_baseline"
        launch("bench.quality", base_random + base_default,
                 {**common, "out": str(base_out), "pbt": False, "random_members": base_random,
                  "default_members": base_default}, timeout, root / f"seed{seed}_baseline.log")
        ranks = [json.loads(p.read_text()) for p in sorted(pbt_out.glob("rank_*.json"))]
        for arm in PBT_VARIANTS:
            arm_out = root / f"seed{seed}_{arm}"
            ranks += [{**json.loads(p.read_text()), "arm": arm} for p in sorted(arm_out.glob("rank_*.json"))]
        ranks += [json.loads(p.read_text()) for p in sorted(base_out.glob("rank_*.json"))]
        entry: dict[str, Any] = {"seed": seed}
        for arm in DIGITS_ARMS:
            arm_ranks = [r for r in ranks if r["arm"] == arm]
            best = max(arm_ranks, key=lambda r: (r["val_acc"], -r["member"]))
            # final_lr: the value after the last ready step (a copy's explored value; it never trained with it)
            entry[arm] = {"test_acc": best["test_acc"], "val_acc": best["val_acc"], "final_lr": best["lr"],
                          "member": best["member"], "start_lrs": sorted(r["start_lr"] for r in arm_ranks),
                          "members": len(arm_ranks), "mean_test_acc": sum(r["test_acc"] for r in arm_ranks)
                          / len(arm_ranks)}
        for arm in ("pbt", *PBT_VARIANTS):
            out = root / f"seed{seed}_{arm}"
            if (out / "pbt" / "lineage.jsonl").exists():
                lines = [json.loads(x) for x in (out / "pbt" / "lineage.jsonl").read_text().splitlines() if x]
                entry[arm]["exploits"] = sum(1 for x in lines if x["event"] == "exploit")
        per_seed.append(entry)
    summary = {arm: {"test_acc": spread([e[arm]["test_acc"] for e in per_seed]),
                     "val_acc": spread([e[arm]["val_acc"] for e in per_seed]),
                     "mean_member_test_acc": spread([e[arm]["mean_test_acc"] for e in per_seed])}
               for arm in DIGITS_ARMS}
    for arm in ("pbt", *PBT_VARIANTS):
        summary[arm]["exploits_per_run"] = spread([e[arm].get("exploits", 0) for e in per_seed])
    wins = {
        "pbt_vs_random_search": _wins([e["pbt"]["test_acc"] for e in per_seed],
                                      [e["random_search"]["test_acc"] for e in per_seed]),
        "pbt_vs_default": _wins([e["pbt"]["test_acc"] for e in per_seed], [e["default"]["test_acc"] for e in per_seed]),
        "pbt_async_vs_pbt": _wins([e["pbt_async"]["test_acc"] for e in per_seed],
                                  [e["pbt"]["test_acc"] for e in per_seed]),
        "pbt_async_vs_pbt_val_acc": _wins([e["pbt_async"]["val_acc"] for e in per_seed],
                                          [e["pbt"]["val_acc"] for e in per_seed]),
        "pbt_async_snapshots_vs_pbt": _wins([e["pbt_async_snapshots"]["test_acc"] for e in per_seed],
                                            [e["pbt"]["test_acc"] for e in per_seed]),
        "pbt_async_wait_vs_pbt": _wins([e["pbt_async_wait"]["test_acc"] for e in per_seed],
                                       [e["pbt"]["test_acc"] for e in per_seed]),
        "pbt_reseeded_vs_pbt": _wins([e["pbt_reseeded"]["test_acc"] for e in per_seed],
                                     [e["pbt"]["test_acc"] for e in per_seed]),
    }
    return clean_floats({
        "description": "search quality at equal compute: the paper's toy (best Q), Ray's pbt_function toy and "
                       "digits (held-out test "
                       "accuracy of the member with the best validation accuracy)",
        "config": {"toy": {"seeds": len(SMOKE["toy_seeds"] if smoke else TOY_SEEDS),
                           "budgets": list(SMOKE["toy_budgets"] if smoke else TOY_BUDGETS),
                           "source": "tests/unit/test_paper_toy.py run_toy"},
                   "digits": {"seeds": list(seeds), "members": members, "epochs": epochs, "batch": 32,
                              "model": "MLP 64-64-10 (ReLU)", "optimizer": "SGD, constant lr, no momentum",
                              "space": "lr ~ LogUniform(1e-4, 1)", "default_lr": DEFAULT_LR,
                              "split": "load_digits, stratified 60/20/20 train/val/test, random_state=0",
                              "pbt": "every_n_epochs=1, monitor val_acc, truncation 0.25, resample 0.25, "
                                     "perturb (0.8, 1.2)",
                              "pbt_variants": PBT_VARIANTS}},
        "toy": toy_rows,
        "pbt_function": pbt_function,
        "digits": {"per_seed": per_seed, "summary": summary, "wins": wins},
    })


def _wins(a: list[float], b: list[float]) -> dict[str, int]:
    pairs = list(zip(a, b, strict=True))
    return {"wins": sum(x > y for x, y in pairs), "ties": sum(x == y for x, y in pairs),
            "losses": sum(x < y for x, y in pairs)}


# -- digits: the worker (a Lightning run) -----------------------------------------------------------
def digits_split() -> tuple[Any, ...]:
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.25, stratify=y_rest,
                                                      random_state=0)
    return x_train, y_train, x_val, y_val, x_test, y_test


def worker(cfg: dict[str, Any] | None = None) -> None:
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_pbt import LogUniform, PopulationBasedTraining, PopulationStrategy
    from lightning_pbt.algorithm.scheduler import PBTScheduler
    from lightning_pbt.plugin.strategy import member_id_from_env

    cfg = worker_config(cfg)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    seed = int(cfg["seed"])
    pl.seed_everything(seed, verbose=False)
    space = {"lr": LogUniform(1e-4, 1.0)}
    member = member_id_from_env()
    if cfg["pbt"]:
        arm, index = "pbt", member
    elif member < cfg["random_members"]:
        arm, index = "random_search", member
    else:
        arm, index = "default", member - cfg["random_members"]
    start_lr = cfg["default_lr"] if arm == "default" else PBTScheduler(space, seed=seed).initial_hyperparameters(
        index)["lr"]
    tensors = [torch.from_numpy(a) for a in digits_split()]
    x_train, y_train, x_val, y_val, x_test, y_test = tensors
    train = DataLoader(TensorDataset(x_train, y_train.long()), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val.long()), batch_size=len(x_val))

    class Net(pl.LightningModule):
        def __init__(self, lr: float) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_acc", (self.net(x).argmax(-1) == y).float().mean(), sync_dist=True)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.0)

    torch.manual_seed(seed * 1000 + index)  # member k of every arm starts from the same weights
    model = Net(start_lr)
    callbacks = []
    pbt = None
    if cfg["pbt"]:
        pbt = PopulationBasedTraining(space, monitor="val_acc", mode="max", every_n_epochs=1, seed=seed,
                                      dirpath=str(out / "pbt"), synchronous=cfg.get("synchronous", True),
                                      snapshot_every_n_train_steps=cfg.get("snapshot_every"),
                                      wait_for_peers=cfg.get("wait_for_peers"))
        if cfg.get("plan_stream") is not None:  # lockstep again with other explore draws: the noise band
            pbt.scheduler.use_member_stream(cfg["plan_stream"])
        callbacks.append(pbt)
    if cfg.get("step_s"):
        callbacks.append(_padded_steps(pl.Callback, float(cfg["step_s"])))
    trainer = pl.Trainer(
        accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]),
        strategy=PopulationStrategy(member_size=1, timeout=300), max_epochs=cfg["epochs"],
        check_val_every_n_epoch=1, default_root_dir=str(out), callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, train, val)
    model.eval()
    with torch.no_grad():
        val_acc = float((model.net(x_val).argmax(-1) == y_val).float().mean())
        test_acc = float((model.net(x_test).argmax(-1) == y_test).float().mean())
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    (out / f"rank_{trainer.strategy.world_rank}.json").write_text(json.dumps({
        "arm": arm, "member": member, "index": index, "start_lr": start_lr, "lr": lr, "val_acc": val_acc,
        "test_acc": test_acc,
    }))


def _padded_steps(base: type, step_s: float) -> Any:
    """Each training step padded with ``time.sleep`` to ``step_s``: every member on a device of its own,
    of equal speed (as ``bench/asynchronous.py`` emulates devices). With 4 processes on 2 cores, unpadded
    digits epochs last about 50 ms and the order members finish them in is the OS scheduler's."""
    import time

    class PaddedSteps(base):  # type: ignore[misc, valid-type]
        started = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            time.sleep(max(0.0, step_s - (time.perf_counter() - self.started)))

    return PaddedSteps()


if __name__ == "__main__":
    worker()
