"""Resident memory of every rank over an asynchronous run through a real Trainer (issue 33 item 1).

``bench/snapshot_memory.py`` drives the snapshot server alone; this one takes the path a user's run takes:
four members of one rank each (Lightning's ``Trainer`` with ``PopulationStrategy`` and
``PopulationBasedTraining(synchronous=False)``), a model of a few MB, AdamW with two parameter groups, a
per-step warm-up LR scheduler, bf16-mixed precision, gradient accumulation and clipping, members of
unequal speed (members 2 and 3 train on twice as many batches per optimizer step), natural step times
(no padding), a ready step every ``every`` optimizer steps. Each rank reads its own ``VmRSS`` at every
ready step; population rank 0 also reads how many keys the launch's store holds (the store lives in
its process). The row, per rank: RSS after ``warmup`` ready steps, at the end, and the growth between
(target: flat within 10 MB over >= 200 ready steps after warm-up).

Arms, one launch each: ``pbt`` (the run above); ``none``: the same Trainer with ``PopulationStrategy`` alone
and no callback, RSS read at the same validations (what Lightning, torch and the allocator do without
PBT); ``pbt_mmap_threshold``: ``pbt`` with glibc's ``mallopt(M_MMAP_THRESHOLD, 1 MiB)`` in every rank
(what ``MALLOC_MMAP_THRESHOLD_=1048576`` does: blocks of 1 MiB and more are mapped and unmapped, never
kept in the heap; glibc otherwise raises that threshold to the largest block freed, up to 32 MiB, and
keeps freed heap it cannot return).

Not a timed test: ``python -m bench --only trainer_memory`` (or ``--smoke``-free ``python -m
bench.trainer_memory``). Worker: ``torchrun --standalone --nproc_per_node=4 -m bench.trainer_memory '<json>'``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from bench.common import SCRATCH, clean_floats, launch, worker_config

NAME = "trainer_memory"
MEMBERS = 4
FULL = {"ready_steps": 240, "warmup": 30, "every": 2}
SMOKE = {"ready_steps": 12, "warmup": 4, "every": 2}
TARGET_MB = 10.0
ARMS = {"pbt": {"callback": True}, "none": {"callback": False},
        "pbt_mmap_threshold": {"callback": True, "mmap_threshold": 1 << 20}}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# -- the launcher side ----------------------------------------------------------------------------
def run(smoke: bool = False, timeout: float = 900) -> dict[str, Any]:
    size = SMOKE if smoke else FULL
    root = SCRATCH / f"{NAME}{'_smoke' if smoke else ''}"
    shutil.rmtree(root, ignore_errors=True)
    arms = {arm: measure_arm(root / arm, {**size, **options}, timeout) for arm, options in ARMS.items()}
    worst = {arm: max(abs(row["growth_mb"]) for row in rows) for arm, rows in arms.items()}
    return clean_floats({
        "description": "every rank's resident memory over >= 200 asynchronous ready steps of a real Trainer with "
                       "PopulationBasedTraining(synchronous=False), after a warm-up; the same run without the "
                       "callback, and with glibc's mmap threshold fixed at 1 MiB",
        "config": {"members": MEMBERS, "member_size": 1, **size, "arms": ARMS,
                   "model": "MLP 256-1024-1024-10 (about 1.3 M parameters), AdamW with two parameter groups, "
                            "LambdaLR warm-up stepped every optimizer step, bf16-mixed, accumulate_grad_batches 2 "
                            "(members 2, 3: 4), gradient_clip_val 1.0, ready every `every` optimizer steps, natural "
                            "step times"},
        "rows": arms["pbt"],
        "arms": arms,
        "targets": {"flat_within_mb": {"target": f"|growth| <= {TARGET_MB} MB on every rank", "value": worst["pbt"],
                                       "met": worst["pbt"] <= TARGET_MB, "applies": not smoke},
                    "flat_within_mb_mmap_threshold": {
                        "target": f"|growth| <= {TARGET_MB} MB on every rank, mmap threshold 1 MiB",
                        "value": worst["pbt_mmap_threshold"], "met": worst["pbt_mmap_threshold"] <= TARGET_MB,
                        "applies": not smoke}},
    })


def measure_arm(out: Path, cfg: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """One launch: a row per rank (RSS after warm-up and at the end, store keys, exploits)."""
    launch("bench.trainer_memory", MEMBERS, {"out": str(out), **cfg}, timeout, out.with_suffix(".log"))
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank_*.json")), key=lambda r: r["rank"])
    if len(ranks) != MEMBERS:
        raise RuntimeError(f"{out}: {len(ranks)} of {MEMBERS} ranks wrote a result")
    rows = []
    for record in ranks:
        trace = record["rss_mb"]
        warm = trace[cfg["warmup"] - 1]
        rows.append({
            "rank": record["rank"],
            "ready_steps": len(trace),
            "ready_steps_after_warmup": len(trace) - cfg["warmup"],
            "exploits": record["exploits"],
            "state_mb": record["state_mb"],
            "rss_after_warmup_mb": warm,
            "rss_end_mb": trace[-1],
            "growth_mb": trace[-1] - warm,
            "peak_growth_mb": max(trace[cfg["warmup"] - 1:]) - warm,
            "store_keys": record.get("store_keys"),
        })
    return rows


# -- the worker (a Lightning run) -----------------------------------------------------------------
def worker(cfg: dict[str, Any] | None = None) -> None:
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_pbt import LogUniform, PopulationBasedTraining, PopulationStrategy, Uniform
    from lightning_pbt.plugin.strategy import member_id_from_env

    cfg = worker_config(cfg)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if cfg.get("mmap_threshold"):
        import ctypes

        if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(cfg["mmap_threshold"])):
            raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
    member = member_id_from_env()
    pl.seed_everything(member, verbose=False)
    accumulate = 2 if member < 2 else 4  # unequal speeds: members 2 and 3 need twice the batches per step
    every = int(cfg["every"])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=generator)
    y = (x[:, :10].argmax(-1)).long()
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU())
            self.head = nn.Linear(1024, 10)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(inputs))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            inputs, targets = batch
            return nn.functional.cross_entropy(self(inputs), targets)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            inputs, targets = batch
            self.log("val_acc", (self(inputs).argmax(-1) == targets).float().mean(), sync_dist=True)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(
                [{"params": self.body.parameters()}, {"params": self.head.parameters(), "lr": 3e-3}],
                lr=1e-3, weight_decay=1e-2,
            )
            warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    class Memory(pl.Callback):
        """After the PBT callback: this rank's RSS at each of its ready steps (and the store's key count)."""

        def __init__(self, pbt: PopulationBasedTraining | None) -> None:
            self.pbt = pbt
            self.seen = 0
            self.rss: list[float] = []
            self.keys: list[int] = []

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            count = self.pbt.ready_count if self.pbt is not None else self.seen + 1  # without PBT: each validation
            if count == self.seen:
                return
            self.seen = count
            self.rss.append(rss_mb())
            if trainer.strategy.world_rank == 0:
                self.keys.append(trainer.strategy.population.store.num_keys())
            if self.seen >= cfg["ready_steps"]:
                trainer.should_stop = True

    pbt = PopulationBasedTraining(
        {"lr": LogUniform(1e-4, 1e-2), "weight_decay": Uniform(0.0, 0.05)}, monitor="val_acc", mode="max",
        every_n_train_steps=every, synchronous=False, dirpath=str(out / "pbt"), seed=0,
    )
    pbt = pbt if cfg["callback"] else None
    memory = Memory(pbt)
    trainer = pl.Trainer(
        accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=PopulationStrategy(timeout=300),
        precision="bf16-mixed", accumulate_grad_batches=accumulate, gradient_clip_val=1.0,
        max_steps=10**7, max_epochs=None, val_check_interval=every * accumulate, check_val_every_n_epoch=None,
        limit_val_batches=1, default_root_dir=str(out), callbacks=[c for c in (pbt, memory) if c], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(Net(), train, val)
    state = sum(t.numel() * t.element_size() for t in trainer.lightning_module.state_dict().values())
    state += sum(
        v.numel() * v.element_size()
        for s in trainer.optimizers[0].state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    rank = trainer.strategy.world_rank
    lineage = out / "pbt" / "lineage.jsonl"
    lines = [json.loads(line) for line in lineage.read_text().splitlines()] if rank == 0 and pbt else []
    (out / f"rank_{rank}.json").write_text(json.dumps({
        "rank": rank, "member": member, "rss_mb": memory.rss, "store_keys": memory.keys or None,
        "exploits": sum(1 for line in lines if line["event"] == "exploit") if rank == 0 and pbt else None,
        "state_mb": state / 2**20,
    }))


if __name__ == "__main__":
    worker()


def render_section(r: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: one row per arm and rank."""
    t = r["targets"]["flat_within_mb"]
    out = ["", "## Resident memory over asynchronous ready steps (real Trainer, 4 members x 1 rank, CPU)", "",
           f"`{r['command']}`, {r['date']}. {r['config']['model']}. RSS (`VmRSS`) of each rank at its ready steps; "
           f"growth from ready step {r['config']['warmup']} to the last. Target: {t['target']} "
           f"({'met' if t['met'] else 'missed'}: worst {t['value']:.1f} MB). `none`: no PBT callback, RSS at the same "
           "validations; `pbt mmap threshold`: glibc's mmap threshold fixed at 1 MiB "
           "(`MALLOC_MMAP_THRESHOLD_=1048576`).", ""]
    arms = r.get("arms") or {"pbt": r["rows"]}
    rows = [f"| {arm.replace('_', ' ')} | {row['rank']} | {row['ready_steps_after_warmup']} | {row['state_mb']:.1f} | "
            f"{row['rss_after_warmup_mb']:.1f} | {row['rss_end_mb']:.1f} | **{row['growth_mb']:+.1f}** | "
            f"{row['peak_growth_mb']:+.1f} |" for arm, arm_rows in arms.items() for row in arm_rows]
    keys = r["rows"][0].get("store_keys") or []
    out += ["| arm | rank | ready steps after warm-up | state MB | RSS after warm-up MB | RSS at the end MB | "
            "growth MB | peak growth MB |", "|---|---|---|---|---|---|---|---|", *rows]
    if keys:
        out += ["", f"Keys in the launch's store (rank 0's process) at ready steps 1, {len(keys) // 2} and "
                f"{len(keys)}: {keys[0]}, {keys[len(keys) // 2 - 1]}, {keys[-1]}; exploits in the run: "
                f"{r['rows'][0]['exploits']}."]
    return out
