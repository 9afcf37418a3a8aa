"""Population-level communication: the collectives PBT needs across members, and the abort signal.

Inside Lightning every member is its own ``torch.distributed`` world (see ``strategy.py``), so the
population needs a second, explicitly named group. It is a raw c10d backend over every rank of
every member, built on a prefixed view of the launch's store; nothing in Lightning or in user code
can reach it by accident through the default group.

The store also carries an abort flag: a rank that fails sets it, and a watchdog thread on every
other rank ends that rank at once instead of leaving it blocked in a collective until the timeout.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "ESTABLISHED",
    "PopulationAborted",
    "PopulationGroup",
    "PopulationWatchdog",
    "barrier_device_ids",
    "start_watchdog",
    "stop_watchdog",
    "wire_bytes",
]

log = logging.getLogger(__name__)

# The population of this process, once created. torch.distributed can be initialised only once per
# process, so later strategies (a new Trainer for `test`, a second `fit`, either Lightning flavour)
# adopt it; hence it lives here, in a module both flavours share.
ESTABLISHED: dict[str, Any] = {}

_ABORT_KEY = "abort"
_ABORT_EXIT_CODE = 3
_LENGTH_BYTES = 8
_INITIAL_JSON_CAPACITY = 16 << 10


class PopulationAborted(RuntimeError):
    """Another rank of the population failed; this rank stops too."""


class PopulationGroup:
    """Collectives over the whole population (every rank of every member), named explicitly.

    Ranks here are world ranks: member ``m``'s rank ``j`` is ``m * member_size + j``.

    Args:
        backend: the process group over every rank of the launch.
        rank: this rank's world rank.
        size: the world size.
        device: where collectives' tensors live (the rank's GPU with NCCL, the CPU with gloo).
        store: the launch's store (abort flag, asynchronous publications).
        backend_name: ``"nccl"`` or ``"gloo"``.
        connect_store: opens a new client of the same store, for threads that need their own.
    """

    def __init__(
        self,
        backend: dist.Backend,
        rank: int,
        size: int,
        device: torch.device,
        store: dist.Store,
        backend_name: str,
        connect_store: Callable[[], dist.Store] | None = None,
    ) -> None:
        self.backend = backend
        self.rank = rank
        self.size = size
        self.device = device
        self.store = store
        self.backend_name = backend_name
        self._json_capacity = _INITIAL_JSON_CAPACITY
        self._connect_store = connect_store
        self._timeout: timedelta | None = None
        self._host: PopulationGroup | None = None
        # Every backend is told its rank's device now, on every rank at the same point. NCCL then builds the
        # group's communicator at once and runs point-to-point transfers on it (ProcessGroupNCCL::pointToPoint
        # in eager mode); left lazy, it would open a 2-rank communicator, with its own stream and buffers,
        # for every pair of ranks that ever exchange state, inside a ready step. Gloo has nothing to do.
        backend.eager_connect_single_device(device)

    @classmethod
    def create(
        cls,
        store: dist.Store,
        rank: int,
        size: int,
        backend_name: str,
        device: torch.device,
        timeout: timedelta,
        connect_store: Callable[[], dist.Store] | None = None,
    ) -> PopulationGroup:
        prefixed = dist.PrefixStore("population/", store)
        if backend_name == "gloo":
            backend = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
        elif backend_name == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout  # Backend.Options' only timeout field (pinned in tests/unit/test_transport.py)
            backend = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        else:
            raise ValueError(f"PopulationStrategy supports the 'gloo' and 'nccl' backends, not {backend_name!r}")
        group = cls(backend, rank, size, device, store, backend_name, connect_store)
        group._timeout = timeout
        return group

    def host_group(self) -> PopulationGroup:
        """The group the asynchronous mode serves snapshots over: always a second gloo group in host memory,
        created on first use (every rank must ask at the same point), whatever this group's backend.

        One path on every backend: CPU CI runs exactly what an NCCL population runs. Only the gloo
        backend's own rendezvous is prefixed (``host/``); requests, lineage pushes, stop messages and the
        abort flag share this group's key space, which the background threads' clients
        (:meth:`new_store_client`) and the watchdog read. A separate group also keeps the server thread's
        sends apart from the training thread's population collectives.
        """
        if self._host is None:
            if self._timeout is None:
                raise RuntimeError("create the population group with PopulationGroup.create to get its host group")
            backend = dist.ProcessGroupGloo(dist.PrefixStore("host/", self.store), self.rank, self.size, self._timeout)
            host = PopulationGroup(
                backend, self.rank, self.size, torch.device("cpu"), self.store, "gloo", self._connect_store
            )
            host._timeout = self._timeout
            self._host = host
        return self._host

    def shutdown(self) -> None:
        """Shut down every backend this group created (its host group first); best effort, at exit."""
        groups = [group for group in (self._host, self) if group is not None]
        self._host = None
        for group in groups:
            try:
                group.backend.shutdown()
            except Exception:  # already gone, or a stand-in without shutdown
                log.debug("could not shut down a population backend", exc_info=True)

    def new_store_client(self) -> dist.Store:
        """A separate connection to the same store, for a background thread (a client is not shared
        between threads, so that one thread's blocking wait never holds up another's requests)."""
        if self._connect_store is None:
            raise RuntimeError("this population group has no way to open another store client")
        return self._connect_store()

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` stacked along a new first dimension (index = world rank)."""
        tensor = tensor.to(self.device).contiguous()
        outputs = [torch.empty_like(tensor) for _ in range(self.size)]
        self.backend.allgather([outputs], [tensor]).wait()
        return torch.stack(outputs)

    def broadcast(self, tensor: Tensor, root: int) -> None:
        """In place: every rank's ``tensor`` becomes ``root``'s."""
        options = dist.BroadcastOptions()
        options.rootRank = root
        self.backend.broadcast([tensor], options).wait()

    def broadcast_json(self, obj: object, root: int = 0) -> object:
        """``root``'s JSON-able object on every rank, as bytes in tensors (never pickled).

        Usually one collective: the payload travels with its length in a buffer whose capacity every
        rank knows; only a payload larger than that takes a second broadcast. The capacity then grows
        the same way on every rank (it depends only on the broadcast length).
        """
        payload = json.dumps(obj, sort_keys=True).encode() if self.rank == root else b""
        capacity = self._json_capacity
        buffer = torch.zeros(capacity, dtype=torch.uint8, device=self.device)
        if self.rank == root:
            head = len(payload).to_bytes(_LENGTH_BYTES, "little") + payload[: capacity - _LENGTH_BYTES]
            buffer[: len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
        self.broadcast(buffer, root)
        received = bytes(buffer.cpu().numpy())
        length = int.from_bytes(received[:_LENGTH_BYTES], "little")
        data = received[_LENGTH_BYTES : _LENGTH_BYTES + length]
        if length > capacity - _LENGTH_BYTES:
            rest = torch.empty(length - len(data), dtype=torch.uint8, device=self.device)
            if self.rank == root:
                rest.copy_(torch.frombuffer(bytearray(payload[len(data) :]), dtype=torch.uint8))
            self.broadcast(rest, root)
            data += bytes(rest.cpu().numpy())
        while self._json_capacity < 2 * (length + _LENGTH_BYTES):
            self._json_capacity *= 2
        return json.loads(data.decode())

    def all_gather_json(self, obj: object) -> list[object]:
        """Every rank's JSON-able object, in world-rank order, on every rank (never pickled).

        Two collectives on every rank whatever the payloads: the lengths, then the payloads padded to
        the longest.
        """
        payload = json.dumps(obj, sort_keys=True).encode()
        lengths = self.all_gather(torch.tensor([len(payload)], dtype=torch.int64, device=self.device)).cpu()
        longest = int(lengths.max())
        buffer = torch.zeros(max(longest, 1), dtype=torch.uint8, device=self.device)
        if payload:
            buffer[: len(payload)].copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        gathered = self.all_gather(buffer).cpu().numpy()
        return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(gathered, lengths[:, 0], strict=True)]

    def barrier(self) -> None:
        options = dist.BarrierOptions()
        options.device_ids = barrier_device_ids(self.device)
        self.backend.barrier(options).wait()

    def wait_for_everyone(
        self, key: str, poll_seconds: float = 0.1, barrier: bool = True, meanwhile: Callable[[], None] | None = None
    ) -> None:
        """Block until every rank has called this with ``key``, with no time limit.

        Members may finish far apart (early stopping, ``max_time``); a collective would time out, the
        store does not. A rank that failed meanwhile is reported instead of waited for. ``meanwhile`` runs
        between looks (a stopped member serving the others' ready steps). Looks start 1 ms apart and back
        off to ``poll_seconds``: ranks that finish together (lockstep) leave within a millisecond or two of
        the last one instead of up to a whole ``poll_seconds`` later, at the end of every fit.
        """
        self.store.add(key, 1)
        pause = min(0.001, poll_seconds)
        while self.store.add(key, 0) < self.size:
            self.raise_if_aborted()
            if meanwhile is not None:
                meanwhile()
            time.sleep(pause)
            pause = min(2 * pause, poll_seconds)
        if barrier:
            self.barrier()

    def raise_if_aborted(self) -> None:
        reason = self.abort_reason()
        if reason is not None:
            raise PopulationAborted(abort_line(reason))

    def exchange(
        self,
        sends: Sequence[tuple[int, Sequence[Tensor]]],
        recvs: Sequence[tuple[int, Sequence[Tensor]]],
        first_tag: int = 0,
    ) -> None:
        """Issue every point-to-point transfer of one round together, then wait for all of them.

        ``sends`` and ``recvs`` are ``(peer world rank, tensors)``; the i-th tensor sent to a peer lands
        in the i-th tensor that peer receives from this rank, tagged ``first_tag + i``. Plain
        ``send``/``recv`` on both backends: gloo pairs messages by tag, NCCL by order per pair, and the
        tags follow the order, so both agree (a receiver that takes one send in two rounds passes the
        tag the second round starts at). No coalescing block: its semantics differ between backends.

        Every message travels as a byte view of its tensor (:func:`wire_bytes`), so the backend's dtype
        support never matters (NCCL refuses complex, int16 and unsigned wider than 8 bits).
        """
        works = [
            self.backend.send([wire_bytes(t)], peer, first_tag + i)
            for peer, tensors in sends
            for i, t in enumerate(tensors)
        ]
        works += [
            self.backend.recv([wire_bytes(t)], peer, first_tag + i)
            for peer, tensors in recvs
            for i, t in enumerate(tensors)
        ]
        for work in works:
            work.wait()

    # -- abort signalling ------------------------------------------------------------------------
    def signal_abort(self, reason: str) -> None:
        """Tell every other rank to stop now; best effort, never raises."""
        try:
            # The first failure is kept (the root cause; the console prints its error once, see console.py).
            self.store.compare_set(_ABORT_KEY, "", json.dumps({"rank": self.rank, "reason": reason[:2000]}))
        except Exception:  # the store may already be gone; the launcher then ends the others
            log.debug("could not set the abort flag", exc_info=True)

    def abort_reason(self) -> str | None:
        try:
            if self.store.check([_ABORT_KEY]):
                return self.store.get(_ABORT_KEY).decode()
        except Exception:
            return None
        return None


class PopulationWatchdog(threading.Thread):
    """Ends this rank when another rank signals an abort or the launch's store disappears.

    Without it, a rank blocked in a population collective would wait for the whole collective
    timeout after a peer died. It polls a separate store client, so it never contends with the
    training thread's store traffic.

    Args:
        store: a store client of its own.
        rank: this rank's world rank, for messages.
        interval: seconds between polls.
        misses_allowed: consecutive failed polls (a vanished store) before this rank ends.
    """

    def __init__(self, store: dist.Store, rank: int, interval: float = 0.5, misses_allowed: int = 6) -> None:
        super().__init__(daemon=True, name="lightning-pbt-watchdog")
        self._store = store
        self._rank = rank
        self._interval = interval
        self._misses_allowed = misses_allowed
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        misses = 0
        while not self._stopped.wait(self._interval):
            try:
                if self._store.check([_ABORT_KEY]):
                    reason = self._store.get(_ABORT_KEY).decode()
                    self._die(abort_line(reason))
                misses = 0
            except Exception as error:  # the store lives in rank 0 or the torchrun agent
                misses += 1
                if misses >= self._misses_allowed and not self._stopped.is_set():
                    self._die(f"lost contact with the launch's rendezvous store ({error}); a peer died")

    def _die(self, message: str) -> None:
        if self._stopped.is_set():
            return
        print(f"[lightning_pbt rank {self._rank}] stopped: {message}", flush=True)
        time.sleep(0.2)
        os._exit(_ABORT_EXIT_CODE)


def abort_line(flag: str) -> str:
    """The one line a rank prints when another rank's abort flag stops it.

    The watchdog and the training thread race to see the flag; both use this, so the user reads the
    same words whichever wins.
    """
    return _short(f"another rank of the population failed: {flag}")


def _short(message: str) -> str:
    """A watchdog's one line: who failed, not the failure again (the failing rank prints its error).

    Examples:
        >>> _short('another rank failed: {"rank": 2, "reason": "member 2 (world rank 2) raised E: x"}')
        'member 2 (world rank 2) failed; its error is printed there'
    """
    _, _, raw = message.partition(": ")
    try:
        reason = str(json.loads(raw).get("reason", ""))
    except (ValueError, AttributeError):
        return message
    who, raised, _ = reason.partition(" raised ")
    return f"{who} failed; its error is printed there" if raised else reason.splitlines()[0] if reason else message


def start_watchdog(prefix: str, world_rank: int, timeout: timedelta) -> PopulationWatchdog | None:
    """A started :class:`PopulationWatchdog` on a store client of its own (``MASTER_ADDR``/``MASTER_PORT``),
    or ``None`` when no client can connect: the watchdog is a speed-up for failures, never a requirement.

    Args:
        prefix: the run's store prefix (where the abort flag is).
        world_rank: this rank's world rank, for messages.
        timeout: the store client's timeout.
    """
    try:
        client = open_store_client(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout)
    except Exception:
        log.debug("no watchdog store client", exc_info=True)
        return None
    watchdog = PopulationWatchdog(dist.PrefixStore(prefix, client), world_rank)
    watchdog.start()
    return watchdog


def stop_watchdog(watchdog: PopulationWatchdog | None) -> None:
    """Stop ``watchdog`` and join it, so that no thread is inside a store call when the process exits.

    Args:
        watchdog: the watchdog (``None``: nothing to do).
    """
    if watchdog is not None:
        watchdog.stop()
        watchdog.join(timeout=5)


def barrier_device_ids(device: torch.device) -> list[int]:
    """The devices a population barrier names: its rank's GPU, or none for a host backend.

    NCCL runs a barrier as an all-reduce on a device; told none, it takes the device of the group's earlier
    collectives, or guesses (device 0 on every rank, if the barrier came first). Gloo needs none.

    Args:
        device: the population's device (``PopulationGroup.device``).

    Examples:
        >>> barrier_device_ids(torch.device("cuda", 3)), barrier_device_ids(torch.device("cpu"))
        ([3], [])
    """
    if device.type == "cpu":
        return []
    if device.index is None:
        raise ValueError(f"lightning_pbt: the population's device must name its index, got {device}")
    return [device.index]


def wire_bytes(tensor: Tensor) -> Tensor:
    """``tensor``'s memory as a flat uint8 view (no copy): what a transfer message sends or receives into.

    Bytes travel on every backend, so NCCL's dtype table (no complex, int16, uint16/32/64) never applies.

    Args:
        tensor: a contiguous tensor of any dtype.

    Raises:
        ValueError: ``tensor`` is not contiguous.
    """
    if not tensor.is_contiguous():
        raise ValueError("lightning_pbt: a transfer message must be contiguous to travel as bytes")
    flat = tensor.detach().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def open_store_client(host: str, port: int, timeout: timedelta) -> dist.Store:
    """A fresh client connection to the launch's TCP store (for the watchdog thread)."""
    return dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
