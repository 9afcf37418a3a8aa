"""On CUDA: members sharing one GPU, NCCL transfers, mixed precision, RNG and fused optimizers.

Each multi-process test is one population run of tests/distributed/scripts/population_run.py on the
GPU; the assertions are the CPU tier's (bit-exact state after an exploit, one lineage line per member
and ready step), plus what only a GPU has: the GradScaler's state under 16-mixed, the CUDA RNG, and
optimizers that keep ``lr`` as a CUDA tensor.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_pbt.apply import apply_hyperparameters, reset_weights
from tests.conftest import load_lineage, load_ranks, run_population

STEPS, EVERY = 16, 4
MOVED = ("model", "optimizer", "schedulers", "precision")


def check_exploits_are_bit_exact(out: Path) -> int:
    ranks = load_ranks(out)
    lines = [r for r in load_lineage(out) if r["event"] != "init"]
    exploits = 0
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
                step = rec.get("donor_step", rec["step"])
                assert mine == [{r["step"]: r for r in donor["before"]}[step][k] for k in MOVED]
            else:
                assert mine == [before[rec["step"]][k] for k in MOVED]
    steps = defaultdict(list)
    for rec in lines:
        steps[rec["member"]].append(rec["step"])
    assert all(sorted(s) == list(range(EVERY, STEPS + 1, EVERY)) for s in steps.values())
    return exploits


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("members", "precision"), [(2, "bf16-mixed"), (4, "16-mixed")], ids=["2-members-bf16", "4-members-fp16"]
)
def test_members_share_one_gpu(tmp_path, members, precision):
    """``Trainer(devices=1)`` with ``processes_per_device=members``: every member on GPU 0, the population
    group on gloo through pinned host memory, exploits bit-exact (16-mixed: the GradScaler moves too)."""
    proc = run_population(
        tmp_path,
        timeout=280,
        accelerator="gpu",
        precision=precision,
        devices=members,
        processes_per_device=members,
        member_size=1,
        max_steps=STEPS,
        every=EVERY,
        lr_scheduler="step",
        quantile=0.25 if members == 4 else 0.5,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = load_ranks(tmp_path)
    assert len(ranks) == members
    assert {r["device"] for r in ranks} == {"cuda:0"}
    assert {r["population_backend"] for r in ranks} == {"gloo"}
    assert check_exploits_are_bit_exact(tmp_path) > 0
    if precision == "16-mixed":
        assert all("scale" in r["final"]["precision"] for r in ranks)


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
    assert check_exploits_are_bit_exact(tmp_path) > 0


@pytest.mark.gpus(4)
@pytest.mark.timeout(300)
def test_nccl_population_transfers_2x2(tmp_path):
    proc = run_population(
        tmp_path, timeout=280, accelerator="gpu", devices=4, member_size=2, max_steps=STEPS, every=EVERY
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert {r["population_backend"] for r in load_ranks(tmp_path)} == {"nccl"}
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
    model = nn.Linear(8, 2).cuda()
    lr = torch.tensor(0.01, device="cuda") if flavour == "capturable" else 0.01
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, **{flavour: True})
    apply_hyperparameters({"lr": 0.05}, [optimizer], [], model)
    value = optimizer.param_groups[0]["lr"]
    assert float(value) == pytest.approx(0.05)
    if flavour == "capturable":
        assert isinstance(value, torch.Tensor) and value.is_cuda
    model(torch.randn(4, 8, device="cuda")).sum().backward()
    optimizer.step()  # the optimizer still runs with the value it was given
