"""Background threads of the asynchronous mode: serving snapshots and draining the lineage.

In asynchronous PBT no training thread waits for another member. A member takes a snapshot of its
state at each of its ready steps (host memory, so later training cannot change it) and a
:class:`SnapshotServer` thread sends it to whoever asks: a loser's rank ``j`` writes a request into
the launch's store and receives from rank ``j`` of the donor over the population group (gloo). Each
thread opens its own store client, so it never contends with the training thread's.

Population rank 0 runs a :class:`LineageDrain`: members push their lineage lines into the store and
the drain appends them to ``lineage.jsonl``, so that rank 0's training is never blocked by a file.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_pbt import transfer
from lightning_pbt.lineage import LineageRecord, LineageWriter

__all__ = ["LineageDrain", "Snapshot", "SnapshotServer", "push_count", "push_lineage", "request_snapshot"]

log = logging.getLogger(__name__)

_REFUSED = -1
# Polling the store: quickly right after activity, backing off to _IDLE_POLL when idle (a store's own
# blocking wait with a timeout logs a warning at every timeout).
_BUSY_POLL = 0.002
_IDLE_POLL = 0.05


@dataclass
class Snapshot:
    """One member's training state at one of its ready steps, ready to send."""

    version: int
    packed: transfer.PackedState


def _request_key(namespace: str, server_rank: int, index: int) -> str:
    return f"{namespace}/request/{server_rank}/{index}"


def request_snapshot(store: Any, namespace: str, server_rank: int, my_rank: int, version: int) -> None:
    """Ask ``server_rank`` for its snapshot ``version``; receive it with :func:`transfer.receive_state`."""
    index = store.add(f"{namespace}/requests/{server_rank}", 1) - 1
    store.set(_request_key(namespace, server_rank, index), json.dumps({"peer": my_rank, "version": version}))


class _StoppableThread(threading.Thread):
    """A daemon loop that reports its failure through ``on_failure`` (the population's abort flag)."""

    def __init__(self, name: str, on_failure: Callable[[str], None]) -> None:
        super().__init__(daemon=True, name=name)
        self._stopped = threading.Event()
        self._on_failure = on_failure
        self._idle = 0
        self.error: BaseException | None = None

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        try:
            self.loop()
        except BaseException as error:  # reported: a silent server would leave a loser waiting
            self.error = error
            if not self._stopped.is_set():
                log.error("%s failed: %s", self.name, error, exc_info=True)
                self._on_failure(f"{self.name} failed: {type(error).__name__}: {error}")

    def loop(self) -> None:
        raise NotImplementedError

    def _wait_for(self, store: Any, key: str, wake: threading.Event | None = None) -> bool:
        """Whether ``key`` appeared before the next poll (``wake`` cuts the wait short)."""
        if store.check([key]):
            self._idle = 0
            return True
        delay = min(_IDLE_POLL, _BUSY_POLL * 2**self._idle)
        self._idle = min(self._idle + 1, 8)
        (wake or self._stopped).wait(delay)
        return False


class SnapshotServer(_StoppableThread):
    """Serves this rank's latest snapshot, in request order, while training goes on.

    A request names the snapshot version the loser decided on. A version not taken yet (this rank is a
    moment behind the member rank that published it) is served when it arrives; a replaced one is
    refused, and the loser's member retries with the donor's newer state.
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
        self._lock = threading.Lock()
        self._published = threading.Event()
        self.served = 0

    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
        self._published.set()

    @property
    def snapshot(self) -> Snapshot | None:
        with self._lock:
            return self._snapshot

    def loop(self) -> None:
        pending: list[dict[str, int]] = []
        index = 0
        while not self._stopped.is_set():
            key = _request_key(self.namespace, self.rank, index)
            arrived = self._wait_for(self.store, key, wake=self._published if pending else None)
            if arrived:
                pending.append(json.loads(self.store.get(key)))
                index += 1
            self._published.clear()
            pending = [request for request in pending if not self._serve(request)]

    def _serve(self, request: dict[str, int]) -> bool:
        """Send or refuse ``request``; False while its version is still to come."""
        snapshot = self.snapshot
        if snapshot is None or snapshot.version < request["version"]:
            return False
        if snapshot.version > request["version"]:
            _send(self.population, snapshot.packed, [request["peer"]], _REFUSED)
        else:
            _send(self.population, snapshot.packed, [request["peer"]], 0)
            self.served += 1
        return True


def _send(population: Any, packed: transfer.PackedState, peers: list[int], status: int) -> None:
    transfer.send_state(population, packed, peers, status)


class LineageDrain(_StoppableThread):
    """Population rank 0: appends the lineage lines members push into the store, in push order."""

    def __init__(self, store: Any, namespace: str, writer: LineageWriter, on_failure: Callable[[str], None]) -> None:
        super().__init__("lightning-pbt-lineage", on_failure)
        self.store = store
        self.namespace = namespace
        self.writer = writer
        self.consumed = 0

    def loop(self) -> None:
        while not self._stopped.is_set():
            self.drain(block=True)

    def drain(self, block: bool = False) -> None:
        """Write every push so far (``block``: wait up to one poll interval for the next one)."""
        first = push_key(self.namespace, self.consumed)
        if not (self._wait_for(self.store, first) if block else self.store.check([first])):
            return
        records: list[LineageRecord] = []
        while len(records) < 256 and self.store.check([push_key(self.namespace, self.consumed)]):
            records.extend(_parse_push(self.store.get(push_key(self.namespace, self.consumed))))
            self.consumed += 1
        self.writer.write(records)

    def finish(self, total: int) -> None:
        """Stop the thread, then write the pushes left up to ``total`` (every member has pushed by now)."""
        self.stop()
        while self.consumed < total:
            key = push_key(self.namespace, self.consumed)
            self.store.wait([key])
            self.writer.write(_parse_push(self.store.get(key)))
            self.consumed += 1


def _parse_push(raw: bytes) -> list[LineageRecord]:
    return [LineageRecord.from_dict(line) for line in json.loads(raw)]


def push_count(store: Any, namespace: str) -> int:
    return store.add(f"{namespace}/lineage_count", 0)


def push_key(namespace: str, index: int) -> str:
    return f"{namespace}/lineage/{index}"


def push_lineage(store: Any, namespace: str, records: list[LineageRecord]) -> None:
    """Hand one member's lines of one ready step to population rank 0's drain."""
    index = store.add(f"{namespace}/lineage_count", 1) - 1
    store.set(push_key(namespace, index), json.dumps([record.to_dict() for record in records]))
