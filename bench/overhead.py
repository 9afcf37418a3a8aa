"""3. Training overhead: optimizer steps per second with the PBT callback against the same population
under ``PopulationStrategy`` alone (a parallel random search), same model, data and validation.

Two members of one rank each (2 processes on this 2-core machine), Adam, a ready step every 50
optimizer steps with ``quantile_fraction=0.5``, so the worse member copies the better one at every
ready step (the exploit transfer is included). Validation runs every 50 steps in both arms.
Throughput is timed from a population barrier at step ``WARMUP`` to a population barrier after the last
optimizer step (so it includes every ready step; ``end_of_fit_ms`` is what each arm then spends until
``on_train_end`` has run on every rank: a once-per-fit cost, reported apart).

Arms alternate run by run (ABBA order) and each configuration is repeated; the ratio is the median
callback throughput over the median baseline throughput (``ratio_paired``: the spread of the ratios of
neighbouring runs; ``ready_time_fraction``: the share of the PBT runs' wall time spent inside ready
steps, waits for the slower member included, an upper bound of the overhead). Because other jobs share
this machine, the wall-clock ratios are noisy; two measures resist that: ``interleaved_ratio``, from one
run whose 100-step segments alternate with the ready steps on and off (same processes), and the CPU-time
ratios (``cpu_ratio``, ``interleaved_cpu_ratio``: CPU seconds per optimizer step of every rank, which
waiting for a descheduled peer does not inflate). Two model sizes show
how the fixed cost of a ready step weighs against the compute between ready steps.

``ready_step_breakdown`` (issue 12 item 6, from the wall-clock PBT runs, every rank, every ready step;
see ``bench/breakdown.py``): how much of a ready step is members waiting for each other in the
all-gather versus the step's own work (the all-gather itself, decide + broadcast, the exploit transfer,
the rest of the callback), and what the lineage costs the training thread (handing lines over) and its
background thread (the write and fsync).

Worker: ``torchrun --standalone --nproc_per_node=2 -m bench.overhead '<json>'``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench import breakdown
from bench.breakdown import ReadyStepRecorder
from bench.common import SCRATCH, clean_floats, launch, median, spread, worker_config

NAME = "overhead"
TARGET_RATIO = 0.97
EVERY = 50
WARMUP = 25
MEMBERS = 2

# name: (input dim, hidden widths, classes, batch size, max_steps, repetitions per arm)
MODELS: dict[str, dict[str, Any]] = {
    "mlp_0.4M": {"inputs": 256, "hidden": [512, 512], "classes": 10, "batch": 128, "max_steps": 325, "reps": 8},
    "tiny_2.8k": {"inputs": 32, "hidden": [64], "classes": 10, "batch": 32, "max_steps": 325, "reps": 8},
}
SMOKE_MODELS = {"tiny_2.8k": {"inputs": 32, "hidden": [64], "classes": 10, "batch": 32, "max_steps": 60, "reps": 1}}
HEADLINE = "mlp_0.4M"
# The interleaved measurement: one run alternates segments of SEGMENT steps with the callback's ready
# steps on and off (two ready intervals each); SEGMENT_PAIRS on/off pairs per run, SEGMENT_RUNS runs.
SEGMENT, SEGMENT_PAIRS, SEGMENT_RUNS = 100, 4, 3
SMOKE_SEGMENT, SMOKE_SEGMENT_PAIRS, SMOKE_SEGMENT_RUNS = 40, 1, 1


def run(smoke: bool = False, timeout: float = 300) -> dict[str, Any]:
    models = SMOKE_MODELS if smoke else MODELS
    every = 20 if smoke else EVERY
    warmup = 10 if smoke else WARMUP
    root = SCRATCH / f"{NAME}{'_smoke' if smoke else ''}"
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    for model_name, spec in models.items():
        runs: dict[str, list[dict[str, Any]]] = {"pbt": [], "baseline": []}
        ready_records: list[list[dict[str, Any]]] = []
        order = []
        for rep in range(spec["reps"]):
            order += ["pbt", "baseline"] if rep % 2 == 0 else ["baseline", "pbt"]
        for index, arm in enumerate(order):
            out = root / f"{model_name}_{index:02d}_{arm}"
            cfg = {"out": str(out), "pbt": arm == "pbt", "model": spec, "every": every, "warmup": warmup, "seed": 0}
            launch("bench.overhead", MEMBERS, cfg, timeout, root / f"{model_name}_{index:02d}_{arm}.log")
            runs[arm].append(json.loads((out / "result.json").read_text()))
            if arm == "pbt":
                ready_records.append(breakdown.load(out))
        segment, pairs = (SMOKE_SEGMENT, SMOKE_SEGMENT_PAIRS) if smoke else (SEGMENT, SEGMENT_PAIRS)
        segment_ratios, segment_cpu_ratios, segment_ready = [], [], []
        for index in range(SMOKE_SEGMENT_RUNS if smoke else SEGMENT_RUNS):
            out = root / f"{model_name}_segments_{index:02d}"
            seg_spec = {**spec, "max_steps": warmup + 2 * segment * pairs}
            cfg = {"out": str(out), "pbt": True, "model": seg_spec, "every": every, "warmup": warmup, "seed": 0,
                   "segments": {"length": segment, "first_on": index % 2 == 0}}
            launch("bench.overhead", MEMBERS, cfg, timeout, root / f"{model_name}_segments_{index:02d}.log")
            result = json.loads((out / "result.json").read_text())
            on = [(t, c) for arm, t, c in result["segments"] if arm == "on"]
            off = [(t, c) for arm, t, c in result["segments"] if arm == "off"]
            for (t_on, c_on), (t_off, c_off) in zip(on, off, strict=True):
                segment_ratios.append(t_off / t_on)  # steps/s with the ready steps / without
                segment_cpu_ratios.append(c_off / c_on)  # the same in CPU seconds per step
            segment_ready.append(result["ready_steps"])
        pbt_rates = [r["steps_per_s"] for r in runs["pbt"]]
        base_rates = [r["steps_per_s"] for r in runs["baseline"]]
        paired = [p / b for p, b in zip(pbt_rates, base_rates, strict=True)]  # run i of each arm are neighbours
        ready = [t for r in runs["pbt"] for t in r["ready_ms"]]
        rows.append({
            "model": model_name,
            "params": runs["pbt"][0]["params"],
            "state_mb": runs["pbt"][0]["state_bytes"] / 1e6,
            "batch": spec["batch"],
            "steps_timed": spec["max_steps"] - warmup,
            "reps": spec["reps"],
            "pbt_steps_per_s": median(pbt_rates),
            "baseline_steps_per_s": median(base_rates),
            "ratio": median(pbt_rates) / median(base_rates),
            "ratio_paired": spread(paired),
            "ready_time_fraction": median(r["ready_s"] / r["wall_s"] for r in runs["pbt"]),
            "end_of_fit_ms": {"pbt": median(r["end_of_fit_s"] for r in runs["pbt"]) * 1e3,
                              "baseline": median(r["end_of_fit_s"] for r in runs["baseline"]) * 1e3},
            "interleaved_ratio": spread(segment_ratios),
            "interleaved_cpu_ratio": spread(segment_cpu_ratios),
            "cpu_ratio": median(r["cpu_s_per_step"] for r in runs["baseline"])
            / median(r["cpu_s_per_step"] for r in runs["pbt"]),
            "cpu_ms_per_step": {arm: median(r["cpu_s_per_step"] for r in runs[arm]) * 1e3 for arm in runs},
            "interleaved": {"segment_steps": segment, "pairs_per_run": pairs, "runs": len(segment_ready),
                            "ready_steps_per_run": segment_ready},
            "pbt_spread": spread(pbt_rates),
            "baseline_spread": spread(base_rates),
            "ready_steps_per_run": runs["pbt"][0]["ready_steps"],
            "exploits_per_run": median(r["exploits"] for r in runs["pbt"]),
            "ready_step_ms": spread([t["total"] for t in ready]),
            "ready_step_transfer_ms": median(t["transfer"] for t in ready),
            "ready_step_gather_ms": median(t["gather"] for t in ready),
            "step_ms_baseline": 1e3 / median(base_rates),
            "ready_step_breakdown": breakdown.summarise(ready_records, synchronous=True),
        })
    headline = next((r for r in rows if r["model"] == HEADLINE), rows[0])
    return clean_floats({
        "description": "optimizer steps/s of 2 members x 1 rank with the PBT callback (ready every "
                       f"{every} steps, exploit at every ready step) vs PopulationStrategy alone",
        "config": {"members": MEMBERS, "member_size": 1, "every_n_train_steps": every, "warmup_steps": warmup,
                   "optimizer": "Adam", "quantile_fraction": 0.5, "models": models,
                   "timing": "population barrier at the warm-up step to a population barrier after the last "
                             "optimizer step; arms alternate ABBA; median over runs"},
        "rows": rows,
        "targets": {"ratio": {"target": f">= {TARGET_RATIO}", "model": headline["model"], "value": headline["ratio"],
                              "met": headline["ratio"] >= TARGET_RATIO, "applies": not smoke,
                              "interleaved_value": headline["interleaved_ratio"]["median"],
                              "interleaved_met": headline["interleaved_ratio"]["median"] >= TARGET_RATIO,
                              "cpu_value": headline["cpu_ratio"], "cpu_met": headline["cpu_ratio"] >= TARGET_RATIO}},
    })


# -- the worker (a Lightning run) -----------------------------------------------------------------
def worker(cfg: dict[str, Any] | None = None) -> None:
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_pbt import LogUniform, PopulationBasedTraining, PopulationStrategy
    from lightning_pbt.algorithm.scheduler import PBTScheduler
    from lightning_pbt.plugin.strategy import member_id_from_env

    cfg = worker_config(cfg)
    spec = cfg["model"]
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(cfg["seed"], verbose=False)
    space = {"lr": LogUniform(1e-4, 1e-2)}
    member = member_id_from_env()
    start_lr = PBTScheduler(space, seed=cfg["seed"]).initial_hyperparameters(member)["lr"]

    generator = torch.Generator().manual_seed(1234)
    n = 4096
    x = torch.randn(n, spec["inputs"], generator=generator)
    teacher = torch.randn(spec["inputs"], spec["classes"], generator=generator)
    y = (x @ teacher + 0.5 * torch.randn(n, spec["classes"], generator=generator)).argmax(-1)
    train = DataLoader(TensorDataset(x[:3584], y[:3584]), batch_size=spec["batch"], shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(x[3584:], y[3584:]), batch_size=256)

    class Net(pl.LightningModule):
        def __init__(self, lr: float) -> None:
            super().__init__()
            self.save_hyperparameters()
            widths = [spec["inputs"], *spec["hidden"]]
            layers: list[nn.Module] = []
            for a, b in itertools.pairwise(widths):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.net = nn.Sequential(*layers, nn.Linear(widths[-1], spec["classes"]))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            inputs, target = batch
            return nn.functional.cross_entropy(self.net(inputs), target)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            inputs, target = batch
            self.log("val_loss", nn.functional.cross_entropy(self.net(inputs), target), sync_dist=True)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    class Clock(pl.Callback):
        """Population barriers at the warm-up step, after the last optimizer step and after training."""

        def __init__(self, end: bool) -> None:
            self.end = end
            self.started = self.finished = self.fit_finished = 0.0
            self.cpu_started = self.cpu_finished = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if not self.end and trainer.global_step == cfg["warmup"] and not self.started:
                trainer.strategy.population.barrier()
                self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.end and trainer.global_step == spec["max_steps"] and not self.finished:
                trainer.strategy.population.barrier()
                self.finished, self.cpu_finished = time.perf_counter(), time.process_time()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.end:
                trainer.strategy.population.barrier()
                self.fit_finished = time.perf_counter()

    class Segments(pl.Callback):
        """Population barriers at segment boundaries; the callback's ready steps only in "on" segments."""

        def __init__(self, length: int, first_on: bool) -> None:
            self.length, self.first_on = length, first_on
            self.marks: list[float] = []
            self.cpu_marks: list[float] = []

        def is_on(self, step: int) -> bool:
            index = (step - 1 - cfg["warmup"]) // self.length  # the segment that optimizer step `step` ends
            return (index % 2 == 0) == self.first_on

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            if step >= cfg["warmup"] and (step - cfg["warmup"]) % self.length == 0:
                trainer.strategy.population.barrier()
                self.marks.append(time.perf_counter())
                self.cpu_marks.append(time.process_time())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            trainer.strategy.population.barrier()
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

    start, end = Clock(end=False), Clock(end=True)
    callbacks: list[pl.Callback] = [start]
    pbt = segments = recorder = None
    if cfg.get("segments"):
        segments = Segments(cfg["segments"]["length"], cfg["segments"]["first_on"])
        callbacks = [segments]
    if cfg["pbt"]:
        pbt = PopulationBasedTraining(space, monitor="val_loss", mode="min", every_n_train_steps=cfg["every"],
                                      quantile_fraction=0.5, seed=cfg["seed"], dirpath=str(out / "pbt"))
        recorder = ReadyStepRecorder(pbt)
        if segments is not None:
            ready_step = pbt.on_validation_end

            def gated(trainer: Any, pl_module: Any) -> None:
                if segments.is_on(trainer.global_step):
                    ready_step(trainer, pl_module)

            pbt.on_validation_end = gated  # type: ignore[method-assign]
        callbacks.append(pbt)
    if segments is None:
        callbacks.append(end)
    trainer = pl.Trainer(
        accelerator="cpu", devices=MEMBERS, strategy=PopulationStrategy(member_size=1, timeout=120),
        max_steps=spec["max_steps"], val_check_interval=cfg["every"], check_val_every_n_epoch=None,
        default_root_dir=str(out), callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    model = Net(start_lr)
    trainer.fit(model, train, val)
    rank = trainer.strategy.world_rank
    if recorder is not None and segments is None:
        recorder.save(out / f"ready_rank{rank}.json", rank)
    steps = spec["max_steps"] - cfg["warmup"]
    population = trainer.strategy.population
    if segments is not None:
        # marks: every segment start, then the end of training (after the last segment's last step)
        spans = [b - a for a, b in itertools.pairwise(segments.marks)]
        cpu = torch.tensor([b - a for a, b in itertools.pairwise(segments.cpu_marks)], dtype=torch.float64)
        cpu_spans = population.all_gather(cpu).sum(dim=0).tolist()  # CPU seconds of all ranks
        result_segments = [["on" if segments.is_on(cfg["warmup"] + i * segments.length + 1) else "off", span,
                            cpu_spans[i]] for i, span in enumerate(spans)]
    else:
        cpu_total = float(population.all_gather(torch.tensor([end.cpu_finished - start.cpu_started],
                                                             dtype=torch.float64)).sum())
    result = {
        "rank": rank,
        "segments": result_segments if segments is not None else None,
        "steps_per_s": steps / (end.finished - start.started) if segments is None else None,
        "cpu_s_per_step": cpu_total / steps if segments is None else None,
        "wall_s": end.finished - start.started if segments is None else None,
        "end_of_fit_s": end.fit_finished - end.finished if segments is None else None,
        "ready_s": 0.0,
        "params": sum(p.numel() for p in model.parameters()),
        "state_bytes": 3 * 4 * sum(p.numel() for p in model.parameters()),
        "ready_ms": [], "ready_steps": 0, "exploits": 0,
    }
    if pbt is not None and rank == 0:
        from lightning_pbt.algorithm.lineage import read_lineage

        records = [r for r in read_lineage(out / "pbt" / "lineage.jsonl") if r.event != "init"]
        steps_seen = sorted({r.step for r in records})
        result["ready_steps"] = len(steps_seen)
        result["exploits"] = sum(1 for r in records if r.event == "exploit")
        by_step = {r.step: r.timing for r in records if r.timing}
        result["ready_ms"] = [{k: v * 1e3 for k, v in t.items()} | {"total": sum(t.values()) * 1e3}
                              for t in by_step.values()]
        result["ready_s"] = sum(t["total"] for t in result["ready_ms"]) / 1e3
        if segments is not None:
            result["ready_steps_at"] = steps_seen
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    worker()
