"""Members that take turns: the same population as many processes of one member or few processes of many.

16 members as 16 processes x 1, 4 x 4 and 2 x 8 (``PopulationStrategy(members_per_process=K)``), and 4
members as 4 x 1 and 1 x 4 for the cost of the turns themselves. Each layout is one job started by
Lightning's own launcher (a fresh interpreter per process, as a user runs it), lockstep ready steps every
epoch, the same model, data and seed. Measured per layout, in one run, side by side:

- ``wall_s``: the whole job, from starting the first process to the last one's exit;
- ``startup_s``: from the start to the first member's ``on_train_start``;
- ``fit_s``: from the first member's ``on_train_start`` to the last member's ``on_train_end``;
- ``peak_rss_gb``: the peak resident memory of every process, summed;
- ``member_steps_per_s``: optimizer steps of all members over ``fit_s``;
- ``switch_fraction``: with turns, the time hand-overs took (saving and restoring the process RNGs and
  waking the next lane), summed over a process's switches, over its fit time (the largest process's).

Worker: ``python -m bench.turns '<json>'`` (Lightning's launcher re-executes it for the other ranks).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import SCRATCH, child_env, clean_floats, run_subprocess

NAME = "turns"
MEMBERS = 16
# (processes, members per process)
LAYOUTS = [(16, 1), (4, 4), (2, 8), (4, 1), (1, 4)]
SMOKE_LAYOUTS = [(2, 1), (1, 2)]
MODEL = {"inputs": 64, "hidden": 256, "samples": 1024, "batch": 32, "max_epochs": 3}
SMOKE_MODEL = {"inputs": 16, "hidden": 16, "samples": 64, "batch": 16, "max_epochs": 2}


def run(smoke: bool = False, timeout: float = 900) -> dict[str, Any]:
    layouts = SMOKE_LAYOUTS if smoke else LAYOUTS
    model = SMOKE_MODEL if smoke else MODEL
    results = {}
    for processes, lanes in layouts:
        name = f"{processes}x{lanes}"
        out = SCRATCH / NAME / name
        if out.exists():
            for path in out.rglob("*.json"):
                path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        cfg = {"out": str(out), "processes": processes, "lanes": lanes, **model, "launched_at": time.time()}
        started = time.perf_counter()
        run_subprocess([sys.executable, "-m", "bench.turns", json.dumps(cfg)], timeout, out / "log.txt", child_env())
        wall = time.perf_counter() - started
        results[name] = summarise(out, wall, cfg)
        print(f"[bench] turns {name}: {results[name]}", flush=True)
    payload: dict[str, Any] = {
        "description": "the same population as many processes of one member or few processes of members taking turns",
        "config": {"layouts": [f"{p}x{k}" for p, k in layouts], "model": model},
        "layouts": results, "model": model}
    if not smoke:
        sixteen, two_by_eight = results["16x1"], results["2x8"]
        payload["targets"] = {
            "rss_2x8_under_half_of_16x1": {
                "target": "< 0.5",
                "value": two_by_eight["peak_rss_gb"] / sixteen["peak_rss_gb"],
                "met": two_by_eight["peak_rss_gb"] < 0.5 * sixteen["peak_rss_gb"],
            },
            "wall_2x8_faster_than_16x1": {
                "target": "< 1",
                "value": two_by_eight["wall_s"] / sixteen["wall_s"],
                "met": two_by_eight["wall_s"] < sixteen["wall_s"],
            },
            "switches_under_2_percent_of_fit": {
                "target": "< 0.02",
                "value": max(r["switch_fraction"] for r in results.values() if r["lanes"] > 1),
                "met": max(r["switch_fraction"] for r in results.values() if r["lanes"] > 1) < 0.02,
            },
        }
    return clean_floats(payload)


def summarise(out: Path, wall: float, cfg: dict[str, Any]) -> dict[str, Any]:
    members = [json.loads(p.read_text()) for p in out.glob("member_*.json")]
    processes = [json.loads(p.read_text()) for p in out.glob("process_*.json")]
    first_start = min(m["train_start"] for m in members)
    fit = max(m["train_end"] for m in members) - first_start
    return {
        "processes": cfg["processes"],
        "lanes": cfg["lanes"],
        "members": len(members),
        "wall_s": wall,
        "startup_s": first_start - cfg["launched_at"],
        "fit_s": fit,
        "peak_rss_gb": sum(p["max_rss_kb"] for p in processes) / 2**20,
        "member_steps_per_s": sum(m["steps"] for m in members) / fit,
        "switches": sum(p["switches"] for p in processes),
        "switch_fraction": max(p["switch_seconds"] for p in processes) / fit,
    }


def worker(cfg: dict[str, Any]) -> None:
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_pbt import PopulationBasedTraining, PopulationStrategy
    from lightning_pbt.space import LogUniform

    out = Path(cfg["out"])

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.body = nn.Sequential(
                nn.Linear(cfg["inputs"], cfg["hidden"]), nn.ReLU(), nn.Linear(cfg["hidden"], cfg["hidden"]),
                nn.ReLU(), nn.Linear(cfg["hidden"], 2),
            )  # fmt: skip

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.body(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self.body(x).argmax(-1) == y).float().mean(), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class Clock(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.started = time.time()

        def on_train_end(self, trainer, pl_module):
            strategy = trainer.strategy
            if strategy.global_rank == 0:
                record = {"train_start": self.started, "train_end": time.time(), "steps": trainer.global_step}
                (out / f"member_{strategy.member_id}.json").write_text(json.dumps(record))

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["samples"], cfg["inputs"], generator=generator)
    y = (x[:, 0] > 0).long()
    strategy = PopulationStrategy(members_per_process=cfg["lanes"], timeout=600)
    trainer = pl.Trainer(
        accelerator="cpu", devices=cfg["processes"], strategy=strategy, max_epochs=cfg["max_epochs"],
        callbacks=[PopulationBasedTraining({"lr": LogUniform(1e-4, 1e-2)}, monitor="val_acc", every_n_epochs=1),
                   Clock()],
        default_root_dir=str(out), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(
        Net(),
        DataLoader(TensorDataset(x, y), batch_size=cfg["batch"], shuffle=True),
        DataLoader(TensorDataset(x[:256], y[:256]), batch_size=128),
    )
    turns = strategy.lane.turns
    record = {
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "switches": turns.switches if turns is not None else 0,
        "switch_seconds": turns.switch_seconds if turns is not None else 0.0,
    }
    (out / f"process_{os.environ.get('LOCAL_RANK', '0')}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
