"""The population transport: the same calls on gloo (CI) and NCCL (GPUs), checked against both.

The transfer code (``transfer.send_state`` / ``receive_state`` through ``PopulationGroup``) runs here
in threads, one per rank, over

- a real gloo backend (an in-process store), and
- ``NcclStandIn``, a backend that reproduces what NCCL does differently from gloo: tags are ignored
  and messages between two ranks match in issue order, each rank processing its operations with one
  peer in issue order (so mismatched orders deadlock, as on a GPU), a receive must be as large as the
  send, only the dtypes of torch's ``getNcclDataType`` are accepted (no complex, int16 or unsigned
  wider than 8 bits), and the coalescing block (whose per-op works NCCL returns as ``None``) is not to
  be used. It also counts the communicators plain ``send``/``recv`` would make NCCL create: one per
  pair of ranks that exchange (``ProcessGroupNCCL::pointToPoint`` keys them by ``getKeySendRecv``).

Each test that runs gloo threads is guarded (:func:`survives_abort`): a gloo error that terminates the
process (a size mismatch does, from gloo's own thread) fails that test by name and the run goes on.

A transport that passes both moves state the same way on a GPU node as in CI; the GPU tier
(``tests/gpu``) runs it on real NCCL where a machine has two GPUs.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import multiprocessing.context
import os
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_pbt.distributed import collectives, staging, transfer
from lightning_pbt.distributed.collectives import PopulationGroup, barrier_device_ids
from lightning_pbt.plugin.trainer_member import TrainerMember

# torch's getNcclDataType (torch/csrc/distributed/c10d/NCCLUtils.hpp): every other dtype is a TypeError.
NCCL_DTYPES = frozenset(
    {
        torch.int8,
        torch.uint8,
        torch.float32,
        torch.float64,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bool,
        torch.bfloat16,
        torch.float8_e5m2,
        torch.float8_e4m3fn,
        torch.float8_e4m3fnuz,
        torch.float8_e5m2fnuz,
    }
)
GLOO_TIMEOUT = timedelta(seconds=10)  # a rank left waiting by a failed peer fails soon, not after minutes


def survives_abort(test: Callable) -> Callable:
    """Run ``test`` in a child process, so that a gloo error that aborts the process fails this test, by
    name, instead of ending the whole pytest run.

    The child comes from a fork server (:func:`guard_context`), never from a fork of pytest: pytest has run
    torch code by then, and a fork of a process whose OpenMP pool has started deadlocks in the child's
    first parallel operation (the suite hung that way without ``OMP_NUM_THREADS=1``). A ``MonkeyPatch``
    argument is replaced by a fresh one in the child, where the test runs and patches.
    """

    @functools.wraps(test)
    def guarded(*args: object, **kwargs: object) -> None:
        context = guard_context()
        args = tuple(_PATCH if isinstance(arg, pytest.MonkeyPatch) else arg for arg in args)
        kwargs = {key: _PATCH if isinstance(arg, pytest.MonkeyPatch) else arg for key, arg in kwargs.items()}
        reader, writer = context.Pipe(duplex=False)
        target = (test.__module__, test.__qualname__)
        child = context.Process(target=_run_guarded, args=(target, args, kwargs, writer), daemon=True)
        child.start()
        writer.close()
        outcome = reader.recv() if reader.poll(100) else None
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
        if outcome is None:
            pytest.fail(f"{test.__name__}: its process died or hung (exit code {child.exitcode})", pytrace=False)
        if outcome != "ok":
            pytest.fail(f"{test.__name__} failed in its guarded process:\n{outcome}", pytrace=False)

    return guarded


_PATCH = "<a MonkeyPatch of the guarded process>"
# What the fork server imports once (torch, Lightning, this package, these helpers): importing starts no
# torch thread (its intra-op pool starts at the first parallel operation), so every child is forked from a
# process that never ran torch code, and none pays the imports again.
GUARD_PRELOAD = ("torch", "torch.distributed", "lightning_pbt.plugin.callback", __name__)


@functools.cache
def guard_context() -> multiprocessing.context.BaseContext:
    """The ``forkserver`` context the guarded tests' children start from (its server started on first use)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(GUARD_PRELOAD))
    return context


def _is_patch(arg: object) -> bool:
    return isinstance(arg, str) and arg == _PATCH


def _run_guarded(target: tuple[str, str], args: tuple, kwargs: dict, writer: object) -> None:
    try:
        module, name = target
        test = getattr(importlib.import_module(module), name).__wrapped__  # the test under the guard
        with pytest.MonkeyPatch.context() as patch:
            args = tuple(patch if _is_patch(arg) else arg for arg in args)
            kwargs = {key: patch if _is_patch(arg) else arg for key, arg in kwargs.items()}
            test(*args, **kwargs)
        writer.send("ok")  # type: ignore[attr-defined]
    except BaseException:
        writer.send(traceback.format_exc())  # type: ignore[attr-defined]
    finally:
        os._exit(0)  # no interpreter teardown: gloo threads of a failed test may still be blocked


def _parallel_sum() -> float:
    """A matrix product large enough to run on torch's intra-op pool, with two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return float((torch.ones(600, 600) @ torch.ones(600, 600)).sum())
    finally:
        torch.set_num_threads(threads)


@survives_abort
def _parallel_torch_in_a_guarded_process() -> None:
    assert _parallel_sum() == 600.0**3


def test_a_guarded_test_runs_parallel_torch_after_pytest_started_its_thread_pool():
    """The guard's child must not inherit pytest's started OpenMP pool: a forked child hangs in its first
    parallel operation (whatever ``OMP_NUM_THREADS`` says, once two threads have run here)."""
    assert _parallel_sum() == 600.0**3  # pytest's own pool is now running, with two threads
    assert guard_context().get_start_method() != "fork"
    _parallel_torch_in_a_guarded_process()


# -- a stand-in with NCCL's point-to-point semantics -------------------------------------------------
@dataclass
class _Op:
    kind: str  # "send" or "recv"
    tensor: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class _Hub:
    """Every rank's operations, per peer, in issue order; an operation completes when it and its
    counterpart are both at the head of their ranks' queues for each other. A rank whose backend was
    connected to its device (``eager_connect_single_device``) runs its point-to-point operations on the
    group's one communicator and stream, as NCCL does in eager mode: in issue order across all its peers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: dict[tuple[int, int], deque[_Op]] = {}
        self.communicators: set[frozenset[int] | str] = set()  # what NCCL would create: per pair, or the group's
        self.pairs: set[frozenset[int]] = set()  # the ranks that exchanged
        self.eager: set[int] = set()
        self.pending: dict[int, deque[_Op]] = {}  # an eager rank's operations, in issue order

    def issue(self, rank: int, peer: int, op: _Op) -> _Op:
        if op.tensor.dtype not in NCCL_DTYPES:
            raise TypeError(f"Input tensor data type is not supported for NCCL process group: {op.tensor.dtype}")
        with self.lock:
            self.pairs.add(frozenset((rank, peer)))
            self.communicators.add("group" if rank in self.eager else frozenset((rank, peer)))
            self.queues.setdefault((rank, peer), deque()).append(op)
            if rank in self.eager:
                self.pending.setdefault(rank, deque()).append(op)
            self._progress()
        return op

    def _next(self, rank: int, op: _Op) -> bool:
        """Whether ``op`` may run now: always with a per-pair communicator, first of its rank's otherwise."""
        return rank not in self.eager or self.pending[rank][0] is op

    def _progress(self) -> None:
        moved = True
        while moved:
            moved = False
            for (a, b), queue in self.queues.items():
                other = self.queues.get((b, a))
                if not queue or not other:
                    continue
                head, counterpart = queue[0], other[0]
                if (
                    head.kind == "send"
                    and counterpart.kind == "recv"
                    and self._next(a, head)
                    and self._next(b, counterpart)
                ):
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
                    for rank in (a, b):
                        if rank in self.eager:
                            self.pending[rank].popleft()
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
        self.shut_down = False

    def shutdown(self) -> None:
        self.shut_down = True

    def eager_connect_single_device(self, device: torch.device) -> None:
        with self.hub.lock:
            self.hub.eager.add(self.rank)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> _Work:
        return _Work(self.hub.issue(self.rank, dst, _Op("send", tensors[0])))

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> _Work:
        return _Work(self.hub.issue(self.rank, src, _Op("recv", tensors[0])))

    def _start_coalescing(self, *args: object) -> None:
        raise AssertionError("the transport must not use the coalescing block: its per-op works are None on NCCL")

    _end_coalescing = _start_coalescing


# -- groups of threads -------------------------------------------------------------------------------
def run_ranks(
    size: int, backend: str, body: Callable[[PopulationGroup], object], hub: _Hub | None = None
) -> list[object]:
    """``body(group)`` on ``size`` threads, one per rank, over ``backend``; re-raises the first failure.

    The groups are built as the strategy builds them (``PopulationGroup.create`` for gloo), with a store
    client factory, so that ``host_group()`` and the background threads' clients work as in a run.
    """
    store, hub = dist.HashStore(), hub or _Hub()
    store.set_timeout(GLOO_TIMEOUT)
    results: list[object] = [None] * size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            if backend == "gloo":
                group = PopulationGroup.create(
                    store, rank, size, "gloo", torch.device("cpu"), GLOO_TIMEOUT, connect_store=lambda: store
                )
            else:
                group = PopulationGroup(
                    NcclStandIn(hub, rank), rank, size, torch.device("cpu"), store, "nccl", lambda: store
                )
                group._timeout = GLOO_TIMEOUT  # what PopulationGroup.create records (its host group needs it)
            results[rank] = body(group)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError("a rank did not finish within 60 s")
    return results


def member(seed: int, width: int = 1000) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A trained model at real sizes: its first weight and Adam moments are 1.2 MB (direct messages), the
    rest (biases, BatchNorm buffers, the head) a few KB (bucketed)."""
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


def test_the_test_states_take_both_message_paths():
    sizes = [t.numel() * t.element_size() for t in transfer.flatten_state(state_of(*member(0))).tensors]
    assert max(sizes) >= 1 << 20 and min(sizes) < transfer.DIRECT_BYTES
    layout = transfer.message_layout([(torch.float32, size // 4) for size in sizes])
    assert any(len(message) == 1 for message in layout) and any(len(message) > 1 for message in layout)


# -- the contract -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["gloo", "nccl-semantics"])
@pytest.mark.parametrize("loser_width", [1000, 900], ids=["same-specs", "other-specs"])
@survives_abort
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
        if loser_width == 1000:  # every tensor but the step counters differs: weights, BN buffers, Adam moments
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
        assert in_place is (loser_width == 1000)
        assert same_parameter and weight_arrived is (loser_width == 1000)  # in place: the module's own tensor


class CopyingStateDict(nn.Module):
    """A module whose ``state_dict`` hands out copies (a state-dict hook), as some wrappers do."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(600, 500)  # 1.2 MB: a direct message
        self.norm = nn.BatchNorm1d(500)
        self._register_state_dict_hook(lambda module, state, prefix, local: _copied(state))


def _copied(state: dict) -> dict:
    for key, value in state.items():
        state[key] = value.clone()
    return state


@survives_abort
def test_an_in_place_receive_still_loads_state_that_is_not_the_modules_own_memory():
    """Same specs, so the loser receives into the tensors ``state_dict()`` gave it; here those are copies,
    and the member must still end with the donor's weights (``load_training_state``)."""
    donor = CopyingStateDict(0)

    def training_state(module: nn.Module) -> dict:
        return {
            "model": module.state_dict(),
            "optimizers": [],
            "lr_schedulers": [],
            "lr_scheduler_types": [],
            "precision": {},
            "callbacks": {},
        }

    def body(group: PopulationGroup) -> object:
        if group.rank == 0:
            flat = transfer.flatten_state(training_state(donor))
            transfer.send_state(group, transfer.pack_state(flat, group.device), [1])
            return None
        loser = CopyingStateDict(1)
        trainer = SimpleNamespace(lightning_module=loser, optimizers=[], lr_scheduler_configs=[], callbacks=[])
        own = transfer.flatten_state(training_state(loser)).tensors
        received = transfer.receive_state(group, 0, own, torch.device("cpu"))
        assert received is not None and received.in_place
        TrainerMember(trainer, loser, lambda: None, None).load_training_state(
            transfer.unflatten_state(received.nest, received.tensors), model_in_place=True
        )
        return loser

    loser = run_ranks(2, "gloo", body)[1]
    assert digest(loser.state_dict()) == digest(donor.state_dict())


class StridedWeights(nn.Module):
    """Weights whose memory is not in their logical order, at real sizes: a channels_last convolution
    (1.2 MB) and a parameter that is a transposed view (1 MB); Adam's moments keep their layouts. Each is
    a message of its own that cannot be received into the tensor itself: it lands in a staging buffer."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(128, 256, 3).to(memory_format=torch.channels_last)
        self.proj = nn.Parameter(torch.randn(512, 512).t())
        self.optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        self(torch.randn(2, 128, 5, 5)).pow(2).sum().backward()
        self.optimizer.step()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1)[:, :512] @ self.proj


@pytest.mark.parametrize("backend", ["gloo", "nccl-semantics"])
def test_a_synchronous_copy_of_channels_last_and_transposed_weights_reaches_the_losers_own_tensors(backend):
    """Lockstep's exploit (``SynchronousReadySteps._move_states``) of members with equal specs receives in
    place; a non-contiguous tensor arrives in a staging buffer and must be copied into the loser's own
    tensor, which keeps its identity and memory format. The loser then holds the donor's state exactly."""
    from lightning_pbt.algorithm.scheduler import MemberPlan
    from lightning_pbt.algorithm.topology import PopulationTopology
    from lightning_pbt.distributed.ready_steps.base import PopulationBook
    from lightning_pbt.distributed.ready_steps.lockstep import SynchronousReadySteps

    models = [StridedWeights(seed) for seed in (0, 1)]
    donor_state = state_of(models[0], models[0].optimizer)
    expected = digest(donor_state)
    assert not models[1].conv.weight.is_contiguous() and not models[1].proj.is_contiguous()
    assert digest(state_of(models[1], models[1].optimizer))[1:] != expected[1:]
    weight, proj, memory = models[1].conv.weight, models[1].proj, models[1].conv.weight.data_ptr()

    def body(group: PopulationGroup) -> object:
        model = models[group.rank]
        trainer = SimpleNamespace(
            lightning_module=model, optimizers=[model.optimizer], lr_scheduler_configs=[], callbacks=[],
            precision_plugin=SimpleNamespace(state_dict=dict), strategy=SimpleNamespace(root_device=group.device),
        )  # fmt: skip
        steps = SynchronousReadySteps(
            population=group, topology=PopulationTopology(world_size=2, world_rank=group.rank), namespace="pbt/0",
            scheduler=None, book=PopulationBook(), member=TrainerMember(trainer, model, lambda: None, None),
            mode="max", monitor="val_acc", seed=0,
        )  # fmt: skip
        plans = {0: MemberPlan(0, "keep", 0, {}), 1: MemberPlan(1, "exploit", 0, {})}
        steps._move_states(plans, {steps.me: steps.member})  # this process hosts one member
        return None

    run_ranks(2, backend.split("-")[0], body)
    loser = models[1]
    assert digest(state_of(loser, loser.optimizer)) == expected
    assert loser.conv.weight is weight and loser.proj is proj and loser.conv.weight.data_ptr() == memory
    assert loser.conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["gloo", "nccl-semantics"])
@pytest.mark.parametrize("copy", [True, False], ids=["snapshot", "live"])
@survives_abort
def test_a_snapshot_keeps_its_step_while_a_live_packing_sends_the_tensors_as_they_are(backend, copy):
    """``copy=True`` (the asynchronous snapshot): no message shares memory with a live tensor, and training
    after the packing does not reach the loser. ``copy=False``: large tensors go without a copy."""
    model, optimizer = member(0)
    at_packing = digest(state_of(model, optimizer))

    def body(group: PopulationGroup) -> object:
        if group.rank == 0:
            flat = transfer.flatten_state(state_of(model, optimizer))
            packed = transfer.pack_state(flat, group.device, copy=copy)
            live = {t.untyped_storage().data_ptr() for t in flat.tensors}
            shared = [m for m in packed.messages if m.untyped_storage().data_ptr() in live]
            model(torch.randn(8, 300)).pow(2).sum().backward()  # training goes on before the send
            optimizer.step()
            transfer.send_state(group, packed, [1])
            return shared
        received = transfer.receive_state(group, 0, None, torch.device("cpu"))
        assert received is not None
        return transfer.unflatten_state(received.nest, received.tensors)

    shared, state = run_ranks(2, backend.split("-")[0], body)
    if copy:
        assert shared == [] and digest(state) == at_packing
    else:  # the 1.2 MB weight and its two Adam moments travel from their own memory: they changed
        assert sum(m.numel() == 300_000 for m in shared) == 3 and digest(state) != at_packing
        assert torch.equal(state["model"]["0.weight"], model[0].weight)


class OddDtypes(nn.Module):
    """Buffers NCCL has no dtype for, large (direct) and small (bucketed)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("spectrum", torch.randn(40_000, dtype=torch.complex64, generator=generator))
        self.register_buffer("phase", torch.randn(7, dtype=torch.complex128, generator=generator))
        self.register_buffer("codes", torch.randint(-30_000, 30_000, (50_000,), dtype=torch.int16, generator=generator))
        self.register_buffer("counts", torch.randint(0, 60_000, (9,), generator=generator).to(torch.uint16))
        self.linear = nn.Linear(4, 4)


@pytest.mark.parametrize("backend", ["gloo", "nccl-semantics"])
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "fresh"])
@survives_abort
def test_complex_and_int16_state_travels_bit_exactly_as_bytes(backend, in_place):
    donor = OddDtypes(0)

    def body(group: PopulationGroup) -> object:
        if group.rank == 0:
            transfer.send_state(
                group, transfer.pack_state(transfer.flatten_state(donor.state_dict()), group.device), [1]
            )
            return None
        loser = OddDtypes(1)
        own = transfer.flatten_state(loser.state_dict()).tensors if in_place else None
        received = transfer.receive_state(group, 0, own, torch.device("cpu"))
        assert received is not None and received.in_place is in_place
        return loser, transfer.unflatten_state(received.nest, received.tensors)

    loser, state = run_ranks(2, backend.split("-")[0], body)[1]
    assert digest(state) == digest(donor.state_dict())
    if in_place:
        assert torch.equal(loser.spectrum, donor.spectrum) and torch.equal(loser.codes, donor.codes)


@pytest.mark.parametrize("backend", ["gloo", "nccl-semantics"])
@survives_abort
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
    """Guards the guard: receives posted in another order than the sends deadlock or mismatch; dtypes
    outside getNcclDataType's table are refused; the coalescing block is refused."""

    def body(group: PopulationGroup) -> object:
        small, large = torch.zeros(4), torch.zeros(16)
        if group.rank == 0:
            group.exchange([(1, [torch.ones(4), torch.ones(16)])], [])
        else:
            group.exchange([], [(1 - group.rank, [large, small])])
        return None

    with pytest.raises((RuntimeError, TimeoutError), match=r"size mismatch|deadlock"):
        run_ranks(2, "nccl", body)
    stand_in = NcclStandIn(_Hub(), 0)
    for dtype in (torch.complex64, torch.int16, torch.uint16, torch.uint32, torch.uint64):
        with pytest.raises(TypeError, match="not supported for NCCL"):
            stand_in.send([torch.zeros(2, dtype=dtype)], 1, 0)
    with pytest.raises(AssertionError, match="coalescing"):
        stand_in._start_coalescing()


def test_nccl_group_is_created_with_the_timeout(monkeypatch):
    """``PopulationGroup.create`` puts the timeout into NCCL's options. On a CPU build the options are the
    base ``Backend.Options`` NCCL's extend (torch/csrc/distributed/c10d/init.cpp), so this also pins the
    private ``_timeout`` field it sets."""
    created: list[object] = []

    class RecordingNccl:
        Options = staticmethod(lambda: torch._C._distributed_c10d.Backend.Options("nccl"))

        def __init__(self, store: object, rank: int, size: int, options: object) -> None:
            created.append(options)

        def eager_connect_single_device(self, device: torch.device) -> None:
            created.append(device)

    monkeypatch.setattr(dist, "ProcessGroupNCCL", RecordingNccl, raising=False)
    group = PopulationGroup.create(dist.HashStore(), 0, 1, "nccl", torch.device("cuda", 1), timedelta(seconds=7))
    assert group.backend_name == "nccl" and created[0]._timeout == timedelta(seconds=7)
    assert created[1:] == [torch.device("cuda", 1)]  # connected to the rank's device, once (see PopulationGroup)
    if hasattr(torch._C._distributed_c10d, "ProcessGroupNCCL"):  # CUDA builds: the real options too
        nccl = torch._C._distributed_c10d.ProcessGroupNCCL.Options()
        nccl._timeout = timedelta(seconds=7)
        assert nccl._timeout == timedelta(seconds=7)


def test_the_population_barrier_names_its_ranks_gpu_and_nothing_on_the_host():
    """NCCL runs a barrier on a device it must be told (else the device of earlier collectives, or a guess);
    the same code passes gloo an empty list (``host.barrier()`` runs on real gloo throughout these tests)."""
    seen: list[list[int]] = []

    class RecordingBackend:
        def eager_connect_single_device(self, device: torch.device) -> None:
            pass

        def barrier(self, options: dist.BarrierOptions) -> SimpleNamespace:
            seen.append(list(options.device_ids))
            return SimpleNamespace(wait=lambda: True)

    for device in (torch.device("cuda", 2), torch.device("cpu")):
        PopulationGroup(RecordingBackend(), 0, 1, device, dist.HashStore(), "nccl").barrier()  # type: ignore[arg-type]
    assert seen == [[2], []]
    with pytest.raises(ValueError, match="must name its index"):
        barrier_device_ids(torch.device("cuda"))


@survives_abort
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


def test_the_staging_pool_reuses_one_buffer_and_grows_only_to_the_largest_round():
    """The pool asks for the power-of-two blocks torch's page-locked allocator really reserves (and keeps):
    what it holds, outgrown blocks included, stays under twice its capacity, under four times the largest
    round, however the rounds grow."""
    pool = staging.StagingPool()
    first = pool.take([(1000, torch.float32), (3, torch.int64), (5, torch.uint8)])
    base = first[0].data_ptr()
    assert [t.dtype for t in first] == [torch.float32, torch.int64, torch.uint8]
    assert len({t.data_ptr() for t in first}) == 3 and all(t.data_ptr() % 8 == 0 for t in first)
    assert pool.capacity == pool.held == 8192  # 4032 + 64 + 64 bytes (64-byte aligned), rounded as the allocator does
    again = pool.take([(2000, torch.float32)])  # 8000 bytes: the block the allocator reserved anyway
    assert again[0].data_ptr() == base and pool.capacity == 8192
    bigger = pool.take([(10_000, torch.float32)])
    assert pool.capacity == 65_536 and bigger[0].numel() == 10_000 and pool.held == 8192 + 65_536
    pool.take([(10, torch.float32)])
    assert pool.capacity == 65_536
    largest = 40_000
    for numel in range(10_001, 3_000_000, 77_777):  # rounds that keep growing
        pool.take([(numel, torch.float32)])
        largest = numel * 4
        assert pool.capacity == staging.block_bytes(pool.capacity) >= largest
        assert pool.held < 2 * pool.capacity < 4 * largest


@survives_abort
def test_staged_transfers_leave_nothing_in_the_pool_that_a_later_transfer_overwrites(monkeypatch):
    """GPU tensors over gloo go through the process's staging pools; forced here on CPU tensors (the
    same code, minus the page-locking). A state received earlier must not change when the pools are
    reused by the next transfer, received in place or not; the pools stay as large as one state."""
    monkeypatch.setattr(transfer, "stages", lambda source, transport: True)
    for pool in staging.STAGING.values():
        monkeypatch.setattr(pool, "_buffer", None)
    states = [state_of(*member(seed)) for seed in (0, 1)]
    expected = [digest(state) for state in states]

    def body(group: PopulationGroup) -> object:
        if group.rank == 0:
            for state in states * 2:
                transfer.send_state(group, transfer.pack_state(transfer.flatten_state(state), group.device), [1])
            return None
        received, capacities = [], []
        for in_place in (True, True, False, False):
            model, optimizer = member(5)
            own = transfer.flatten_state(state_of(model, optimizer)).tensors if in_place else None
            got = transfer.receive_state(group, 0, own, torch.device("cpu"))
            assert got is not None and got.in_place is in_place
            received.append(transfer.unflatten_state(got.nest, got.tensors))
            capacities.append(staging.STAGING["receive"].capacity)
        return received, capacities

    received, capacities = run_ranks(2, "gloo", body)[1]
    assert [digest(state) for state in received] == expected * 2
    # in place, only the buckets are staged (the large tensors arrive in the loser's own); fresh, everything
    bucketed = sum(
        t.numel() * t.element_size() for t in transfer.flatten_state(states[0]).tensors if t.numel() < 300_000
    )
    assert 0 < capacities[0] == capacities[1] <= staging.block_bytes(bucketed + 64 * 20) < capacities[2]
    assert capacities[2] == capacities[3]
    state_bytes = sum(t.numel() * t.element_size() for t in transfer.flatten_state(states[0]).tensors)
    for pool in staging.STAGING.values():  # a fresh receive stages everything; a send only the buckets
        assert 0 < pool.capacity <= staging.block_bytes(state_bytes + 64 * 20)
def test_waiting_for_everyone_looks_again_soon_then_backs_off(monkeypatch):
    """At the end of a fit every rank waits in the store for the others: looks start 1 ms apart and back
    off to ``poll_seconds``, so ranks that arrive together do not each lose up to a whole poll."""
    pauses: list[float] = []
    monkeypatch.setattr(collectives.time, "sleep", pauses.append)
    store = dist.HashStore()
    group = PopulationGroup(
        SimpleNamespace(eager_connect_single_device=lambda device: None), 0, 3, torch.device("cpu"), store, "gloo"
    )  # type: ignore[arg-type]
    looks = iter(range(100))

    def meanwhile() -> None:  # the two other ranks arrive after the 9th look
        if next(looks) == 8:
            store.add("done", 2)

    group.wait_for_everyone("done", poll_seconds=0.05, barrier=False, meanwhile=meanwhile)
    assert pauses == [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05, 0.05]
