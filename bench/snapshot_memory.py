"""Resident memory of an asynchronous member over its ready steps (CPU): do snapshots stay flat?

At each asynchronous ready step a member snapshots its training state (model + Adam state) into host
memory for its ``SnapshotServer``. Two ways, each in a fresh interpreter, same model and steps:

- ``fresh``: a new full copy per ready step, ``server.publish(Snapshot(v, pack_state(flat, cpu, copy=True)))``
  (what the asynchronous mode did up to 374b972);
- ``reused``: ``server.take_snapshot(v, flat, cpu)``, which overwrites a buffer set no request is reading.

Each ready step follows a few training steps (forward, backward, AdamW step) of an MLP of a few MB, as in
training; the server thread runs, and a second rank (a thread of the same process, over gloo) fetches
every snapshot as a loser would, so a snapshot can be replaced while the server still holds it. RSS
(``VmRSS``, the whole process) is read after ``WARMUP`` ready steps and after each of the next ``STEPS``;
the row is the growth over those steps. Not a timed test: ``python -m bench.snapshot_memory``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

WARMUP, STEPS, TRAIN_STEPS = 10, 100, 3
WIDTH = 640  # 3 hidden layers of 640: ~1.2 M parameters, 4.9 MB of weights, 15 MB of training state


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def member_run(mode: str) -> dict[str, Any]:
    import queue
    import threading
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch import nn

    from lightning_pbt.distributed import transfer
    from lightning_pbt.distributed.collectives import PopulationGroup
    from lightning_pbt.distributed.serving import Snapshot, SnapshotServer, request_snapshot

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.Linear(WIDTH, 10),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cpu, store, timeout = torch.device("cpu"), dist.HashStore(), timedelta(seconds=60)
    groups: list[PopulationGroup | None] = [None, None]

    def connect(rank: int) -> None:
        groups[rank] = PopulationGroup.create(store, rank, 2, "gloo", cpu, timeout, lambda: store).host_group()

    threads = [threading.Thread(target=connect, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    host, loser_host = groups
    assert host is not None and loser_host is not None
    server = SnapshotServer(host, host.new_store_client(), "bench", 0, lambda reason: None)
    server.start()
    versions: queue.Queue[int | None] = queue.Queue()
    fetched: queue.Queue[bool] = queue.Queue()

    def loser() -> None:  # rank 1: copies every snapshot, as a loser of this member would
        while (version := versions.get()) is not None:
            request_snapshot(loser_host.store, "bench", 0, 1, version)
            fetched.put(transfer.receive_state(loser_host, 0, None, cpu) is not None)

    fetching = threading.Thread(target=loser, daemon=True)
    fetching.start()

    def ready_step(version: int) -> None:
        for _ in range(TRAIN_STEPS):
            optimizer.zero_grad()
            model(torch.randn(32, WIDTH)).pow(2).mean().backward()
            optimizer.step()
        flat = transfer.flatten_state({"model": model.state_dict(), "optimizers": [optimizer.state_dict()]})
        if mode == "fresh":
            server.publish(Snapshot(version, transfer.pack_state(flat, cpu, copy=True)))
        else:
            server.take_snapshot(version, flat, cpu)
        versions.put(version)
        if not fetched.get(timeout=60):
            raise RuntimeError("the loser's fetch was refused")

    for version in range(WARMUP):
        ready_step(version)
    after_warmup = rss_mb()
    trace = []
    for version in range(WARMUP, WARMUP + STEPS):
        ready_step(version)
        trace.append(rss_mb())
    state_mb = server.snapshot.packed.nbytes / 2**20
    versions.put(None)
    server.stop(host.store)
    return {
        "mode": mode,
        "state_mb": round(state_mb, 1),
        "rss_after_warmup_mb": round(after_warmup, 1),
        "rss_end_mb": round(trace[-1], 1),
        "growth_mb": round(trace[-1] - after_warmup, 1),
        "peak_growth_mb": round(max(trace) - after_warmup, 1),
        "second_half_growth_mb": round(trace[-1] - trace[len(trace) // 2 - 1], 1),
    }


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(member_run(sys.argv[1])))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for mode in ("fresh", "reused"):
        output = subprocess.run(
            [sys.executable, "-m", "bench.snapshot_memory", mode], env=env, check=True, capture_output=True, text=True
        )
        rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
    print(f"{WARMUP} warm-up + {STEPS} asynchronous ready steps, {TRAIN_STEPS} AdamW steps between, CPU")
    print(f"{'snapshots':<10}{'state MB':>10}{'RSS MB':>10}{'growth MB':>11}{'peak growth MB':>16}{'last 50 MB':>12}")
    for row in rows:
        print(
            f"{row['mode']:<10}{row['state_mb']:>10}{row['rss_after_warmup_mb']:>10}"
            f"{row['growth_mb']:>11}{row['peak_growth_mb']:>16}{row['second_half_growth_mb']:>12}"
        )


if __name__ == "__main__":
    main()
