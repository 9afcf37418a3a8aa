"""The population transport: the same calls on gloo (CI) and NCCL (GPUs), checked against both.

The transfer code (``transfer.send_state`` / ``receive_state`` through ``PopulationGroup``) runs here
in threads, one per rank, over

- a real gloo backend (an in-process store), and
- ``NcclStandIn``, a backend that reproduces what NCCL does differently from gloo: tags are ignored
  and messages between two ranks match in issue order, each rank processing its operations with one
  peer in issue order (so mismatched orders deadlock, as on a GPU), a receive must be as large as the
  send, and the coalescing block (whose per-op works NCCL returns as ``None``) is not to be used.

A transport that passes both moves state the same way on a GPU node as in CI; the GPU tier
(``tests/gpu``) runs it on real NCCL where a machine has two GPUs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_pbt import transfer
from lightning_pbt.distributed import PopulationGroup


# -- a stand-in with NCCL's point-to-point semantics -------------------------------------------------
@dataclass
class _Op:
    kind: str  # "send" or "recv"
    tensor: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class _Hub:
    """Every rank's operations, per peer, in issue order; an operation completes when it and its
    counterpart are both at the head of their ranks' queues for each other."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: dict[tuple[int, int], deque[_Op]] = {}

    def issue(self, rank: int, peer: int, op: _Op) -> _Op:
        with self.lock:
            self.queues.setdefault((rank, peer), deque()).append(op)
            self._progress()
        return op

    def _progress(self) -> None:
        moved = True
        while moved:
            moved = False
            for (a, b), queue in self.queues.items():
                other = self.queues.get((b, a))
                if not queue or not other:
                    continue
                head, counterpart = queue[0], other[0]
                if head.kind == "send" and counterpart.kind == "recv":
                    source, target = head.tensor, counterpart.tensor
                    if source.numel() * source.element_size() != target.numel() * target.element_size():
                        head.error = counterpart.error = (
                            f"size mismatch: {a} sent {source.numel()} x {source.dtype}, "
                            f"{b} receives {target.numel()} x {target.dtype} (NCCL would corrupt or hang)"
                        )
                    else:
                        target.view(-1).view(torch.uint8).copy_(source.contiguous().view(-1).view(torch.uint8))
                    queue.popleft()
                    other.popleft()
                    head.done.set()
                    counterpart.done.set()
                    moved = True


class _Work:
    def __init__(self, op: _Op) -> None:
        self.op = op

    def wait(self) -> bool:
        if not self.op.done.wait(timeout=5):
            raise TimeoutError(f"{self.op.kind} never matched: a deadlock under NCCL's in-order matching")
        if self.op.error:
            raise RuntimeError(self.op.error)
        return True


class NcclStandIn:
    def __init__(self, hub: _Hub, rank: int) -> None:
        self.hub, self.rank = hub, rank

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> _Work:
        return _Work(self.hub.issue(self.rank, dst, _Op("send", tensors[0])))

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> _Work:
        return _Work(self.hub.issue(self.rank, src, _Op("recv", tensors[0])))

    def _start_coalescing(self, *args: object) -> None:
        raise AssertionError("the transport must not use the coalescing block: its per-op works are None on NCCL")

    _end_coalescing = _start_coalescing


# -- groups of threads -------------------------------------------------------------------------------
def run_ranks(size: int, backend: str, body: Callable[[PopulationGroup], object]) -> list[object]:
    """``body(group)`` on ``size`` threads, one per rank, over ``backend``; re-raises the first failure."""
    store, hub = dist.HashStore(), _Hub()
    results: list[object] = [None] * size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            if backend == "gloo":
                raw = dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=30))
            else:
                raw = NcclStandIn(hub, rank)
            group = PopulationGroup(raw, rank, size, torch.device("cpu"), store, backend)
            results[rank] = body(group)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def member(seed: int, width: int = 40) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(300, width), nn.BatchNorm1d(width), nn.Linear(width, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 300)).pow(2).sum().backward()
    optimizer.step()
    return model, optimizer


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def digest(state: dict) -> list[bytes]:
    flat = transfer.flatten_state(state)
    return [flat.skeleton, *(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in flat.tensors)]


# -- the contract -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["gloo", "nccl-semantics"])
@pytest.mark.parametrize("loser_width", [40, 24], ids=["same-specs", "other-specs"])
def test_one_donor_moves_its_state_bit_exactly_to_two_losers(backend, loser_width):
    """Rank 0 sends to ranks 1 and 2 at once; each loser ends with the donor's exact state, received
    into its own parameters when the specs match."""
    donor_state = state_of(*member(0))

    def body(group: PopulationGroup) -> object:
        if group.rank == 0:
            flat = transfer.flatten_state(donor_state)
            transfer.send_state(group, transfer.pack_state(flat, group.device), [1, 2])
            return None
        model, optimizer = member(group.rank, loser_width)
        weight = model[0].weight
        own = transfer.flatten_state(state_of(model, optimizer)).tensors
        if loser_width == 40:  # every tensor but the step counters differs: weights, BN buffers, Adam moments
            theirs = transfer.flatten_state(donor_state).tensors
            assert all(not torch.equal(a, b) for a, b in zip(own, theirs, strict=True) if a.numel() > 1)
        received = transfer.receive_state(group, 0, own, torch.device("cpu"))
        assert received is not None
        state = transfer.unflatten_state(received.nest, received.tensors)
        return (
            received.in_place,
            state,
            model[0].weight is weight,
            torch.equal(weight, donor_state["model"]["0.weight"]),
        )

    results = run_ranks(3, backend.split("-")[0], body)
    for in_place, state, same_parameter, weight_arrived in results[1:]:
        assert digest(state) == digest(donor_state)
        assert in_place is (loser_width == 40)
        assert same_parameter and weight_arrived is (loser_width == 40)  # in place: the module's own tensor


@pytest.mark.parametrize("backend", ["gloo", "nccl-semantics"])
def test_a_refusal_carries_no_payload_and_the_next_transfer_still_lines_up(backend):
    """The asynchronous server refuses a replaced snapshot with a header alone; the pair stays in step."""
    donor_state = state_of(*member(0))

    def body(group: PopulationGroup) -> object:
        packed = transfer.pack_state(transfer.flatten_state(donor_state), group.device, copy=True)
        if group.rank == 0:
            transfer.send_state(group, packed, [1], status=-1)
            transfer.send_state(group, packed, [1])
            return None
        first = transfer.receive_state(group, 0, None, torch.device("cpu"))
        second = transfer.receive_state(group, 0, None, torch.device("cpu"))
        assert second is not None
        return first, transfer.unflatten_state(second.nest, second.tensors)

    first, state = run_ranks(2, backend.split("-")[0], body)[1]
    assert first is None
    assert digest(state) == digest(donor_state)


def test_the_stand_in_catches_what_nccl_would_not_forgive():
    """Guards the guard: receives posted in another order than the sends deadlock or mismatch."""

    def body(group: PopulationGroup) -> object:
        small, large = torch.zeros(4), torch.zeros(16)
        if group.rank == 0:
            group.exchange([(1, [torch.ones(4), torch.ones(16)])], [])
        else:
            group.exchange([], [(1 - group.rank, [large, small])])
        return None

    with pytest.raises((RuntimeError, TimeoutError), match=r"size mismatch|deadlock"):
        run_ranks(2, "nccl", body)
    with pytest.raises(AssertionError, match="coalescing"):
        NcclStandIn(_Hub(), 0)._start_coalescing()


def test_nccl_group_options_carry_a_timeout():
    """``PopulationGroup.create`` sets ``ProcessGroupNCCL.Options._timeout`` (private): the field lives on
    the base ``Backend.Options`` that NCCL's options extend (torch/csrc/distributed/c10d/init.cpp)."""
    options = torch._C._distributed_c10d.Backend.Options("nccl")
    options._timeout = timedelta(seconds=7)
    assert options._timeout == timedelta(seconds=7)
    if hasattr(dist, "ProcessGroupNCCL"):  # CUDA builds only
        nccl = dist.ProcessGroupNCCL.Options()
        nccl._timeout = timedelta(seconds=7)
        assert nccl._timeout == timedelta(seconds=7)


def test_json_broadcast_takes_one_collective_unless_the_payload_outgrows_the_buffer():
    calls: list[int] = []

    def body(group: PopulationGroup) -> object:
        broadcast = group.broadcast

        def counted(tensor: torch.Tensor, root: int) -> None:
            if group.rank == 0:
                calls.append(tensor.numel())
            broadcast(tensor, root)

        group.broadcast = counted  # type: ignore[method-assign]
        small = group.broadcast_json({"x": 1} if group.rank == 0 else None)
        big = group.broadcast_json({"y": "z" * 40_000} if group.rank == 0 else None)
        again = group.broadcast_json({"y": "z" * 40_000} if group.rank == 0 else None)
        return small, big, again

    results = run_ranks(2, "gloo", body)
    assert all(r == ({"x": 1}, {"y": "z" * 40_000}, {"y": "z" * 40_000}) for r in results)
    # small: 1 call; big: 2 (the buffer then grows, the same on every rank); the same size again: 1.
    assert len(calls) == 4
