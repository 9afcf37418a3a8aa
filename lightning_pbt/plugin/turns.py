"""Members that take turns: K members in one process, each an ordinary ``Trainer.fit`` in its own lane.

``PopulationStrategy(members_per_process=K)`` runs K *lanes* per process. Lane ``k`` is a
``Trainer._fit_impl`` of its own deep copies of the Trainer, the LightningModule and the data
arguments, taken in the launcher before ``fit`` attached anything, so that every piece of Lightning
state (loops, counters, budgets, callbacks, loggers, data iterators, precision plugin) belongs to one
member. Lane 0 runs on the main thread (Lightning installs signal handlers only there), lanes 1..K-1
on threads. A baton (:class:`MemberTurns`) lets exactly one lane run at a time; it changes hands at
ready steps, when a member stops, and when a lane's fit ends, always in lane order, so that every
process (and every rank of a member) runs the same lane at the same point and collectives stay matched.

What is process-wide rather than per object (the RNGs, the seed variables ``seed_everything`` sets) is
saved when a lane parks and restored when it resumes (:class:`ProcessState`). See
``docs/concepts/turns.md`` for the design and its reasons.
"""

from __future__ import annotations

import copy
import functools
import gc
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_pbt.plugin.console import mark_failed_lane
from lightning_pbt.plugin.parking import park_member

__all__ = [
    "LaneFailed",
    "MemberLane",
    "MemberTurns",
    "ProcessState",
    "lane_copies",
    "random_state",
    "run_member_lanes",
    "set_random_state",
]

log = logging.getLogger(__name__)

# Environment variables seed_everything writes and Lightning reads back (worker seeding, reset_seed).
SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


class LaneFailed(RuntimeError):
    """Another member of this process failed; this one stops too."""


@dataclass
class ProcessState:
    """The process-wide state one member owns while it trains: every RNG and the seed variables."""

    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor] | None
    numpy: Any
    python: Any
    environment: dict[str, str | None]

    @classmethod
    def capture(cls) -> ProcessState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(
            torch_cpu=torch.get_rng_state(),
            cuda=cuda,
            numpy=_numpy_random().get_state() if _numpy_random() is not None else None,
            python=random.getstate(),
            environment={name: os.environ.get(name) for name in SEED_VARIABLES},
        )

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        numpy_random = _numpy_random()
        if numpy_random is not None and self.numpy is not None:
            numpy_random.set_state(self.numpy)
        random.setstate(self.python)
        for name, value in self.environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def random_state() -> dict[str, Any]:
    """The process's RNG states as plain data (lists, ints, tensors), loadable with ``weights_only=True``:
    what a checkpoint keeps so that a resumed member draws the dropout masks it would have drawn."""
    state = ProcessState.capture()
    numpy = None
    if state.numpy is not None:
        kind, keys, position, has_gauss, cached = state.numpy
        numpy = [kind, [int(key) for key in keys], int(position), int(has_gauss), float(cached)]
    version, internal, gauss = state.python
    return {"torch": state.torch_cpu, "cuda": state.cuda, "numpy": numpy, "python": [version, list(internal), gauss]}


def set_random_state(saved: dict[str, Any]) -> None:
    """Restore what :func:`random_state` returned (CUDA states only where this process has the same GPUs)."""
    torch.set_rng_state(saved["torch"])
    cuda = saved.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    numpy_random = _numpy_random()
    if numpy_random is not None and saved.get("numpy") is not None:
        import numpy

        kind, keys, position, has_gauss, cached = saved["numpy"]
        numpy_random.set_state((kind, numpy.asarray(keys, dtype=numpy.uint32), position, has_gauss, cached))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))


def _numpy_random() -> Any:
    try:
        import numpy
    except ImportError:  # numpy is optional for torch; then there is no numpy RNG to swap
        return None
    return numpy.random


class MemberTurns:
    """The baton of one process's K lanes, and where they meet at ready steps.

    Between ready steps the lanes train one after the other in lane order. At a ready step a lane
    parks (:meth:`ready_step`); the last one to arrive runs the population's ready step for all of
    them (``SynchronousReadySteps.population_step``: one all-gather with K rows) and the lanes resume
    in lane order. A lane that stops (:meth:`finish`) leaves the rotation; its member still takes part
    as a stopped row. When every lane of the process has stopped, the last one serves the population
    until every process has stopped; then the lanes end their fits one by one, in lane order.

    A member that waits at a ready step for the others of its process is parked: ``park(protocol)``
    puts its tensors where they wait (:mod:`lightning_pbt.plugin.parking`) and returns what puts them
    back when it resumes.

    Args:
        lanes: K, the members this process hosts.
        park: parks a lane's member and returns its unpark (``None``: nothing is parked).
    """

    def __init__(self, lanes: int, park: Callable[[Any], Callable[[], None]] | None = None) -> None:
        self.lanes = lanes
        self._park = park
        self._cond = threading.Condition()
        self._holder = 0  # lane 0 starts
        self._parked: dict[int, ProcessState] = {}
        self._arrived: dict[int, tuple[Any, Any]] = {}  # lane -> (protocol, observation) at this ready step
        self._stopped: dict[int, Any] = {}  # lane -> its protocol, once its training ended
        self._results: dict[int, Any] = {}
        self._left: set[int] = set()  # lanes whose fit returned
        self._everyone_stopped = False
        self._failure: BaseException | None = None
        self._handed_at: float | None = None
        # Per lane, the checkpoint its fit resumes from, (path, weights_only); lane 0 agrees on them for all
        # (PopulationStrategy._agree_on_resume) and leaves each lane the older checkpoint it must load instead.
        self.checkpoints: dict[int, tuple[str | None, bool | None]] = {}
        self.resume_overrides: list[str | None] = [None] * lanes
        self.switches = 0  # hand-overs from one lane to another, and the seconds they took (wake-up included)
        self.switch_seconds = 0.0
        # Facts the lanes pool so that the process speaks once for all of its members (the callback's weight
        # digests at fit start, its results at the end); each lane writes in its own turn.
        self.pooled: dict[str, Any] = {}

    # -- the baton (callers hold self._cond) -----------------------------------------------------
    def _hand_over(self, lane: int, to: int) -> None:
        if to == lane:
            return
        self._handed_at = time.perf_counter()
        self._parked[lane] = ProcessState.capture()
        self._holder = to
        self._cond.notify_all()

    def _await_turn(self, lane: int, ready: Callable[[], bool] = lambda: True) -> None:
        while not (self._holder == lane and ready()):
            if self._failure is not None:
                raise LaneFailed(f"another member of this process failed: {self._failure!r}") from None
            self._cond.wait()
        state = self._parked.pop(lane, None)
        if state is not None:
            state.restore()
        if self._handed_at is not None:
            self.switches += 1
            self.switch_seconds += time.perf_counter() - self._handed_at
            self._handed_at = None

    def _running(self) -> list[int]:
        return [lane for lane in range(self.lanes) if lane not in self._stopped]

    def _next_to_arrive(self) -> int:
        return min(lane for lane in self._running() if lane not in self._arrived)

    def _all_arrived(self) -> bool:
        running = self._running()
        return bool(running) and all(lane in self._arrived for lane in running)

    # -- a lane's life ---------------------------------------------------------------------------
    def run(self, lane: int, fit: Callable[[], Any]) -> Any:
        """Run ``fit`` as lane ``lane`` when its turn comes; hand the baton on when it returns."""
        with self._cond:
            self._await_turn(lane)
        try:
            return fit()
        except BaseException as error:
            with self._cond:
                if self._failure is None and not isinstance(error, LaneFailed):
                    mark_failed_lane(error, lane)  # re-raised on the main thread: the label names this member
                    self._failure = error
                self._cond.notify_all()
            raise
        finally:
            with self._cond:
                self._left.add(lane)
                waiting = [other for other in range(self.lanes) if other not in self._left]
                if waiting and self._holder == lane:
                    self._hand_over(lane, min(waiting))
                self._cond.notify_all()

    def resume_override(self, lane: int, agree: Callable[[list[tuple[str | None, bool | None]]], list[Any]]) -> Any:
        """The checkpoint lane ``lane`` loads instead of the one it was given (``None``: its own). Lane 0,
        whose fit starts first, runs ``agree`` once for the K lanes (a crash can fall between two members
        of one process); the checkpoints of all lanes were resolved before any fit started."""
        if lane == 0:
            self.resume_overrides = agree([self.checkpoints[k] for k in range(self.lanes)])
        return self.resume_overrides[lane]

    def failure(self) -> BaseException | None:
        return self._failure

    def ready_step(self, protocol: Any, observation: Any) -> Any:
        """Park this member until every member of the process has arrived; the last one runs the ready step."""
        lane = protocol.topology.lane
        with self._cond:
            self._arrived[lane] = (protocol, observation)
            last = self._all_arrived()
            if not last:
                unpark = self._hand_over_parked(protocol, self._next_to_arrive())
        if last:
            unpark = self._meet(lane, protocol)
        with self._cond:
            self._await_turn(lane, lambda: lane in self._results)
            if unpark is not None:
                unpark()
            return self._results.pop(lane)

    def _hand_over_parked(self, protocol: Any, to: int) -> Callable[[], None] | None:
        """Hand the baton to lane ``to``; a member that waits meanwhile is parked first (returns its unpark)."""
        lane = protocol.topology.lane
        unpark = self._park(protocol) if self._park is not None and to != lane else None
        self._hand_over(lane, to)
        return unpark

    def _meet(self, lane: int, protocol: Any = None) -> Callable[[], None] | None:
        """Lane ``lane`` holds the baton and every running lane has arrived: the process's ready step. The
        baton goes to the lowest running lane; ``protocol``'s member (this lane's, if still training) is
        parked when that is another lane (returns its unpark)."""
        with self._cond:
            arrived, self._arrived = self._arrived, {}
            members = [arrived.get(k) for k in range(self.lanes)]
            for k, stopped in self._stopped.items():
                members[k] = (stopped, stopped.stopped_observation())
        present = [member for member in members if member is not None]
        results = present[0][0].population_step(present)
        with self._cond:
            for member_protocol, _ in present:
                if member_protocol.topology.lane in arrived:
                    self._results[member_protocol.topology.lane] = results[member_protocol.me]
            running = self._running()
            if running and protocol is not None:
                return self._hand_over_parked(protocol, min(running))
            if running:
                self._hand_over(lane, min(running))
            return None

    def finish(self, protocol: Any) -> None:
        """This member stopped training: out of the rotation, a stopped row at every later ready step;
        returns when every member of the population has stopped and it is this lane's turn to end."""
        lane = protocol.topology.lane
        with self._cond:
            self._stopped[lane] = protocol
            self._arrived.pop(lane, None)
            running = self._running()
            meet = self._all_arrived()
            if running and not meet:
                self._hand_over(lane, self._next_to_arrive())
        if meet:  # the others of the process wait at a ready step for this member alone
            self._meet(lane)
        elif not running:  # the last of the process: serve the others' ready steps, as a stopped member does
            stopped = [self._stopped[k] for k in sorted(self._stopped)]
            protocol.serve_until_everyone_stopped(stopped)
            with self._cond:
                self._everyone_stopped = True
                self._hand_over(lane, min(k for k in range(self.lanes) if k not in self._left))
        with self._cond:
            self._await_turn(lane, lambda: self._everyone_stopped)


@dataclass(frozen=True)
class MemberLane:
    """Which lane of its process a strategy's Trainer is, and the process's baton (``None``: one member per
    process). Set by :func:`run_member_lanes` before fit."""

    index: int = 0
    turns: MemberTurns | None = None


def _shared_datasets() -> list[Any]:
    """Every dataset of the process: lanes read the same data (copies would multiply its memory)."""
    return [obj for obj in gc.get_objects() if issubclass(type(obj), Dataset)]


def lane_copies(objects: Any, count: int, shared: Iterable[Any] = ()) -> list[Any]:
    """``count`` deep copies of ``objects``, each in one ``deepcopy`` (references between the objects
    stay consistent inside a copy); datasets and ``shared`` are the same objects in every copy."""
    keep = [*shared, *_shared_datasets()]
    copies = []
    for _ in range(count):
        memo: dict[int, Any] = {id(obj): obj for obj in keep}
        copies.append(copy.deepcopy(objects, memo))
    return copies


def run_member_lanes(
    function: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    prepare: Callable[[Callable[..., Any], Sequence[Any], dict[str, Any]], tuple[Sequence[Any], dict[str, Any]]],
) -> Any:
    """Run Lightning's ``trainer._fit_impl(*args, **kwargs)`` as K lanes (``members_per_process``).

    Called by the strategy's launcher wrapper in every process, before ``fit`` attached anything.
    ``prepare(bound_fit, args, kwargs)`` does what every process does before fit (output folders, the
    checkpoint to resume from) for one lane and returns its arguments.

    Raises:
        ValueError: ``function`` is not ``fit`` (only fit takes turns).
    """
    trainer = function.__self__  # type: ignore[attr-defined]
    strategy = trainer.strategy
    lanes = strategy.members_per_process
    name = getattr(function, "__name__", "")
    if name != "_fit_impl":
        raise ValueError(
            f"PopulationStrategy(members_per_process={lanes}) supports Trainer.fit only; "
            f"{name.strip('_').split('_')[0]} with several members per process is not built"
        )
    copies = lane_copies((trainer, tuple(args), dict(kwargs)), lanes - 1, shared=[strategy._launcher])
    turns = MemberTurns(lanes, park=functools.partial(park_member, keep_on_device=strategy.keep_parked_on_device))
    fits: list[Callable[[], Any]] = []
    trainers = []
    for lane, (lane_trainer, lane_args, lane_kwargs) in enumerate([(trainer, args, kwargs), *copies]):
        lane_trainer.strategy.lane = MemberLane(lane, turns)
        bound = getattr(lane_trainer, name)
        lane_args, lane_kwargs = prepare(bound, lane_args, lane_kwargs)
        fits.append(functools.partial(bound, *lane_args, **lane_kwargs))
        trainers.append(lane_trainer)

    def lane_main(lane: int) -> None:
        try:
            turns.run(lane, fits[lane])
        except LaneFailed:
            pass
        except BaseException as error:  # Lightning's own handling runs for lane 0 (main thread) only
            trainers[lane].strategy.on_exception(error)
            log.debug("member lane %d failed", lane, exc_info=True)

    threads = [
        threading.Thread(target=lane_main, args=(lane,), name=f"lightning_pbt-lane-{lane}", daemon=True)
        for lane in range(1, lanes)
    ]
    for thread in threads:
        thread.start()
    result = None
    try:
        result = turns.run(0, fits[0])
    except LaneFailed:
        pass  # the failing lane's own error is raised below
    finally:
        for thread in threads:
            thread.join()
    failure = turns.failure()
    if failure is not None:
        raise failure
    return result
