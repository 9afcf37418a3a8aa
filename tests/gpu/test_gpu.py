"""On CUDA: members sharing one GPU, NCCL transfers, mixed precision, RNG and fused optimizers.

Each multi-process test is one population run of tests/distributed/scripts/population_run.py on the
GPU; the assertions are the CPU tier's (bit-exact state after an exploit, one lineage line per member
and ready step), plus what only a GPU has: the GradScaler's state under 16-mixed, the CUDA RNG, and
optimizers that keep ``lr`` as a CUDA tensor, an asynchronous population on one GPU, and the member-scoped
gathers, run before Lightning's teardown moves the module to the CPU.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_pbt.plugin.apply import apply_hyperparameters, reset_weights
from tests.conftest import load_lineage, load_ranks, run_population

STEPS, EVERY = 16, 4
MOVED = ("model", "optimizer", "schedulers", "precision")


def check_exploits_are_bit_exact(out: Path, differing: tuple[str, ...] = ()) -> int:
    """Every exploit left the loser with the donor's state at the donor's snapshot step (``donor_step`` in
    asynchronous lines, the ready step otherwise), every keep left the member as it was; for each part in
    ``differing``, loser and donor held different states before at least one exploit (so that a part
    that did not move would show)."""
    ranks = load_ranks(out)
    lines = [r for r in load_lineage(out) if r["event"] != "init"]
    exploits, differed = 0, set()
    for rank in ranks:
        before = {r["step"]: r for r in rank["before"]}
        after = {r["step"]: r for r in rank["after"]}
        for rec in (r for r in lines if r["member"] == rank["member"]):
            mine = [after[rec["step"]][k] for k in MOVED]
            if rec["event"] == "exploit":
                exploits += 1
                donor = next(
                    r for r in ranks if r["member"] == rec["parent"] and r["global_rank"] == rank["global_rank"]
                )
                donor_state = {r["step"]: r for r in donor["before"]}[rec.get("donor_step") or rec["step"]]
                assert mine == [donor_state[k] for k in MOVED]
                differed |= {k for k in MOVED if before[rec["step"]][k] != donor_state[k]}
            else:
                assert mine == [before[rec["step"]][k] for k in MOVED]
    steps = defaultdict(list)
    for rec in lines:
        steps[rec["member"]].append(rec["step"])
    assert all(sorted(s) == list(range(EVERY, STEPS + 1, EVERY)) for s in steps.values())
    assert set(differing) <= differed, f"loser and donor never differed in {set(differing) - differed}"
    return exploits


def gathered_inside_the_member(out: Path, member_size: int) -> None:
    """all_gather and torchmetrics ran on the member's (GPU) group before teardown and spanned the member."""
    ranks = load_ranks(out)
    for rank in ranks:
        assert rank["gathered"] == member_size
        expected = sum(r["world_rank"] for r in ranks if r["member"] == rank["member"]) / member_size
        assert rank["torchmetric_mean"] == pytest.approx(expected)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("members", "precision"), [(2, "bf16-mixed"), (4, "16-mixed")], ids=["2-members-bf16", "4-members-fp16"]
)
def test_members_share_one_gpu(tmp_path, members, precision):
    """``Trainer(devices=1)`` with ``processes_per_device=members``: every member on GPU 0, the population
    group on gloo through pinned host memory, exploits bit-exact. 16-mixed: each member has a GradScaler
    of its own (initial scale 2**(10 + member)), so the loser's scaler state differs from the donor's
    before an exploit and equals it after."""
    proc = run_population(
        tmp_path,
        timeout=280,
        accelerator="gpu",
        devices=members,
        processes_per_device=members,
        member_size=1,
        max_steps=STEPS,
        every=EVERY,
        lr_scheduler="step",
        quantile=0.25 if members == 4 else 0.5,
        **({"scaler_per_member": True} if precision == "16-mixed" else {"precision": precision}),
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = load_ranks(tmp_path)
    assert len(ranks) == members
    assert {r["device"] for r in ranks} == {"cuda:0"}
    assert {r["population_backend"] for r in ranks} == {"gloo"}
    gathered_inside_the_member(tmp_path, 1)
    differing = ("model", "precision") if precision == "16-mixed" else ("model",)
    assert check_exploits_are_bit_exact(tmp_path, differing) > 0
    if precision == "16-mixed":
        assert all("scale" in r["final"]["precision"] for r in ranks)


@pytest.mark.timeout(300)
def test_asynchronous_members_share_one_gpu(tmp_path):
    """``synchronous=False`` with 2 members on GPU 0: member 1 always scores better and member 0, the
    slower, copies member 1's latest snapshot, from a step ahead of its own; bit-exact at ``donor_step``."""
    proc = run_population(
        tmp_path,
        timeout=280,
        accelerator="gpu",
        precision="bf16-mixed",
        synchronous=False,
        devices=2,
        processes_per_device=2,
        member_size=1,
        max_steps=STEPS,
        every=EVERY,
        lr_scheduler="cosine",
        monitor="member_const",
        slow_members=[0],
        slow_delay=0.05,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = load_ranks(tmp_path)
    assert {r["device"] for r in ranks} == {"cuda:0"}
    gathered_inside_the_member(tmp_path, 1)
    assert check_exploits_are_bit_exact(tmp_path, ("model", "optimizer")) > 0
    lines = [r for r in load_lineage(tmp_path) if r["event"] == "exploit"]
    assert lines and all(r["donor_step"] is not None for r in lines)


@pytest.mark.gpus(2)
@pytest.mark.timeout(300)
def test_nccl_population_transfers_2x1(tmp_path):
    proc = run_population(
        tmp_path, timeout=280, accelerator="gpu", devices=2, member_size=1, max_steps=STEPS, every=EVERY
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = load_ranks(tmp_path)
    assert {r["population_backend"] for r in ranks} == {"nccl"}
    assert sorted(r["device"] for r in ranks) == ["cuda:0", "cuda:1"]
    gathered_inside_the_member(tmp_path, 1)
    assert check_exploits_are_bit_exact(tmp_path) > 0


@pytest.mark.gpus(4)
@pytest.mark.timeout(300)
def test_nccl_population_transfers_2x2(tmp_path):
    proc = run_population(
        tmp_path, timeout=280, accelerator="gpu", devices=4, member_size=2, max_steps=STEPS, every=EVERY
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert {r["population_backend"] for r in load_ranks(tmp_path)} == {"nccl"}
    gathered_inside_the_member(tmp_path, 2)  # NCCL member groups: the gathers must run on the GPU
    assert check_exploits_are_bit_exact(tmp_path) > 0


def test_rejuvenation_leaves_the_callers_cuda_rng_as_it_was():
    torch.cuda.manual_seed_all(123)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2)).cuda()
    optimizer = torch.optim.Adam(model.parameters())
    states = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())]
    cpu = torch.get_rng_state()
    reset_weights(model, [optimizer], seed=7)
    assert all(torch.equal(a, torch.cuda.get_rng_state(d)) for d, a in enumerate(states))
    assert torch.equal(cpu, torch.get_rng_state())
    fresh = [p.detach().clone() for p in model.parameters()]
    reset_weights(model, [optimizer], seed=7)
    assert all(torch.equal(a, b) for a, b in zip(fresh, model.parameters(), strict=True))


@pytest.mark.parametrize("flavour", ["fused", "capturable"])
def test_hyperparameters_reach_optimizers_that_keep_lr_as_a_cuda_tensor(flavour):
    """Both flavours are given ``lr`` as a CUDA tensor (fused Adam takes one too): a new value must land in
    that tensor's place, still a CUDA tensor, and the optimizer must still step with it."""
    model = nn.Linear(8, 2).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01, device="cuda"), **{flavour: True})
    apply_hyperparameters({"lr": 0.05}, [optimizer], [], model)
    value = optimizer.param_groups[0]["lr"]
    assert isinstance(value, torch.Tensor) and value.is_cuda
    assert float(value) == pytest.approx(0.05)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 8, device="cuda")).sum().backward()
    optimizer.step()  # the optimizer still runs with the value it was given
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
