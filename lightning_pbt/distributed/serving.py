"""Background threads of the asynchronous mode: serving snapshots and draining the lineage.

In asynchronous PBT no training thread waits for another member. A member takes a snapshot of its
state at each of its ready steps (host memory, so later training cannot change it; the buffers are reused
from step to step) and a
:class:`SnapshotServer` thread sends it to whoever asks: a loser's rank ``j`` writes a request into
the launch's store and receives from rank ``j`` of the donor over the population's host group (a gloo
group of its own on every backend, sharing the population's store keys).

Population rank 0 runs a :class:`LineageDrain`: members push their lineage lines into the store and
the drain appends them to ``lineage.jsonl``, so that rank 0's training is never blocked by a file.

Both threads read numbered keys in order and block in the store until the next one exists, so a
request is noticed at once and an idle thread costs nothing; each has a store client of its own (a
blocked wait must not hold up the training thread's store calls) and is stopped by a stop message
written into its own sequence.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_pbt.algorithm.lineage import LineageRecord, LineageWriter
from lightning_pbt.distributed import transfer

__all__ = [
    "LineageDrain",
    "Snapshot",
    "SnapshotServer",
    "push_count",
    "push_lineage",
    "request_snapshot",
    "wait_until_written",
]

log = logging.getLogger(__name__)

_REFUSED = -1
_STOP = {"stop": True}
_PENDING_POLL = 0.002  # while a request waits for a snapshot version this rank has not taken yet


@dataclass
class Snapshot:
    """One member's training state at one of its ready steps, ready to send.

    Attributes:
        version: the member's ready-step count when it was taken (requests name it).
        packed: the state, flattened and packed in host memory (:func:`~lightning_pbt.distributed.transfer.pack_state`).
    """

    version: int
    packed: transfer.PackedState


def _request_key(namespace: str, server_rank: int, index: int) -> str:
    return f"{namespace}/request/{server_rank}/{index}"


def _post_request(store: Any, namespace: str, server_rank: int, message: dict[str, Any]) -> None:
    index = store.add(f"{namespace}/requests/{server_rank}", 1) - 1
    store.set(_request_key(namespace, server_rank, index), json.dumps(message))


def request_snapshot(store: Any, namespace: str, server_rank: int, my_rank: int, version: int) -> None:
    """Ask ``server_rank`` for its snapshot ``version``; receive it with :func:`transfer.receive_state`.

    Args:
        store: the launch's store.
        namespace: the run's key prefix in the store.
        server_rank: the donor's population rank (rank ``j`` of the donor for rank ``j`` of the loser).
        my_rank: this rank's population rank, where the snapshot is sent.
        version: the snapshot version the loser decided on.
    """
    _post_request(store, namespace, server_rank, {"peer": my_rank, "version": version})


def push_key(namespace: str, index: int) -> str:
    return f"{namespace}/lineage/{index}"


def _push(store: Any, namespace: str, payload: Any) -> int:
    index = store.add(f"{namespace}/lineage_count", 1) - 1
    store.set(push_key(namespace, index), json.dumps(payload))
    return index


def push_lineage(store: Any, namespace: str, records: list[LineageRecord]) -> int:
    """Hand one member's lines of one ready step to population rank 0's drain; returns the push's index.

    Args:
        store: the launch's store.
        namespace: the run's key prefix in the store.
        records: the member's lineage lines of this ready step.
    """
    return _push(store, namespace, [record.to_dict() for record in records])


def wait_until_written(store: Any, namespace: str, index: int, timeout: float) -> bool:
    """Whether the drain has written push ``index`` (and all before it) within ``timeout`` seconds.

    Args:
        store: the launch's store.
        namespace: the run's key prefix in the store.
        index: a push's index, as :func:`push_lineage` returned it.
        timeout: seconds to wait at most.
    """
    deadline = time.monotonic() + timeout
    while int(store.add(f"{namespace}/lineage_written", 0)) <= index:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def push_count(store: Any, namespace: str) -> int:
    """How many lineage pushes the members have made so far.

    Args:
        store: the launch's store.
        namespace: the run's key prefix in the store.
    """
    return store.add(f"{namespace}/lineage_count", 0)


def _wait(store: Any, key: str) -> None:
    """Block until ``key`` exists. The store's own timeout only makes it look again."""
    while True:
        try:
            store.wait([key])
            return
        except Exception as error:  # DistStoreError on timeout; a lost store is a real failure
            if "timeout" not in str(error).lower():
                raise


class _Worker(threading.Thread):
    """A daemon loop that reports its failure through ``on_failure`` (the population's abort flag)."""

    def __init__(self, name: str, on_failure: Callable[[str], None]) -> None:
        super().__init__(daemon=True, name=name)
        self._on_failure = on_failure
        self._stopping = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.loop()
        except BaseException as error:  # reported: a silent server would leave a loser waiting
            self.error = error
            if not self._stopping:
                log.error("%s failed: %s", self.name, error, exc_info=True)
                self._on_failure(f"{self.name} failed: {type(error).__name__}: {error}")

    def loop(self) -> None:
        raise NotImplementedError

    def _post_stop(self, store: Any) -> None:
        raise NotImplementedError

    def stop(self, store: Any, timeout: float = 10.0) -> None:
        """Wake the loop with a stop message (written with the caller's ``store`` client) and join it."""
        self._stopping = True
        if not self.is_alive():
            return
        try:
            self._post_stop(store)
        except Exception:  # the store may be gone after a failure: the thread is a daemon
            log.debug("could not post a stop message to %s", self.name, exc_info=True)
            return
        self.join(timeout)


class SnapshotServer(_Worker):
    """Serves this rank's latest snapshot, in request order, while training goes on.

    A request names the snapshot version the loser decided on. A version not taken yet (this rank is a
    moment behind the member rank that published it) is served when it arrives; a replaced one is
    refused, and the loser's member decides again.

    Args:
        population: the population group the snapshots travel over (its gloo host group on GPUs).
        store: a store client of the thread's own.
        namespace: the run's key prefix in the store.
        rank: this rank's population rank (whose requests it serves).
        on_failure: called with a message when the thread fails (raises the population's abort flag).
    """

    def __init__(
        self, population: Any, store: Any, namespace: str, rank: int, on_failure: Callable[[str], None]
    ) -> None:
        super().__init__(f"lightning-pbt-snapshot-server-{rank}", on_failure)
        self.population = population
        self.store = store
        self.namespace = namespace
        self.rank = rank
        self._snapshot: Snapshot | None = None
        self._sending: Snapshot | None = None
        self._buffers: list[transfer.PackedState] = []  # at most 3: published, being sent, being written
        self._lock = threading.Lock()
        self._published = threading.Event()

    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
        self._published.set()

    def take_snapshot(self, version: int, flat: transfer.FlatState, device: Any) -> None:
        """Copy ``flat`` into a snapshot buffer set and serve it as ``version``.

        The buffers are reused: a set that is neither the one served now nor one a request is reading is
        overwritten, so memory stays flat over the ready steps (at most three full copies, usually two).
        """
        with self._lock:
            busy = [snapshot.packed for snapshot in (self._snapshot, self._sending) if snapshot is not None]
            spare = next((packed for packed in self._buffers if all(packed is not b for b in busy)), None)
        packed = transfer.pack_state(flat, device, copy=True, reuse=spare)
        with self._lock:
            if packed is not spare:  # a new set (none was free, or the layout changed): the old spare goes
                self._buffers = [b for b in self._buffers if b is not spare] + [packed]
            self._snapshot = Snapshot(version, packed)
        self._published.set()

    @property
    def snapshot(self) -> Snapshot | None:
        with self._lock:
            return self._snapshot

    def _post_stop(self, store: Any) -> None:
        _post_request(store, self.namespace, self.rank, _STOP)

    def loop(self) -> None:
        pending: list[dict[str, Any]] = []
        index = 0
        while True:
            key = _request_key(self.namespace, self.rank, index)
            if not pending:
                _wait(self.store, key)
            elif not self.store.check([key]):  # a request waits for a snapshot: look again soon
                self._published.wait(_PENDING_POLL)
                self._published.clear()
                pending = [request for request in pending if not self._serve(request)]
                continue
            request = json.loads(self.store.get(key))
            self.store.delete_key(key)
            index += 1
            if request.get("stop"):
                return
            pending.append(request)
            self._published.clear()
            pending = [request for request in pending if not self._serve(request)]

    def _serve(self, request: dict[str, Any]) -> bool:
        """Send or refuse ``request``; False while its version is still to come."""
        with self._lock:  # marked as being sent, so that take_snapshot does not overwrite it meanwhile
            snapshot = self._snapshot
            if snapshot is None or snapshot.version < request["version"]:
                return False
            self._sending = snapshot
        try:
            status = _REFUSED if snapshot.version > request["version"] else 0
            transfer.send_state(self.population, snapshot.packed, [request["peer"]], status)
        finally:
            with self._lock:
                self._sending = None
        return True


class LineageDrain(_Worker):
    """Population rank 0: appends the lineage lines members push into the store, in push order.

    Args:
        store: a store client of the thread's own.
        namespace: the run's key prefix in the store.
        writer: the lineage file's writer.
        on_failure: called with a message when the thread fails (raises the population's abort flag).
        on_written: called with each batch of lines once written (the console's lines of asynchronous mode).
    """

    def __init__(
        self,
        store: Any,
        namespace: str,
        writer: LineageWriter,
        on_failure: Callable[[str], None],
        on_written: Callable[[list[LineageRecord]], None] | None = None,
    ) -> None:
        super().__init__("lightning-pbt-lineage", on_failure)
        self.store = store
        self.namespace = namespace
        self.writer = writer
        self.on_written = on_written
        self.consumed = 0

    def _post_stop(self, store: Any) -> None:
        _push(store, self.namespace, _STOP)

    def loop(self) -> None:
        while True:
            _wait(self.store, push_key(self.namespace, self.consumed))
            if not self._write_available(self.store):
                return

    def _write_available(self, store: Any) -> bool:
        """Write the pushes there are now, in one batch; False once the stop message is reached."""
        records: list[LineageRecord] = []
        keys: list[str] = []
        running = True
        while store.check([push_key(self.namespace, self.consumed + len(keys))]):
            key = push_key(self.namespace, self.consumed + len(keys))
            keys.append(key)
            payload = json.loads(store.get(key))
            if isinstance(payload, dict) and payload.get("stop"):
                running = False
                break
            records.extend(LineageRecord.from_dict(line) for line in payload)
        self.writer.write(records)
        if self.on_written is not None and records:
            self.on_written(records)
        self.consumed += len(keys)
        store.add(f"{self.namespace}/lineage_written", len(keys))  # what wait_until_written reads
        for key in keys:
            store.delete_key(key)
        return running

    def finish(self, store: Any) -> None:
        """Every member has pushed its last line: stop the thread, then write whatever is left."""
        self._stopping = True
        self._post_stop(store)
        self.join()  # no timeout: the rest is written here, never by two threads at once
        if self.error is not None:
            raise self.error
        total = push_count(store, self.namespace)
        while self.consumed < total:
            _wait(store, push_key(self.namespace, self.consumed))
            self._write_available(store)
