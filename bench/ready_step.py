"""2. Ready-step latency without a transfer, as the population grows (2, 4, 8, 16 ranks of a tiny model).

"Ours" is the callback's whole synchronous ready step, ``PopulationBasedTraining.on_validation_end`` ->
``SynchronousReadySteps.step``: the all-gather of the 5-float row [score, step, epoch, missing, done]
over the ``PopulationGroup``, the decision on population rank 0 (``_decide``), its ``broadcast_json``,
``_move_states`` (nothing to move), applying the plan, handing the lineage lines to the background
writer, and the callback's report. ``burn_in`` is set beyond the run, so every plan is ``keep``: this is
the fixed cost every ready step pays. The Trainer is replaced by a stand-in holding the module, its
optimizer and the monitored metric (a random score per rank and step), so that what is timed is the
ready step alone.

References, in the same processes and on the same population group, interleaved:
``raw_allgather`` = a bare ``all_gather`` of the same 5-float64 row; ``collectives`` = that all-gather
plus ``broadcast_json`` of the very decision the ready step broadcast (the collectives a ready step
cannot avoid). Each repetition starts after a barrier; its time is the slowest rank's.

Breakdown (issue 12 item 6, the step's own work): the step's ``timing`` (``gather``: the store write
that wakes members that have stopped, then the all-gather; ``decide`` = decide + broadcast;
``transfer``), the time the training thread spends handing the lineage lines over (``lineage_submit``:
it waits only if the previous write is still running) and the background write itself
(``lineage_write``, with its fsync, off the training thread). Here every rank starts after a barrier,
so the gather holds almost no waiting; ``bench/overhead.py`` reports the same breakdown in real
training, where members arrive at different times.

All population sizes run in one launch of ``max(sizes)`` ranks: for size N, ranks < N build their
own ``PopulationGroup`` (as ``PopulationStrategy`` does) while the others wait in a barrier.
Note: this machine has 2 cores, so 8 and 16 ranks are oversubscribed, for ours and the reference alike.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.common import SCRATCH, clean_floats, launch, median, spread, worker_config

NAME = "ready_step"
SIZES = (2, 4, 8, 16)
SMOKE_SIZES = (2,)
ROW = 6  # the synchronous ready step's row: score, step, epoch, missing, done, last


def reps_for(size: int, smoke: bool) -> tuple[int, int]:
    return (2, 5) if smoke else (5, 40)


def run(smoke: bool = False, timeout: float = 600) -> dict[str, Any]:
    sizes = SMOKE_SIZES if smoke else SIZES
    out = SCRATCH / f"{NAME}{'_smoke' if smoke else ''}.json"
    out.unlink(missing_ok=True)
    lineage_dir = SCRATCH / f"{NAME}_lineage{'_smoke' if smoke else ''}"
    shutil.rmtree(lineage_dir, ignore_errors=True)
    cfg = {"out": str(out), "sizes": list(sizes), "smoke": smoke, "lineage_dir": str(lineage_dir)}
    launch("bench.ready_step", max(sizes), cfg, timeout, out.with_suffix(".log"))
    rows = json.loads(out.read_text())["rows"]
    base = rows[0]
    for row in rows:
        row["ours_growth"] = row["ours_ms"] / base["ours_ms"]
        row["raw_allgather_growth"] = row["raw_allgather_ms"] / base["raw_allgather_ms"]
        row["collectives_growth"] = row["collectives_ms"] / base["collectives_ms"]
        row["ours_minus_collectives_ms"] = row["ours_ms"] - row["collectives_ms"]
    last = rows[-1]
    met = len(rows) > 1 and last["ours_growth"] <= last["raw_allgather_growth"]
    return clean_floats({
        "description": "synchronous ready step without transfer (row all-gather + decision + plan broadcast + "
                       "apply + lineage hand-over), against a bare all-gather of the same row on the same group, "
                       "same processes; with the step's own breakdown",
        "config": {"sizes": list(sizes), "model": "Linear(8, 32)-ReLU-Linear(32, 2), SGD", "member_size": 1,
                   "reps": reps_for(sizes[-1], smoke)[1], "row_floats": ROW,
                   "timing": "median over repetitions of the slowest rank, each after a barrier; breakdown: "
                             "median over repetitions of the slowest rank per phase (lineage: rank 0)"},
        "rows": rows,
        "targets": {
            "grows_no_faster_than_allgather": {
                "target": f"ours({sizes[-1]})/ours({sizes[0]}) <= allgather({sizes[-1]})/allgather({sizes[0]})",
                "value": {"ours_growth": last["ours_growth"], "raw_allgather_growth": last["raw_allgather_growth"]},
                "met": bool(met), "applies": len(rows) > 1,
            },
        },
    })


class _NoPrecision:
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def time_lineage_writer(writer: Any, submits: list[float], writes: list[float]) -> None:
    """Record, on this ``LineageWriter`` instance, how long the training thread spends in
    ``write_in_background`` and how long each write takes on the background thread."""
    write, write_in_background = writer.write, writer.write_in_background

    def timed_write(records: Any) -> None:
        started = time.perf_counter()
        write(records)
        writes.append(time.perf_counter() - started)

    def timed_submit(records: Any) -> None:
        started = time.perf_counter()
        write_in_background(records)
        submits.append(time.perf_counter() - started)

    writer.write = timed_write
    writer.write_in_background = timed_submit


def _measure_size(size: int, rank: int, store: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from pytorch_lightning.trainer.states import TrainerFn
    from torch import nn

    from lightning_pbt import LogUniform, PopulationBasedTraining
    from lightning_pbt.algorithm.topology import PopulationTopology
    from lightning_pbt.distributed.collectives import PopulationGroup
    from lightning_pbt.plugin.turns import MemberLane

    population = PopulationGroup.create(dist.PrefixStore(f"size_{size}/", store), rank, size, "gloo",
                                        torch.device("cpu"), timedelta(seconds=300))
    topology = PopulationTopology(world_size=size, world_rank=rank, member_size=1)
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    strategy = SimpleNamespace(population=population, topology=topology, num_members=topology.num_members,
                               member_id=topology.member_id, world_rank=rank, run_dir=None,
                               root_device=torch.device("cpu"), fit_generation=0, lane=MemberLane())
    trainer = SimpleNamespace(
        lightning_module=model, optimizers=[optimizer], lr_scheduler_configs=[], precision_plugin=_NoPrecision(),
        strategy=strategy, callbacks=[], callback_metrics={}, global_step=0, current_epoch=0, sanity_checking=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING), loggers=[], is_last_batch=False,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=0), min_steps=None, min_epochs=None),
        num_training_batches=10**9, val_check_batch=1, max_steps=-1, max_epochs=None, should_stop=False,
    )
    pbt = PopulationBasedTraining({"lr": LogUniform(1e-4, 1e-1)}, monitor="val_acc", mode="max",
                                  every_n_train_steps=1, burn_in=10**9, seed=0,
                                  dirpath=os.path.join(cfg["lineage_dir"], f"size_{size}"))
    pbt._strategy = strategy  # what setup() stores; the stand-in has what the ready step reads
    pbt.on_train_start(trainer, model)
    protocol = pbt._protocol
    assert protocol is not None and protocol.synchronous
    captured: dict[str, Any] = {}
    decide, log_status = protocol._decide, pbt._log_status

    def capture_decision(table: Any, logged: Any = ()) -> Any:
        captured["decision"] = decide(table, logged)
        return captured["decision"]

    def capture_timing(trainer: Any, result: Any, last: bool) -> None:
        captured["timing"] = dict(result.timing)
        log_status(trainer, result, last)

    protocol._decide = capture_decision  # type: ignore[method-assign]
    pbt._log_status = capture_timing  # type: ignore[method-assign]
    submits: list[float] = []
    writes: list[float] = []
    if protocol.lineage is not None:
        time_lineage_writer(protocol.lineage, submits, writes)
    generator = torch.Generator().manual_seed(1000 + rank)
    row = torch.zeros(ROW, dtype=torch.float64)
    decision: Any = None

    def ours() -> None:
        trainer.global_step += 1
        trainer.callback_metrics["val_acc"] = torch.rand((), generator=generator)
        pbt.on_validation_end(trainer, model)

    def raw_allgather() -> None:
        population.all_gather(row)

    def collectives() -> None:
        population.all_gather(row)
        population.broadcast_json(decision if rank == 0 else None, root=0)

    warmup, reps = reps_for(size, cfg["smoke"])
    ours()  # first decision: its JSON is what the collectives reference broadcasts
    decision = captured.get("decision")
    names = ["ours", "raw_allgather", "collectives"]
    methods = {"ours": ours, "raw_allgather": raw_allgather, "collectives": collectives}
    times = torch.zeros(len(names), warmup + reps, dtype=torch.float64)
    phases = torch.zeros(3, warmup + reps, dtype=torch.float64)
    for rep in range(warmup + reps):
        for name in names if rep % 2 == 0 else reversed(names):
            population.barrier()
            started = time.perf_counter()
            methods[name]()
            times[names.index(name), rep] = time.perf_counter() - started
        timing = captured["timing"]
        phases[:, rep] = torch.tensor([timing["gather"], timing["decide"], timing["transfer"]], dtype=torch.float64)
        decision = captured.get("decision")  # the latest decision (histories grow for a while)
    events = {plan["event"] for plan in decision["plans"].values()} if decision else set()
    pbt._protocol.close()  # waits for the last background write
    lineage = torch.tensor([median(submits[warmup + 1:]), median(writes[warmup + 1:])] if rank == 0 else [0.0, 0.0],
                           dtype=torch.float64)
    lineage = population.all_gather(lineage)[0]
    slowest = population.all_gather(times).amax(dim=0)[:, warmup:]
    phase_max = population.all_gather(phases).amax(dim=0)[:, warmup:]
    per = {name: [float(x) for x in slowest[i]] for i, name in enumerate(names)}
    return {
        "ranks": size,
        "reps": reps,
        "ours_ms": median(per["ours"]) * 1e3,
        "raw_allgather_ms": median(per["raw_allgather"]) * 1e3,
        "collectives_ms": median(per["collectives"]) * 1e3,
        "ratio": median(per["ours"]) / median(per["raw_allgather"]),
        "ratio_vs_collectives": median(per["ours"]) / median(per["collectives"]),
        "breakdown_ms": {
            "gather": median(float(x) for x in phase_max[0]) * 1e3,
            "decide_and_broadcast": median(float(x) for x in phase_max[1]) * 1e3,
            "transfer": median(float(x) for x in phase_max[2]) * 1e3,
            "lineage_submit": float(lineage[0]) * 1e3,
            "lineage_write_background": float(lineage[1]) * 1e3,
        },
        "decision_json_bytes": len(json.dumps(decision, sort_keys=True)),
        "events": sorted(events),
        "ours_spread_ms": {k: v * 1e3 for k, v in spread(per["ours"]).items() if k != "n"},
        "raw_allgather_spread_ms": {k: v * 1e3 for k, v in spread(per["raw_allgather"]).items() if k != "n"},
    }


def worker(cfg: dict[str, Any] | None = None) -> None:
    import torch
    import torch.distributed as dist

    from lightning_pbt.distributed.collectives import PopulationGroup

    cfg = worker_config(cfg)
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=300)
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    everyone = PopulationGroup.create(dist.PrefixStore("everyone/", store), rank, world, "gloo",
                                      torch.device("cpu"), timeout)
    rows = []
    for size in cfg["sizes"]:
        everyone.barrier()
        if rank < size:
            row = _measure_size(size, rank, store, cfg)
            rows.append(row)
        everyone.barrier()
    if rank == 0:
        Path(cfg["out"]).write_text(json.dumps({"rows": rows}))
    everyone.barrier()


if __name__ == "__main__":
    worker()
