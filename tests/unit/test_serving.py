"""The asynchronous mode's transport on gloo threads: its own group and key space, the snapshot server's
refusals and waits, a member's all-or-none fetch, and the memory its snapshots keep.

Every test runs the same code on the gloo population CI has and on ``NcclStandIn`` (the population of a
GPU run): the asynchronous mode must not care which one it was given.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lightning_pbt.algorithm.lineage import LineageRecord, LineageWriter, read_lineage
from lightning_pbt.algorithm.scheduler import MemberPlan, PBTScheduler
from lightning_pbt.algorithm.space import LogUniform
from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed import transfer
from lightning_pbt.distributed.collectives import PopulationGroup, PopulationWatchdog
from lightning_pbt.distributed.ready_steps.asynchronous import AsynchronousReadySteps
from lightning_pbt.distributed.ready_steps.base import PopulationBook
from lightning_pbt.distributed.ready_steps.lockstep import SynchronousReadySteps
from lightning_pbt.distributed.serving import LineageDrain, Snapshot, SnapshotServer, push_lineage, request_snapshot
from tests.unit.test_transport import NcclStandIn, _Hub, digest, member, run_ranks, state_of, survives_abort

BACKENDS = ["gloo", "nccl-semantics"]
NAMESPACE = "pbt/0"
CPU = torch.device("cpu")


def packed(seed: int) -> tuple[transfer.PackedState, dict]:
    state = state_of(*member(seed))
    return transfer.pack_state(transfer.flatten_state(state), CPU, copy=True), state


@pytest.mark.parametrize("backend", BACKENDS)
@survives_abort
def test_requests_lineage_and_aborts_share_one_key_space_on_every_backend(tmp_path, backend):
    """The server and the drain read with their own store clients what the training thread writes through
    the host group; the host group's abort flag is the population's (the one the watchdog polls)."""
    snapshot, donor_state = packed(0)

    def body(group: PopulationGroup) -> object:
        host = group.host_group()
        assert host is not group and host.backend_name == "gloo" and host.device == CPU
        if group.rank == 0:
            server = SnapshotServer(host, host.new_store_client(), NAMESPACE, 0, host.signal_abort)
            server.publish(Snapshot(3, snapshot))
            server.start()
            drain = LineageDrain(
                host.new_store_client(), NAMESPACE, LineageWriter(tmp_path / "lineage.jsonl"), host.signal_abort
            )
            drain.start()
            host.barrier()  # the loser has its state and has pushed its line
            server.stop(host.store)
            drain.finish(host.store)
            assert server.error is None and drain.error is None
            host.signal_abort("rank 0 stops the test")
            host.barrier()
            return None
        request_snapshot(host.store, NAMESPACE, 0, group.rank, 3)
        received = transfer.receive_state(host, 0, None, CPU)
        record = LineageRecord(step=7, epoch=0, member=1, score=0.5, event="keep", parent=1, hyperparameters={})
        push_lineage(host.store, NAMESPACE, [record])
        host.barrier()
        host.barrier()
        return received, group.abort_reason()

    received, abort = run_ranks(2, backend.split("-")[0], body)[1]
    assert received is not None and digest(transfer.unflatten_state(received.nest, received.tensors)) == digest(
        donor_state
    )
    assert [line.step for line in read_lineage(tmp_path / "lineage.jsonl")] == [7]
    assert abort is not None and "rank 0 stops the test" in abort


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("failing", ["server", "drain"])
@survives_abort
def test_a_failing_server_or_drain_ends_every_rank_through_the_watchdog(tmp_path, backend, failing, monkeypatch):
    """A background thread that fails raises the abort flag through the host group; every rank's watchdog
    (a client of the launch's store, as the strategy starts it) sees it and would end its rank."""
    ended: dict[int, str] = {}
    monkeypatch.setattr(PopulationWatchdog, "_die", lambda self, message: ended.setdefault(self._rank, message))

    def body(group: PopulationGroup) -> object:
        watchdog = PopulationWatchdog(group.new_store_client(), group.rank, interval=0.02)
        watchdog.start()
        host = group.host_group()
        if group.rank == 0:
            if failing == "server":  # a request it cannot serve: its population cannot send
                worker = SnapshotServer(SimpleNamespace(), host.new_store_client(), NAMESPACE, 0, host.signal_abort)
                worker.publish(Snapshot(0, packed(0)[0]))
                request_snapshot(host.store, NAMESPACE, 0, 1, 0)
            else:  # a lineage push that is not a list of lines
                worker = LineageDrain(
                    host.new_store_client(), NAMESPACE, LineageWriter(tmp_path / "lineage.jsonl"), host.signal_abort
                )
                host.store.set(f"{NAMESPACE}/lineage/0", '"not lines"')
            worker.start()
            worker.join(10)
        deadline = time.monotonic() + 10
        while group.rank not in ended and time.monotonic() < deadline:
            time.sleep(0.02)
        watchdog.stop()
        return ended.get(group.rank)

    messages = run_ranks(2, backend.split("-")[0], body)
    thread = "snapshot-server" if failing == "server" else "lineage"
    assert all(message is not None and f"lightning-pbt-{thread}" in message for message in messages), messages


@survives_abort
def test_shutdown_reaches_every_backend_the_population_created():
    store = dist.HashStore()
    group = PopulationGroup(NcclStandIn(_Hub(), 0), 0, 1, CPU, store, "nccl", lambda: store)
    group._timeout = group_timeout = torch.distributed.constants.default_pg_timeout
    host = group.host_group()
    assert host._timeout == group_timeout
    calls: list[str] = []
    host.backend = SimpleNamespace(shutdown=lambda: calls.append("host"))
    group.shutdown()
    assert calls == ["host"] and group.backend.shut_down


@pytest.mark.parametrize("backend", BACKENDS)
@survives_abort
def test_the_server_refuses_a_replaced_snapshot_and_waits_for_one_still_to_come(backend):
    """A loser asks for the version it decided on: an older one than the server holds is refused (the loser
    decides again), the current one is sent, a newer one is sent once this rank has taken it."""
    first, first_state = packed(0)
    second, second_state = packed(1)

    def body(group: PopulationGroup) -> object:
        host = group.host_group()
        if group.rank == 0:
            server = SnapshotServer(host, host.new_store_client(), NAMESPACE, 0, host.signal_abort)
            server.publish(Snapshot(5, first))
            server.start()
            host.store.wait(["asked for 6"])
            server.publish(Snapshot(6, second))
            host.barrier()
            server.stop(host.store)
            return server.error
        outcomes = []
        for version in (4, 5, 6):
            request_snapshot(host.store, NAMESPACE, 0, 1, version)
            if version == 6:
                host.store.set("asked for 6", "1")
            received = transfer.receive_state(host, 0, None, CPU)
            outcomes.append(
                None if received is None else digest(transfer.unflatten_state(received.nest, received.tensors))
            )
        host.barrier()
        return outcomes

    error, outcomes = run_ranks(2, backend.split("-")[0], body)
    assert error is None
    assert outcomes == [None, digest(first_state), digest(second_state)]


class HeldState:
    """A member's live training state (a model and its Adam state at real sizes), as the callback exposes it."""

    device = CPU

    def __init__(self, seed: int) -> None:
        self.model, self.optimizer = member(seed)

    def training_state(self) -> dict:
        return state_of(self.model, self.optimizer)

    def storages(self) -> list[int]:
        return [t.untyped_storage().data_ptr() for t in transfer.flatten_state(self.training_state()).tensors]


def asynchronous_steps(
    group: PopulationGroup, member_size: int, held: HeldState | None = None
) -> AsynchronousReadySteps:
    scheduler = PBTScheduler({"lr": LogUniform(1e-3, 0.1)})
    topology = PopulationTopology(world_size=group.size, world_rank=group.rank, member_size=member_size)
    book = PopulationBook(
        population={m: {"hyperparameters": scheduler.initial_hyperparameters(m), "history": []} for m in range(2)}
    )
    steps = AsynchronousReadySteps(
        population=group.host_group(),
        topology=topology,
        namespace=NAMESPACE,
        scheduler=scheduler,
        book=book,
        member=held or HeldState(group.rank),
        mode="max",
        monitor="val_acc",
        seed=0,
    )
    return steps


@pytest.mark.parametrize("backend", BACKENDS)
@survives_abort
def test_a_member_loads_a_fetched_snapshot_only_when_every_rank_got_it(backend):
    """Member 1 (ranks 2, 3) copies member 0 (ranks 0, 1). Rank 1 has moved on to version 8 while rank 0
    still serves 7: rank 2 receives, rank 3 is refused, and neither changes its state (the member's ranks
    must hold the same state). At the next attempt, for version 8, both get it, in their own tensors."""
    snapshots = [packed(seed) for seed in range(3)]

    def body(group: PopulationGroup) -> object:
        steps = asynchronous_steps(group, member_size=2)
        host = steps.population
        if group.rank < 2:
            server = SnapshotServer(host, host.new_store_client(), NAMESPACE, group.rank, host.signal_abort)
            server.publish(Snapshot(7 + group.rank, snapshots[group.rank][0]))
            server.start()
            host.store.wait(["first attempt done"])
            if group.rank == 0:  # rank 0 catches up; rank 1 keeps serving its version 8
                server.publish(Snapshot(8, snapshots[2][0]))
            host.barrier()
            server.stop(host.store)
            return server.error
        held: HeldState = steps.member  # type: ignore[assignment]
        before, storages = digest(held.training_state()), held.storages()
        first = steps._fetch(0, {"version": 7, "step": 70}, attempt=0)
        unchanged = digest(held.training_state()) == before
        host.store.add("fetched", 1)
        if group.rank == 2:
            while host.store.add("fetched", 0) < 2:
                time.sleep(0.01)
            host.store.set("first attempt done", "1")
        second = steps._fetch(0, {"version": 8, "step": 80}, attempt=1)
        host.barrier()
        own = second.in_place and held.storages() == storages
        return first, unchanged, own, digest(held.training_state())

    results = run_ranks(4, backend.split("-")[0], body)
    assert results[:2] == [None, None]
    # rank j of the loser copies rank j of the donor, into its own tensors, after a first attempt that changed nothing
    assert results[2] == (None, True, True, digest(snapshots[2][1]))
    assert results[3] == (None, True, True, digest(snapshots[1][1]))


@pytest.mark.parametrize("backend", BACKENDS)
@survives_abort
def test_repeated_asynchronous_copies_allocate_no_state_sized_buffer(backend):
    """Issue 33: every asynchronous exploit received into fresh state-sized tensors and copied them into the
    model; the heap kept the freed blocks and every rank's resident memory grew with the run. A copy now
    lands in the loser's own tensors through the receive pool, which keeps its size from copy to copy."""
    snapshots = [packed(seed) for seed in (0, 1, 2)]

    def body(group: PopulationGroup) -> object:
        steps = asynchronous_steps(group, member_size=1)
        host = steps.population
        if group.rank == 0:
            server = SnapshotServer(host, host.new_store_client(), NAMESPACE, 0, host.signal_abort)
            server.start()
            for version, (snapshot, _) in enumerate(snapshots):
                server.publish(Snapshot(version, snapshot))
                host.barrier()  # the loser copies it
                host.barrier()
            server.stop(host.store)
            return server.error
        held: HeldState = steps.member  # type: ignore[assignment]
        storages, capacities, digests = held.storages(), [], []
        for version in range(len(snapshots)):
            host.barrier()
            received = steps._fetch(0, {"version": version, "step": version}, attempt=version)
            assert received is not None and received.in_place
            capacities.append(steps.inbox.capacity)
            digests.append(digest(held.training_state()))
            host.barrier()
        return held.storages() == storages, capacities, digests

    same_storages, capacities, digests = run_ranks(2, backend.split("-")[0], body)[1]
    assert same_storages
    assert digests == [digest(state) for _, state in snapshots]
    state_bytes = sum(t.numel() * t.element_size() for t in transfer.flatten_state(snapshots[0][1]).tensors)
    assert capacities[0] == capacities[-1] and state_bytes <= capacities[0] <= 2 * state_bytes


class RecordingMember:
    """Just enough of a member for ``SynchronousReadySteps._move_states``: a small state it keeps."""

    device = CPU

    def __init__(self) -> None:
        self.state = {"w": torch.zeros(5)}

    def training_state(self) -> dict:
        return self.state

    def load_training_state(self, state: dict, model_in_place: bool) -> None:
        self.state = {key: value.clone() for key, value in state.items()}


def test_transfers_run_on_the_populations_one_nccl_communicator():
    """Plain send/recv on a lazily initialised NCCL group creates a 2-rank communicator per pair of ranks
    that exchange (each with its own stream and GPU buffers, made inside a ready step). The population
    group is connected to its rank's device when it is made, so every transfer runs on the group's one
    communicator, in issue order (the stand-in serialises an eager rank's operations as NCCL does). Rank j
    of a donor only ever sends to rank j of a loser: 4 members of 2 ranks, every member copying every other
    over the rounds, exchange over 2 x (4*3/2) = 12 pairs of ranks, not the 8*7/2 = 28 of all pairs."""
    hub = _Hub()
    members, member_size = 4, 2
    world = members * member_size

    def body(group: PopulationGroup) -> object:
        topology = PopulationTopology(world_size=group.size, world_rank=group.rank, member_size=member_size)
        steps = SynchronousReadySteps(
            population=group,
            topology=topology,
            namespace=NAMESPACE,
            scheduler=None,
            book=PopulationBook(),
            member=RecordingMember(),
            mode="max",
            monitor="val_acc",
            seed=0,
        )
        held = []
        for donor in range(members):  # round `donor`: every other member copies it
            steps.member.state["w"].fill_(10 * topology.member_id + donor)
            plans = {m: MemberPlan(m, "exploit", donor, {}) for m in range(members) if m != donor}
            plans[donor] = MemberPlan(donor, "keep", donor, {})
            steps._move_states(plans, {topology.member_id: steps.member})
            held.append(float(steps.member.state["w"][0]))
        return held

    held = run_ranks(world, "nccl", body, hub=hub)
    assert held == [[11.0 * donor for donor in range(members)]] * world
    assert hub.communicators == {"group"} and hub.eager == set(range(world))
    pairs = [tuple(sorted(pair)) for pair in hub.pairs]
    assert all(a % member_size == b % member_size for a, b in pairs)
    assert len(pairs) == member_size * members * (members - 1) // 2 < world * (world - 1) // 2


def test_snapshots_reuse_their_buffers_while_none_is_being_sent():
    """Consecutive snapshots alternate between two buffer sets (the one served and the one written); a set
    a request is still reading is never overwritten, so a third set is made only then."""
    model, optimizer = member(0)
    server = SnapshotServer(None, None, NAMESPACE, 0, lambda reason: None)
    seen: list[int] = []
    for version in range(6):
        optimizer.step()
        server.take_snapshot(version, transfer.flatten_state(state_of(model, optimizer)), CPU)
        assert digest(transfer.unflatten_state(*_unpacked(server.snapshot.packed))) == digest(
            state_of(model, optimizer)
        )
        seen.append(server.snapshot.packed.messages[0].data_ptr())
    assert len(set(seen)) == 2 and seen[0::2] == [seen[0]] * 3
    server._sending = server.snapshot  # a request reads version 5 while version 6 is taken
    sent = server.snapshot.packed
    before = [m.clone() for m in sent.messages]
    server.take_snapshot(6, transfer.flatten_state(state_of(model, optimizer)), CPU)
    server.take_snapshot(7, transfer.flatten_state(state_of(model, optimizer)), CPU)
    assert all(torch.equal(a, b) for a, b in zip(before, sent.messages, strict=True))
    assert len(server._buffers) == 3


def _unpacked(packed_state: transfer.PackedState) -> tuple[object, list[torch.Tensor]]:
    nest, markers = transfer.read_skeleton(packed_state.skeleton)
    layout = transfer.message_layout(transfer.specs_of(markers))
    return nest, transfer.unpack_messages(packed_state.messages, markers, layout, CPU)
