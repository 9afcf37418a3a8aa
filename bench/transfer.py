"""1. Exploit transfer: a member's whole state (model + Adam state) from a winner to a loser.

"Ours" is the synchronous ready step's own transfer, ``SynchronousReadySteps._move_states``, on a
``PopulationGroup`` built the way ``PopulationStrategy.setup_distributed`` builds it, with the
callback's own ``TrainerMember`` adapter: the donor takes its training state (``state_dict`` of the
model and optimizer), ``flatten_state`` + ``pack_state`` + ``send_state``; the loser flattens its own
state (the in-place targets), ``receive_state`` (a 3-int64 header, then skeleton + messages, received
into its own tensors when the spec hashes match) and ``load_training_state``. Only the Lightning
``Trainer`` is replaced by a stand-in that holds the module and its optimizer.

The reference is a raw ``torch.distributed`` send/recv of one flat buffer of the same number of
bytes, between the same ranks, in the same processes, interleaved with our transfers (order
alternating every repetition); ``raw_same_group`` is the same send/recv on the population group's
own backend.

Layouts: ``2x1`` (2 ranks, member_size 1) and ``2x2`` (4 ranks, member_size 2; rank j of the winner
sends to rank j of the loser, both pairs at once). Each timing starts after a barrier on the
population group and ends when this rank is done; a repetition's time is the slowest rank's.

The profile repeats the same steps phase by phase with the same functions (``receive_state``'s
in-place branch spelled out, since it is one function), in separate repetitions after the timed ones.

Worker: ``torchrun --standalone --nproc_per_node=N -m bench.transfer '<json>'``.
"""

from __future__ import annotations

import json
import math
import os
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
PHASES = ("state_dict", "flatten", "pack", "header", "layout", "payload", "read_skeleton", "settle", "load")


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
                       "SynchronousReadySteps._move_states (training_state + flatten_state + pack_state + "
                       "send_state / receive_state in place + load_training_state); raw = torch.distributed "
                       "send/recv of one flat buffer of the same bytes, same ranks, same processes, interleaved",
        "config": {"sizes_mb": list(sizes), "layouts": list(layouts), "model": f"MLP of {DEPTH} Linear(w, w) "
                   "layers + Adam (state = 3x parameter bytes)", "timing": "median over repetitions of the "
                   "slowest rank, after a barrier and warm-up repetitions", "backend": "gloo",
                   "phases": list(PHASES)},
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


def trainer_member(model: Any, optimizer: Any) -> Any:
    """The callback's ``TrainerMember`` over a stand-in holding what it reads from a Trainer."""
    import torch

    from lightning_pbt.plugin.trainer_member import TrainerMember

    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    trainer = SimpleNamespace(lightning_module=model, optimizers=[optimizer], lr_scheduler_configs=[], callbacks=[],
                              precision_plugin=_NoPrecision(), strategy=strategy)
    return TrainerMember(trainer, model, lambda: None, None)  # apply/rejuvenate unused


def perturb(model: Any, optimizer: Any) -> None:
    import torch

    with torch.no_grad():
        for t in model.parameters():
            t.add_(1.0)
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    v.add_(1.0)


def fingerprint(model: Any, optimizer: Any) -> int:
    """A 63-bit digest of every byte of the model's and the optimizer's tensors: equal only for an exact copy."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    tensors = list(model.state_dict().values()) + [
        v for state in optimizer.state_dict()["state"].values() for v in state.values() if isinstance(v, torch.Tensor)
    ]
    for t in tensors:
        digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def profiled_move(member: Any, population: Any, send_to: list[int], receive_from: int | None,
                  clock: dict[str, float]) -> bool:
    """What ``_move_states`` does for a donor or a loser, phase by phase with the same functions; returns
    whether the loser received in place (``receive_state``'s in-place branch is spelled out here)."""
    import torch

    from lightning_pbt.distributed import transfer

    def tick(name: str, since: float) -> float:
        t = time.perf_counter()
        clock[name] = clock.get(name, 0.0) + t - since
        return t

    device = population.device
    t = time.perf_counter()
    state = member.training_state()
    t = tick("state_dict", t)
    flat = transfer.flatten_state(state)
    t = tick("flatten", t)
    if send_to:
        packed = transfer.pack_state(flat, device)
        t = tick("pack", t)
        header = transfer.header_tensor(device)
        header[0], header[1], header[2] = len(packed.skeleton), packed.spec_hash, 0
        population.exchange([(peer, [header]) for peer in send_to], [])
        t = tick("header", t)
        skeleton = transfer.bytes_tensor(packed.skeleton).to(device)
        population.exchange([(peer, [skeleton, *packed.messages]) for peer in send_to], [])
        tick("payload", t)
        return False
    assert receive_from is not None
    header = transfer.header_tensor(device)
    population.exchange([], [(receive_from, [header])])
    skeleton_bytes, remote_hash, _ = (int(v) for v in header.tolist())
    t = tick("header", t)
    own = flat.tensors
    in_place = remote_hash == transfer.spec_hash(own)
    if not in_place:
        raise RuntimeError("bench/transfer.py: the donor's spec hash differs from the loser's; expected equal models")
    layout = transfer.message_layout([(x.dtype, x.numel()) for x in own])
    skeleton = torch.empty(skeleton_bytes, dtype=torch.uint8, device=device)
    inbox = transfer._receive_targets(own, layout, device)
    t = tick("layout", t)
    population.exchange([], [(receive_from, [skeleton, *inbox])])
    t = tick("payload", t)
    nest, _ = transfer.read_skeleton(bytes(skeleton.numpy()))
    t = tick("read_skeleton", t)
    tensors = transfer._settle_in_place(own, inbox, layout)
    t = tick("settle", t)
    member.load_training_state(transfer.unflatten_state(nest, tensors), model_in_place=True)
    tick("load", t)
    return in_place


def worker(cfg: dict[str, Any] | None = None) -> None:
    import torch
    import torch.distributed as dist

    from lightning_pbt import LogUniform
    from lightning_pbt.algorithm.scheduler import MemberPlan, PBTScheduler
    from lightning_pbt.algorithm.topology import PopulationTopology
    from lightning_pbt.distributed import transfer
    from lightning_pbt.distributed.collectives import PopulationGroup
    from lightning_pbt.distributed.ready_steps.base import PopulationBook
    from lightning_pbt.distributed.ready_steps.lockstep import SynchronousReadySteps

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
    space = {"lr": LogUniform(1e-5, 1.0)}
    plans = {0: MemberPlan(0, "keep", 0, {"lr": 1e-3}), 1: MemberPlan(1, "exploit", 0, {"lr": 1e-3})}

    rows, profiles = [], {}
    for size_mb in cfg["sizes_mb"]:
        warmup, reps = reps_for(size_mb, cfg["smoke"])
        model, optimizer = build_member(size_mb * 1e6, seed=topology.member_id)
        member = trainer_member(model, optimizer)
        protocol = SynchronousReadySteps(population=population, topology=topology, namespace=f"bench/{size_mb}",
                                         scheduler=PBTScheduler(space), book=PopulationBook(), member=member,
                                         mode="max", monitor="score", seed=0)
        flat = transfer.flatten_state(member.training_state())
        nbytes = sum(t.numel() * t.element_size() for t in flat.tensors)
        layout = transfer.message_layout([(t.dtype, t.numel()) for t in flat.tensors])
        direct = sum(1 for m in layout if len(m) == 1
                     and flat.tensors[m[0]].numel() * flat.tensors[m[0]].element_size() >= transfer.DIRECT_BYTES)
        raw = torch.ones(nbytes, dtype=torch.uint8) if winner else torch.empty(nbytes, dtype=torch.uint8)

        def ours(protocol: Any = protocol) -> float:
            started = time.perf_counter()
            protocol._move_states(plans, {protocol.me: protocol.member})  # one member per process
            return time.perf_counter() - started

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

        methods = {"ours": ours, "raw": raw_dist, "raw_same_group": raw_population_group}
        names = list(methods)
        times = torch.zeros(len(names), warmup + reps, dtype=torch.float64)
        for rep in range(warmup + reps):
            for name in names if rep % 2 == 0 else reversed(names):
                population.barrier()
                times[names.index(name), rep] = methods[name]()
        slowest = population.all_gather(times).amax(dim=0)[:, warmup:]  # slowest rank per repetition

        # The loser's state must become the winner's, exactly.
        if not winner:
            perturb(model, optimizer)
        population.barrier()
        ours()
        prints = population.all_gather(torch.tensor([fingerprint(model, optimizer)], dtype=torch.int64))
        copied = all(
            int(prints[topology.world_rank_of(1, j)]) == int(prints[topology.world_rank_of(0, j)])
            for j in range(member_size)
        )

        # Profile: the same steps, phase by phase (separate repetitions, after the timed ones).
        clock: dict[str, float] = {}
        prof_reps = max(2, reps // 3)
        send_to = [topology.world_rank_of(1, topology.member_rank)] if winner else []
        receive_from = None if winner else topology.world_rank_of(0, topology.member_rank)
        in_place = False
        for _ in range(prof_reps):
            population.barrier()
            in_place = profiled_move(member, population, send_to, receive_from, clock)
        clock_tensor = torch.tensor([clock.get(p, 0.0) / prof_reps for p in PHASES] + [float(in_place)],
                                    dtype=torch.float64)
        all_clocks = population.all_gather(clock_tensor)
        receiver_rank = topology.world_rank_of(1, 0)

        per = {name: [float(x) for x in slowest[i]] for i, name in enumerate(names)}
        paired = [o / r for o, r in zip(per["ours"], per["raw"], strict=True) if r > 0]
        rows.append({
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
            "state_copied_exactly": copied,
            "received_in_place": bool(all_clocks[receiver_rank, len(PHASES)]),
        })
        profiles[str(size_mb)] = {
            "sender_ms": {p: float(all_clocks[0, i]) * 1e3 for i, p in enumerate(PHASES)},
            "receiver_ms": {p: float(all_clocks[receiver_rank, i]) * 1e3 for i, p in enumerate(PHASES)},
            "reps": prof_reps,
        }
        del model, optimizer, member, protocol, raw, flat
    population.barrier()
    if rank == 0:
        Path(cfg["out"]).write_text(json.dumps({"rows": rows, "profiles": profiles}))
    dist.destroy_process_group()


if __name__ == "__main__":
    worker()
