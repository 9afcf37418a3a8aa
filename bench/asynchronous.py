"""5. Asynchronous PBT: throughput with members of unequal speed, and the quality reached in equal time.

Four members of one rank each train a small MLP on sklearn digits (SGD, lr ~ LogUniform(1e-4, 1), a
ready step every ``every`` optimizer steps, scored on the validation accuracy). Members 2 and 3 run
on an emulated device 3x slower: each training step (the loop's whole iteration: fetching the batch,
forward, backward, optimizer step) is padded with ``time.sleep`` to ``BASE_STEP_S`` x its member's
speed (1 or 3); validation and the ready step after it are not padded, they cost what they cost. The
speed is a property of the member's "device", read from its member id, not a searched hyperparameter,
so an exploit copies weights and hyperparameters but never the speed. Sleeping, not computing, makes
the slow members slow without taking CPU from the others: this machine has 2 cores for 4 processes,
and the real work per step (a few ms) stays well below the padded step time. The flip side: CPU the
callback's background threads take is hidden while a step's work still fits in its padded time, as it
would be behind a real accelerator; each member's ``busy_fraction``, ``overran_fraction`` and
``cpu_ms_per_step`` show how much room there was.

Each run has the same wall-time budget: every rank meets the others in a barrier at
``on_train_start`` (after the callback's own start), starts its clock, and stops itself
(``trainer.should_stop``) at the first batch end at or after ``BUDGET_S``. Then, per run:

- member-steps per second = the sum over members of (optimizer steps / seconds from the common start
  to that member's stop): the work the population did per second, whoever did it;
- quality at equal wall time = the held-out test accuracy (digits test split, never seen by PBT) of the
  member whose own final validation accuracy is best, evaluated after the budget (outside it).

Arms, in alternating order from one repetition to the next (ABCD, DCBA, ABCD):

- ``sync_mixed``: ``PopulationBasedTraining(synchronous=True)``, speeds 1, 1, 3, 3: the fast members wait
  for the slow ones at every ready step;
- ``async_mixed``: ``synchronous=False``, same speeds: nobody waits.
  Target: async_mixed >= 1.5x the member-steps/s of sync_mixed (the ideal is 2x: 1 + 1 + 1/3 + 1/3
  against 4 x 1/3);
- ``async_wait_mixed``: ``synchronous=False, wait_for_peers=1.0``, same speeds: what the wait costs with
  stragglers (a fast member waits for peers that are still in its interval, never for a straggler a
  whole interval behind), against both arms above;
- ``async_equal``: ``synchronous=False``, every speed 1; ``none_equal``: the same population under
  ``PopulationStrategy`` alone (no callback, the same starting learning rates).
  Target: async_equal >= 0.97x the member-steps/s of none_equal (what the asynchronous callback costs).

The ratios compare medians over repetitions of the same run of ``python -m bench``. Every PBT run also
reports where its ready steps' time went (``bench/breakdown.py``): in ``sync_mixed`` the all-gather
holds the fast members' waiting; asynchronous ready steps are ``snapshot``, ``decide``, ``transfer``.

Worker: ``torchrun --standalone --nproc_per_node=4 -m bench.asynchronous '<json>'``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench import breakdown
from bench.common import SCRATCH, clean_floats, launch, median, spread, worker_config

NAME = "asynchronous"
PRELOAD = ("sklearn.datasets", "sklearn.model_selection", "bench.quality")
MEMBERS = 4
SLOW_MEMBERS = (2, 3)
SLOW_FACTOR = 3
BASE_STEP_S = 0.03
ARMS = {  # name: (callback: None / "sync" / "async" / "async_wait", mixed speeds)
    "sync_mixed": ("sync", True),
    "async_mixed": ("async", True),
    "async_wait_mixed": ("async_wait", True),
    "async_equal": ("async", False),
    "none_equal": (None, False),
}
FULL = {"budget_s": 15.0, "every": 20, "reps": 3}
SMOKE = {"budget_s": 1.5, "every": 10, "reps": 1}
TARGET_ASYNC_OVER_SYNC = 1.5
TARGET_CALLBACK_OVER_NONE = 0.97


def speed_of(member: int, mixed: bool) -> int:
    return SLOW_FACTOR if mixed and member in SLOW_MEMBERS else 1


# -- the launcher side ----------------------------------------------------------------------------
def run(smoke: bool = False, timeout: float = 120) -> dict[str, Any]:
    size = SMOKE if smoke else FULL
    root = SCRATCH / f"{NAME}{'_smoke' if smoke else ''}"
    shutil.rmtree(root, ignore_errors=True)
    names = list(ARMS)
    runs: list[dict[str, Any]] = []
    for rep in range(size["reps"]):
        for arm in names if rep % 2 == 0 else reversed(names):
            callback, mixed = ARMS[arm]
            out = root / f"rep{rep}_{arm}"
            cfg = {"out": str(out), "callback": callback, "mixed": mixed, "seed": rep, "budget_s": size["budget_s"],
                   "every": size["every"], "base_step_s": BASE_STEP_S}
            launch("bench.asynchronous", MEMBERS, cfg, timeout, root / f"rep{rep}_{arm}.log")
            runs.append({"rep": rep, "arm": arm, **summarise_run(out, callback)})
    arms: dict[str, Any] = {}
    for arm, (callback, mixed) in ARMS.items():
        mine = [r for r in runs if r["arm"] == arm]
        arms[arm] = {
            "callback": callback,
            "speeds": [speed_of(m, mixed) for m in range(MEMBERS)],
            "member_steps_per_s": spread([r["member_steps_per_s"] for r in mine]),
            "best_member_test_acc": spread([r["best_member"]["test_acc"] for r in mine]),
            "mean_member_test_acc": spread([r["mean_member_test_acc"] for r in mine]),
            "steps_per_member": [median(r["members"][m]["steps"] for r in mine) for m in range(MEMBERS)],
            "ready_step_breakdown": breakdown.summarise([breakdown.load(root / f"rep{r['rep']}_{arm}") for r in mine],
                                                        synchronous=callback == "sync") if callback else None,
        }

    def rate(arm: str) -> float:
        return arms[arm]["member_steps_per_s"]["median"]

    def paired(a: str, b: str) -> list[float]:
        by_rep = {(r["arm"], r["rep"]): r["member_steps_per_s"] for r in runs}
        return [by_rep[(a, rep)] / by_rep[(b, rep)] for rep in range(size["reps"])]

    async_over_sync = rate("async_mixed") / rate("sync_mixed")
    wait_over_sync, wait_over_async = (rate("async_wait_mixed") / rate(arm) for arm in ("sync_mixed", "async_mixed"))
    callback_over_none = rate("async_equal") / rate("none_equal")
    return clean_floats({
        "description": "4 members x 1 rank, two on an emulated 3x slower device (sleep-padded steps): "
                       "member-steps per second and best member's test accuracy at an equal wall-time budget, "
                       "synchronous vs asynchronous PBT; and, with equal speeds, the asynchronous callback vs "
                       "PopulationStrategy alone",
        "config": {"members": MEMBERS, "member_size": 1, "slow_members": list(SLOW_MEMBERS),
                   "slow_factor": SLOW_FACTOR, "base_step_s": BASE_STEP_S, "budget_s": size["budget_s"],
                   "every_n_train_steps": size["every"], "reps": size["reps"], "arms": list(ARMS),
                   "model": "MLP 64-64-10 (ReLU) on sklearn digits, batch 32, SGD, lr ~ LogUniform(1e-4, 1)",
                   "pbt": "truncation 0.25, monitor val_acc (max), burn_in 0",
                   "device": "each training batch padded with time.sleep to base_step_s x speed; the speed is "
                             "the member's (by member id), never copied by an exploit",
                   "timing": "common start barrier at on_train_start; each member stops at the first batch end "
                             "after budget_s; member-steps/s = sum over members of steps / own elapsed; "
                             "median over repetitions, arms alternating ABCD / DCBA"},
        "runs": runs,
        "arms": arms,
        "ratios": {"async_over_sync_mixed": async_over_sync, "async_over_sync_mixed_paired": paired("async_mixed",
                                                                                                  "sync_mixed"),
                   "async_callback_over_none_equal": callback_over_none,
                   "async_wait_over_sync_mixed": wait_over_sync, "async_wait_over_async_mixed": wait_over_async,
                   "async_wait_over_async_mixed_paired": paired("async_wait_mixed", "async_mixed"),
                   "async_callback_over_none_equal_paired": paired("async_equal", "none_equal"),
                   "ideal_async_over_sync_mixed": (MEMBERS - len(SLOW_MEMBERS) + len(SLOW_MEMBERS) / SLOW_FACTOR)
                   / (MEMBERS / SLOW_FACTOR)},
        "quality_at_equal_wall_time": {
            "sync_mixed": arms["sync_mixed"]["best_member_test_acc"],
            "async_mixed": arms["async_mixed"]["best_member_test_acc"],
            "async_wait_mixed": arms["async_wait_mixed"]["best_member_test_acc"],
        },
        "targets": {
            "async_over_sync_mixed": {"target": f">= {TARGET_ASYNC_OVER_SYNC}", "value": async_over_sync,
                                      "met": async_over_sync >= TARGET_ASYNC_OVER_SYNC, "applies": not smoke},
            "async_callback_over_none_equal": {"target": f">= {TARGET_CALLBACK_OVER_NONE}", "value": callback_over_none,
                                               "met": callback_over_none >= TARGET_CALLBACK_OVER_NONE,
                                               "applies": not smoke},
        },
    })


def summarise_run(out: Path, callback: str | None) -> dict[str, Any]:
    members = sorted((json.loads(p.read_text()) for p in out.glob("rank_*.json")), key=lambda r: r["member"])
    if len(members) != MEMBERS:
        raise RuntimeError(f"{out}: {len(members)} of {MEMBERS} members wrote a result")
    best = max(members, key=lambda r: (r["val_acc"], -r["member"]))
    result: dict[str, Any] = {
        "member_steps_per_s": sum(r["steps"] / r["elapsed_s"] for r in members),
        "members": [{k: r[k] for k in ("member", "speed", "steps", "elapsed_s", "val_acc", "test_acc", "lr",
                                       "busy_fraction", "overran_fraction")}
                    | {"cpu_ms_per_step": 1e3 * r["cpu_s"] / max(r["steps"], 1)} for r in members],
        "best_member": {k: best[k] for k in ("member", "speed", "val_acc", "test_acc", "steps")},
        "mean_member_test_acc": sum(r["test_acc"] for r in members) / len(members),
    }
    lineage = out / "pbt" / "lineage.jsonl"
    if callback and lineage.exists():
        lines = [json.loads(x) for x in lineage.read_text().splitlines() if x.strip()]
        result["ready_steps"] = sum(1 for x in lines if x["event"] != "init")
        result["exploits"] = sum(1 for x in lines if x["event"] == "exploit")
    return result


# -- the worker (a Lightning run) -----------------------------------------------------------------
def worker(cfg: dict[str, Any] | None = None) -> None:
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from bench.breakdown import ReadyStepRecorder
    from bench.quality import digits_split
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
    speed = speed_of(member, cfg["mixed"])
    start_lr = PBTScheduler(space, seed=seed).initial_hyperparameters(member)["lr"]  # what the callback starts with
    x_train, y_train, x_val, y_val, x_test, y_test = (torch.from_numpy(a) for a in digits_split())
    y_train, y_val, y_test = y_train.long(), y_val.long(), y_test.long()
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=len(x_val))

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
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    class EmulatedDevice(pl.Callback):
        """A device ``speed`` times slower than the base: each training step (the loop's whole iteration:
        fetching the batch, forward, backward, optimizer step) is padded to ``speed x base`` seconds.
        Validation and the ready step that follows it are not padded: they cost what they cost. Goes
        after the PBT callback, so that its ``on_validation_end`` runs after the ready step."""

        def __init__(self, step_s: float) -> None:
            self.step_s = step_s
            self.last_end: float | None = None
            self.validation_started = 0.0
            self.excluded = 0.0
            self.busy_s = 0.0  # the steps' real work, before padding
            self.validations: list[float] = []  # validation + ready step, each time
            self.batches = self.overran = 0  # steps, and those whose work alone took longer than step_s

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.last_end is None:
                self.last_end = time.perf_counter()

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            self.validation_started = time.perf_counter()

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            spent = time.perf_counter() - self.validation_started
            self.excluded += spent
            self.validations.append(spent)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            assert self.last_end is not None
            busy = time.perf_counter() - self.last_end - self.excluded
            self.busy_s += busy
            self.batches += 1
            self.overran += busy > self.step_s
            time.sleep(max(0.0, self.step_s - busy))
            self.last_end, self.excluded = time.perf_counter(), 0.0

    class WallBudget(pl.Callback):
        """Start together (a population barrier), stop alone at the first batch end after ``budget_s``."""

        def __init__(self, budget_s: float) -> None:
            self.budget_s = budget_s
            self.started = 0.0
            self.stopped: float | None = None
            self.steps = 0
            self.cpu_started = self.cpu_s = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            trainer.strategy.population.barrier()  # before any snapshot is requested: no p2p traffic yet
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            now = time.perf_counter()
            if self.stopped is None and now - self.started >= self.budget_s:
                self.stopped, self.steps = now, trainer.global_step
                self.cpu_s = time.process_time() - self.cpu_started
                trainer.should_stop = True

    # PBT, then the device (after the ready step, see EmulatedDevice), then the budget (each step at its
    # padded length; its barrier after the callback's start, so that the clock starts with training).
    callbacks: list[pl.Callback] = []
    recorder = None
    if cfg["callback"]:
        pbt = PopulationBasedTraining(space, monitor="val_acc", mode="max", every_n_train_steps=cfg["every"],
                                      seed=seed, dirpath=str(out / "pbt"), synchronous=cfg["callback"] == "sync",
                                      wait_for_peers=1.0 if cfg["callback"] == "async_wait" else None)
        recorder = ReadyStepRecorder(pbt)
        callbacks.append(pbt)
    device, budget = EmulatedDevice(cfg["base_step_s"] * speed), WallBudget(cfg["budget_s"])
    callbacks += [device, budget]
    torch.manual_seed(seed * 1000 + member)  # member k of every arm starts from the same weights
    model = Net(start_lr)
    trainer = pl.Trainer(
        accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]),
        strategy=PopulationStrategy(member_size=1, timeout=120),
        max_steps=10**7, max_epochs=None, val_check_interval=cfg["every"], check_val_every_n_epoch=None,
        default_root_dir=str(out), callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, train, val)
    if budget.stopped is None:
        raise RuntimeError(f"member {member} ended before its wall-time budget")
    model.eval()
    with torch.no_grad():
        val_acc = float((model.net(x_val).argmax(-1) == y_val).float().mean())
        test_acc = float((model.net(x_test).argmax(-1) == y_test).float().mean())
    rank = trainer.strategy.world_rank
    if recorder is not None:
        recorder.save(out / f"ready_rank{rank}.json", rank)
    (out / f"rank_{rank}.json").write_text(json.dumps({
        "member": member, "speed": speed, "steps": budget.steps, "elapsed_s": budget.stopped - budget.started,
        "val_acc": val_acc, "test_acc": test_acc, "start_lr": start_lr, "cpu_s": budget.cpu_s,
        "busy_fraction": device.busy_s / max(device.batches * device.step_s, 1e-9),
        "overran_fraction": device.overran / max(device.batches, 1), "step_s": device.step_s,
        "validations_s": device.validations,
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
    }))


if __name__ == "__main__":
    worker()
