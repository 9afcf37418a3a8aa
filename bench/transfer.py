"""1. Exploit transfer: a member's whole state (model + Adam state) from a winner to a loser.

The measured path is the callback's own: ``PopulationBasedTraining._training_state`` ->
``transfer.flatten_state`` -> ``PopulationBasedTraining._transfer_states`` (skeleton exchange,
``message_layout``, ``pack_messages``, ``allocate_messages``, ``PopulationGroup.exchange``,
``unpack_messages``, ``load_state_dict``) on a ``PopulationGroup`` built the way
``PopulationStrategy.setup_distributed`` builds it; only the Lightning ``Trainer`` is replaced by a
stand-in that holds the module and its optimizer. The reference is a raw ``torch.distributed``
send/recv of one flat buffer of the same number of bytes, between the same ranks, in the same
processes, interleaved with our transfers (order alternating every repetition).

Layouts: ``2x1`` (2 ranks, member_size 1) and ``2x2`` (4 ranks, member_size 2; rank j of the winner
sends to rank j of the loser, both pairs at once). Each timing starts after a barrier on the
population group and ends when this rank is done; a repetition's time is the slowest rank's.

Worker: ``torchrun --standalone --nproc_per_node=N -m bench.transfer '<json>'``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.common import SCRATCH, clean_floats, launch, median, spread, worker_config

NAME = "transfer"
SIZES_MB = (1, 10, 100)
LAYOUTS = ("2x1", "2x2")
SMOKE_SIZES_MB = (0.2, 1)
SMOKE_LAYOUTS = ("2x1",)
TARGET_RATIO = 1.15
TARGET_FROM_MB = 10
DEPTH = 4  # Linear(w, w) layers; w is chosen to hit the state size


def reps_for(size_mb: float, smoke: bool) -> tuple[int, int]:
    """(warm-up, measured) repetitions."""
    if smoke:
        return 1, 3
    return (3, 40) if size_mb <= 1 else (3, 30) if size_mb <= 10 else (2, 16)


# -- the launcher side ----------------------------------------------------------------------------
def run(smoke: bool = False, timeout: float = 600) -> dict[str, Any]:
    sizes = SMOKE_SIZES_MB if smoke else SIZES_MB
    layouts = SMOKE_LAYOUTS if smoke else LAYOUTS
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    for layout in layouts:
        members, member_size = (int(x) for x in layout.split("x"))
        out = SCRATCH / f"{NAME}_{layout}{'_smoke' if smoke else ''}.json"
        out.unlink(missing_ok=True)
        cfg = {"out": str(out), "member_size": member_size, "sizes_mb": list(sizes), "smoke": smoke}
        launch("bench.transfer", members * member_size, cfg, timeout, out.with_suffix(".log"))
        result = json.loads(out.read_text())
        for row in result["rows"]:
            rows.append({"layout": layout, **row})
        profiles[layout] = result["profiles"]
    checked = [r for r in rows if r["size_mb"] >= TARGET_FROM_MB]
    worst = max((r["ratio"] for r in checked), default=math.nan)
    return clean_floats({
        "description": "exploit transfer of model + Adam state, winner -> loser, gloo on CPU; ours = "
                       "state_dict + flatten_state + PopulationBasedTraining._transfer_states (incl. "
                       "load_state_dict); raw = torch.distributed send/recv of one flat buffer of the same "
                       "bytes, same ranks, same processes, interleaved",
        "config": {"sizes_mb": list(sizes), "layouts": list(layouts), "model": f"MLP of {DEPTH} Linear(w, w) "
                   "layers + Adam (state = 3x parameter bytes)", "timing": "median over repetitions of the "
                   "slowest rank, after a barrier and warm-up repetitions", "backend": "gloo"},
        "rows": rows,
        "profiles": profiles,
        "targets": {
            "ratio_at_10MB_and_above": {"target": f"<= {TARGET_RATIO}", "value": worst,
                                        "met": bool(checked) and worst <= TARGET_RATIO,
                                        "applies": bool(checked)},
        },
    })


# -- the worker side (one process per rank) -------------------------------------------------------
class _NoPrecision:
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _width_for(total_bytes: float) -> int:
    """w such that DEPTH layers of Linear(w, w) with Adam hold ``total_bytes`` (3 x 4 bytes per param)."""
    numel = total_bytes / 12 / DEPTH
    return max(2, int((-1 + math.sqrt(1 + 4 * numel)) / 2))


def build_member(total_bytes: float, seed: int) -> tuple[Any, Any]:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    width = _width_for(total_bytes)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(DEPTH)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # Adam state exists: exp_avg, exp_avg_sq, step
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def fake_trainer(model: Any, optimizer: Any) -> Any:
    """What ``_training_state`` / ``_transfer_states`` / ``_load_training_state`` read from a Trainer."""
    import torch

    return SimpleNamespace(lightning_module=model, optimizers=[optimizer], lr_scheduler_configs=[],
                           precision_plugin=_NoPrecision(), strategy=SimpleNamespace(root_device=torch.device("cpu")))


def perturb(model: Any, optimizer: Any) -> None:
    import torch

    with torch.no_grad():
        for t in model.parameters():
            t.add_(1.0)
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    v.add_(1.0)


def fingerprint(model: Any, optimizer: Any) -> float:
    import torch

    total = 0.0
    for t in model.state_dict().values():
        total += float(t.double().sum())
    for state in optimizer.state_dict()["state"].values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += float(v.double().sum())
    return total


def profiled_transfer(trainer: Any, plans: Any, topology: Any, population: Any, clock: dict[str, float]) -> None:
    """``_training_state`` + ``flatten_state`` + what ``transfer.move_states`` does for a donor and a loser
    with the same tensor specs (one round trip, receive in place), phase by phase with the same
    functions, each phase timed into ``clock`` (for the profile; the real method is what is timed)."""
    import torch

    from lightning_pbt import transfer
    from lightning_pbt.callback import _ROW, _SKELETON, _SPECS, PopulationBasedTraining

    faults = [resource.getrusage(resource.RUSAGE_SELF).ru_minflt]

    def tick(name: str, since: float) -> float:
        t = time.perf_counter()
        clock[name] = clock.get(name, 0.0) + t - since
        now_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        clock[f"faults:{name}"] = clock.get(f"faults:{name}", 0.0) + now_faults - faults[0]
        faults[0] = now_faults
        return t

    t = time.perf_counter()
    state = PopulationBasedTraining._training_state(trainer)
    t = tick("state_dict", t)
    flat = transfer.flatten_state(state)
    row = torch.zeros(_ROW, dtype=torch.float64)
    row[_SKELETON] = len(flat.skeleton)
    row[_SPECS] = transfer.spec_hash(flat.tensors)
    t = tick("flatten_state", t)
    table = population.all_gather(row)  # the ready step's all-gather (not part of the transfer)
    t = tick("ready_step_allgather_not_counted", t)
    j = topology.member_rank
    exploits = [(member, plan.parent) for member, plan in sorted(plans.items()) if plan.event == "exploit"]
    send_to = [topology.world_rank_of(loser, j) for loser, donor in exploits if donor == topology.member_id]
    receive_from = next(
        (topology.world_rank_of(donor, j) for loser, donor in exploits if loser == topology.member_id), None)
    device = population.device
    layout = transfer.message_layout([(x.dtype, x.numel()) for x in flat.tensors])
    t = tick("other", t)
    outgoing = transfer.pack_messages(flat.tensors, layout, device) if send_to else []
    t = tick("layout_and_pack", t)
    inbox: list[Any] = []
    skeleton_in = None
    if receive_from is not None:
        skeleton_in = torch.empty(int(table[receive_from, _SKELETON]), dtype=torch.uint8, device=device)
        inbox = transfer._receive_targets(flat.tensors, layout, device)
    t = tick("receive_targets", t)
    skeleton_out = flat.skeleton_tensor.to(device)
    population.exchange([(peer, [skeleton_out, *outgoing]) for peer in send_to],
                        [(receive_from, [skeleton_in, *inbox])] if receive_from is not None else [])
    t = tick("exchange", t)
    if receive_from is not None:
        assert skeleton_in is not None
        nest, _ = transfer.read_skeleton(bytes(skeleton_in.cpu().numpy()))
        t = tick("read_skeleton", t)
        tensors = transfer._settle_in_place(flat.tensors, inbox, layout)
        loaded = transfer.unflatten_state(nest, tensors)
        t = tick("settle_in_place", t)
        for optimizer, optimizer_state in zip(trainer.optimizers, loaded["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
        t = tick("load_optimizer", t)


def worker(cfg: dict[str, Any] | None = None) -> None:
    import torch
    import torch.distributed as dist

    from bench import transfer_proto
    from lightning_pbt import LogUniform, PopulationBasedTraining, transfer
    from lightning_pbt.callback import _ROW, _SKELETON
    from lightning_pbt.distributed import PopulationGroup
    from lightning_pbt.scheduler import MemberPlan
    from lightning_pbt.topology import PopulationTopology

    cfg = worker_config(cfg)
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    member_size = int(cfg["member_size"])
    timeout = timedelta(seconds=300)
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    # Raw reference: the default group (plain torch.distributed). Ours: a PopulationGroup, as the strategy makes it.
    dist.init_process_group("gloo", store=dist.PrefixStore("raw/", store), rank=rank, world_size=world,
                            timeout=timeout)
    population = PopulationGroup.create(dist.PrefixStore("bench/", store), rank, world, "gloo",
                                        torch.device("cpu"), timeout)
    topology = PopulationTopology(world_size=world, world_rank=rank, member_size=member_size)
    assert topology.num_members == 2
    winner = topology.member_id == 0
    peer = topology.world_rank_of(1 - topology.member_id, topology.member_rank)
    pbt = PopulationBasedTraining({"lr": LogUniform(1e-5, 1.0)}, monitor="score")
    pbt._strategy = SimpleNamespace(population=population)  # what _require_strategy() hands back
    plans = {0: MemberPlan(0, "keep", 0, {"lr": 1e-3}), 1: MemberPlan(1, "exploit", 0, {"lr": 1e-3})}

    rows, profiles = [], {}
    for size_mb in cfg["sizes_mb"]:
        warmup, reps = reps_for(size_mb, cfg["smoke"])
        model, optimizer = build_member(size_mb * 1e6, seed=topology.member_id)
        trainer = fake_trainer(model, optimizer)
        flat = transfer.flatten_state(PopulationBasedTraining._training_state(trainer))
        nbytes = sum(t.numel() * t.element_size() for t in flat.tensors)
        layout = transfer.message_layout([(t.dtype, t.numel()) for t in flat.tensors])
        direct = sum(1 for m in layout if len(m) == 1
                     and flat.tensors[m[0]].numel() * flat.tensors[m[0]].element_size() >= transfer.DIRECT_BYTES)
        raw = torch.ones(nbytes, dtype=torch.uint8) if winner else torch.empty(nbytes, dtype=torch.uint8)
        receiver = transfer_proto.InPlaceReceiver()

        # Each path returns its own time: state_dict + flatten, then (clock paused) the ready step's
        # all-gather that carries the skeleton size, then the transfer itself.
        def ours(trainer: Any = trainer) -> float:
            started = time.perf_counter()
            flat = transfer.flatten_state(PopulationBasedTraining._training_state(trainer))
            flattened = time.perf_counter()
            row = torch.zeros(_ROW, dtype=torch.float64)
            row[_SKELETON] = len(flat.skeleton)
            table = population.all_gather(row)
            gathered = time.perf_counter()
            pbt._transfer_states(trainer, plans, table, flat, topology)
            return flattened - started + time.perf_counter() - gathered

        def prototype(trainer: Any = trainer, receiver: Any = receiver) -> float:
            started = time.perf_counter()
            flat = transfer_proto.FastFlat(PopulationBasedTraining._training_state(trainer))
            flattened = time.perf_counter()
            table = population.all_gather(torch.tensor([flat.spec_hash, len(flat.skeleton)], dtype=torch.float64))
            gathered = time.perf_counter()
            transfer_proto.transfer_states(trainer, plans, [float(x) for x in table[:, 0]],
                                           [int(x) for x in table[:, 1]], flat, topology, population, receiver,
                                           PopulationBasedTraining._load_training_state)
            return flattened - started + time.perf_counter() - gathered

        def raw_dist(raw: Any = raw) -> float:
            started = time.perf_counter()
            if winner:
                dist.send(raw, peer)
            else:
                dist.recv(raw, peer)
            return time.perf_counter() - started

        def raw_population_group(raw: Any = raw) -> float:
            started = time.perf_counter()
            if winner:
                population.backend.send([raw], peer, 0).wait()
            else:
                population.backend.recv([raw], peer, 0).wait()
            return time.perf_counter() - started

        methods = {"ours": ours, "raw": raw_dist, "raw_same_group": raw_population_group, "prototype": prototype}
        names = list(methods)
        times = torch.zeros(len(names), warmup + reps, dtype=torch.float64)
        for rep in range(warmup + reps):
            for name in names if rep % 2 == 0 else reversed(names):
                population.barrier()
                times[names.index(name), rep] = methods[name]()
        slowest = population.all_gather(times).amax(dim=0)[:, warmup:]  # slowest rank per repetition
        copied = {}
        for name in ("ours", "prototype"):  # each path alone must make the loser's state the winner's
            if not winner:
                perturb(model, optimizer)
            population.barrier()
            methods[name]()
            prints = population.all_gather(torch.tensor([fingerprint(model, optimizer)], dtype=torch.float64))
            copied[name] = all(
                math.isclose(float(prints[topology.world_rank_of(1, j)]), float(prints[topology.world_rank_of(0, j)]),
                             rel_tol=1e-12, abs_tol=1e-9)
                for j in range(member_size)
            )

        # Profile: the same steps, phase by phase (separate repetitions, after the timed ones).
        clock: dict[str, float] = {}
        prof_reps = max(2, reps // 3)
        for _ in range(prof_reps):
            population.barrier()
            profiled_transfer(trainer, plans, topology, population, clock)
        phases = ["state_dict", "flatten_state", "other", "layout_and_pack", "receive_targets", "exchange",
                  "read_skeleton", "settle_in_place", "load_optimizer"]
        keys = phases + [f"faults:{p}" for p in phases]
        clock_tensor = torch.tensor([clock.get(k, 0.0) / prof_reps for k in keys], dtype=torch.float64)
        all_clocks = population.all_gather(clock_tensor)
        receiver_rank = topology.world_rank_of(1, 0)

        per = {name: [float(x) for x in slowest[i]] for i, name in enumerate(names)}
        paired = [o / r for o, r in zip(per["ours"], per["raw"], strict=True) if r > 0]
        entry = {
            "size_mb": size_mb,
            "state_bytes": nbytes,
            "tensors": len(flat.tensors),
            "messages": len(layout),
            "direct_messages": direct,
            "width": _width_for(size_mb * 1e6),
            "reps": reps,
            "ours_ms": median(per["ours"]) * 1e3,
            "raw_ms": median(per["raw"]) * 1e3,
            "raw_same_group_ms": median(per["raw_same_group"]) * 1e3,
            "ratio": median(per["ours"]) / median(per["raw"]),
            "ratio_paired_median": median(paired),
            "ratio_vs_same_group": median(per["ours"]) / median(per["raw_same_group"]),
            "raw_gbps": nbytes / median(per["raw"]) / 1e9,
            "ours_gbps": nbytes / median(per["ours"]) / 1e9,
            "ours_spread_ms": {k: v * 1e3 for k, v in spread(per["ours"]).items() if k != "n"},
            "raw_spread_ms": {k: v * 1e3 for k, v in spread(per["raw"]).items() if k != "n"},
            "prototype_ms": median(per["prototype"]) * 1e3,
            "prototype_ratio": median(per["prototype"]) / median(per["raw"]),
            "state_copied_exactly": copied["ours"],
            "prototype_state_copied_exactly": copied["prototype"],
        }
        rows.append(entry)
        profiles[str(size_mb)] = {
            "sender_ms": {p: float(all_clocks[0, i]) * 1e3 for i, p in enumerate(phases)},
            "receiver_ms": {p: float(all_clocks[receiver_rank, i]) * 1e3 for i, p in enumerate(phases)},
            "sender_page_faults": {p: float(all_clocks[0, len(phases) + i]) for i, p in enumerate(phases)},
            "receiver_page_faults": {p: float(all_clocks[receiver_rank, len(phases) + i])
                                     for i, p in enumerate(phases)},
            "reps": prof_reps,
        }
        del model, optimizer, trainer, raw, flat, receiver
    population.barrier()
    if rank == 0:
        Path(cfg["out"]).write_text(json.dumps({"rows": rows, "profiles": profiles}))
    dist.destroy_process_group()


if __name__ == "__main__":
    worker()
