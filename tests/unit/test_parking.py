"""Where a member's tensors wait while others of its process take their turn: the pure choice
(:func:`parking_place`) and the one code path that applies it (:func:`park_tensors`, called by the baton).

This machine has no GPU: the apply path is run on the CPU with the choice forced to a stand-in for
"page-locked host memory" (fresh CPU storage, not pinned), which copies every tensor as the GPU path
would; the real GPU path (CUDA to pinned host and back) has never run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_pbt.algorithm.topology import ParkingPlace, parking_place
from lightning_pbt.plugin.parking import park_tensors
from tests.unit.test_member_lanes import run_lanes

STAND_IN = ParkingPlace(device="cpu", pin_memory=False)  # fresh storage: what leaving a GPU looks like on a CPU


@pytest.mark.parametrize(
    ("device_type", "keep", "expected"),
    [
        ("cuda", False, ParkingPlace(device="cpu", pin_memory=True)),
        ("cuda", True, ParkingPlace()),
        ("cpu", False, ParkingPlace()),
        ("cpu", True, ParkingPlace()),
    ],
)
def test_parked_members_leave_a_gpu_for_pinned_host_memory_unless_kept_and_stay_put_on_a_cpu(
    device_type, keep, expected
):
    assert parking_place(device_type, keep_on_device=keep) == expected


def _member(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A member after a few Adam steps (weights, a BatchNorm's buffers, gradients and optimizer state),
    with a 4 MB weight so that a move is a real copy, not a small-tensor special case."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.Linear(1024, 2))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        module(torch.randn(8, 1024)).sum().backward()
        optimizer.step()
    return module, optimizer


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _tensors(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return [*module.parameters(), *module.buffers(), *grads, *_optimizer_tensors(optimizer)]


def _snapshot(module, optimizer) -> list[torch.Tensor]:
    return [t.detach().clone() for t in _tensors(module, optimizer)]


def _step(module, optimizer) -> list[torch.Tensor]:
    torch.manual_seed(7)
    optimizer.zero_grad()
    module(torch.randn(8, 1024)).sum().backward()
    optimizer.step()
    return _snapshot(module, optimizer)


def test_a_parked_member_keeps_no_tensor_of_its_own_storage_and_resumes_bit_for_bit():
    """Parked: every weight, buffer, gradient and optimizer tensor sits in storage of its own (nothing
    left in the storage it trained in: on a GPU, nothing left on the device), with the same values.
    Resumed: the same Parameter objects (the optimizer still steps them), each tensor on its device, and
    the next step is the one the member would have taken without parking."""
    module, optimizer = _member(0)
    reference = copy.deepcopy((module, optimizer))
    params = list(module.parameters())
    before = _snapshot(module, optimizer)
    trained_in = [t.detach() for t in _tensors(module, optimizer)]  # held: their storage cannot be reused
    storages = {t.untyped_storage().data_ptr() for t in trained_in}
    unpark = park_tensors(module, [optimizer], STAND_IN)
    parked = _tensors(module, optimizer)
    assert not storages & {t.untyped_storage().data_ptr() for t in parked}
    assert all(torch.equal(a, b) for a, b in zip(parked, before, strict=True))
    unpark()
    assert list(module.parameters()) == params and optimizer.param_groups[0]["params"] == params
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(module, optimizer), before, strict=True))
    assert all(a.device == b.device for a, b in zip(_tensors(module, optimizer), before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_step(module, optimizer), _step(*reference), strict=True))


def test_an_optimizer_state_loaded_while_parked_resumes_where_the_optimizer_keeps_it():
    """An exploit loads the donor's optimizer state into a parked member (new tensors, on the parked
    parameters' device); resuming puts each where that slot was before (Adam's step count included)."""
    module, optimizer = _member(0)
    donor_module, donor = _member(1)
    unpark = park_tensors(module, [optimizer], STAND_IN)
    optimizer.load_state_dict(donor.state_dict())
    module.load_state_dict(donor_module.state_dict())
    unpark()
    held = [*module.state_dict().values(), *_optimizer_tensors(optimizer)]  # gradients are not moved by exploits
    given = [*donor_module.state_dict().values(), *_optimizer_tensors(donor)]
    assert all(torch.equal(a, b) and a.device == b.device for a, b in zip(held, given, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_step(module, optimizer), _step(donor_module, donor), strict=True))


def test_on_the_cpu_parking_runs_the_same_path_and_moves_nothing():
    module, optimizer = _member(0)
    tensors = _tensors(module, optimizer)
    unpark = park_tensors(module, [optimizer], parking_place("cpu"))
    assert all(a is b for a, b in zip(_tensors(module, optimizer), tensors, strict=True))
    unpark()
    assert [t.untyped_storage().data_ptr() for t in _tensors(module, optimizer)] == [
        t.untyped_storage().data_ptr() for t in tensors
    ]


def test_a_member_waiting_at_a_ready_step_is_parked_while_the_others_train():
    """The baton parks a lane when it hands over at a ready step (the last to arrive too, when the next
    lane to train is another), and unparks it when its turn comes back; the lane that trains next is not
    parked."""
    log, _, outcome = run_lanes(3, {0: 2, 1: 2, 2: 2}, park=True)
    assert outcome == {0: "ok", 1: "ok", 2: "ok"}
    parked: set[int] = set()
    for entry in log:
        if entry[0] == "park":
            parked.add(entry[1])
        elif entry[0] == "unpark":
            parked.remove(entry[1])
        elif entry[0] == "train":
            assert parked == {0, 1, 2} - {entry[1]} or entry[2] == 0, (entry, parked)
    assert [e for e in log if e[0] in ("park", "unpark")][:6] == [
        ("park", 0), ("park", 1), ("park", 2), ("unpark", 0), ("park", 0), ("unpark", 1)
    ]  # fmt: skip
