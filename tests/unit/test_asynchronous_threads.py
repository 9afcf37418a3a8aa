"""Four asynchronous members' real ready-step protocols (``AsynchronousReadySteps``) on threads over one
in-memory store, with population rank 0's real lineage drain: each trains 0.1 ms steps (a sleep: the
threads must let each other run, as processes do) with a ready step every 4 of them. Copies are refused
(the transfer itself needs a process group), so a loser tries all its attempts and keeps.

- ``wait_for_peers`` at fast natural speeds: the promise is about speed, not about padding; whatever the
  step time, members of equal speed see the population in step (and so carry out lockstep's plan) at
  nearly every ready step. The distributed run through the callback is in tests/distributed/test_asynchronous.py.
- What the protocol leaves behind is bounded: the keys in the store and every history it keeps do not
  grow with the ready steps (the cause of issue 33's memory growth was looked for there).
"""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from lightning_pbt.algorithm.scheduler import PBTScheduler
from lightning_pbt.algorithm.space import LogUniform
from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed import serving, staged_receive
from lightning_pbt.distributed.ready_steps import asynchronous
from lightning_pbt.distributed.ready_steps.asynchronous import AsynchronousReadySteps
from lightning_pbt.distributed.ready_steps.base import HISTORY, Observation, PopulationBook

MEMBERS, READY_STEPS, EVERY, STEP_S = 4, 40, 4, 0.0001


class _Store:
    """The launch's store as the protocol uses it, shared by the members' threads."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def set(self, key: str, value: str) -> None:
        with self.lock:
            self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key: str) -> bytes:
        with self.lock:
            return self.data[key]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        with self.lock:
            return [self.data[key] for key in keys]

    def add(self, key: str, amount: int) -> int:
        with self.lock:
            value = int(self.data.get(key, b"0")) + amount
            self.data[key] = str(value).encode()
            return value

    def delete_key(self, key: str) -> None:
        with self.lock:
            self.data.pop(key, None)

    def check(self, keys: list[str]) -> bool:
        with self.lock:
            return all(key in self.data for key in keys)

    def wait(self, keys: list[str], timeout=None) -> None:
        while not self.check(keys):
            time.sleep(0.0005)


class _Writer:
    def __init__(self) -> None:
        self.lines: list = []

    def write(self, records) -> None:
        self.lines.extend(records)


class _Member:
    device = torch.device("cpu")

    def training_state(self):
        return {"model": {"w": torch.zeros(4)}}

    def apply(self, hyperparameters):
        pass


class _Server:
    def take_snapshot(self, version, flat, device):
        pass


def _member(me: int, store: _Store, burn_in: int) -> AsynchronousReadySteps:
    space = {"lr": LogUniform(1e-3, 1.0)}
    book = PopulationBook(
        population={m: {"hyperparameters": {"lr": 0.01}} for m in range(MEMBERS)}, hyperparameters={"lr": 0.01}
    )
    scheduler = PBTScheduler(space, seed=0, burn_in=burn_in)
    scheduler.use_member_stream(me)
    steps = AsynchronousReadySteps(
        population=SimpleNamespace(store=store, device=torch.device("cpu")),
        topology=PopulationTopology(world_size=MEMBERS, member_size=1, world_rank=me),
        namespace="ns", scheduler=scheduler, book=book, member=_Member(), mode="max", monitor="val", seed=0,
        wait_for_peers=1.0,
    )  # fmt: skip
    steps.server = _Server()
    steps._publish(0, 0, None, version=-1, done=False)  # as start does
    return steps


def _now_and_then_late(read, rng: random.Random, late_s: float = 0.003, probability: float = 0.2):
    """``read``, but one call in five (seeded) starts 3 ms late: a process descheduled on a busy machine,
    for longer than a round of 0.1 ms steps takes."""

    def records():
        if rng.random() < probability:
            time.sleep(late_s)
        return read()

    return records


def run_population(monkeypatch, ready_steps: int = READY_STEPS, burn_in: int = 10**9):
    """Every member's decisions as ``(member, step, in step)``, the store, the members' protocols and the
    lineage lines written. ``burn_in``: before it nobody tries to copy."""
    decisions: list[tuple[int, int, bool]] = []
    decide = asynchronous.decide_alone

    def spy(scheduler, me, step, own, others, **kwargs):
        decision = decide(scheduler, me, step, own, others, **kwargs)
        decisions.append((me, step, decision.in_step))
        return decision

    monkeypatch.setattr(asynchronous, "decide_alone", spy)
    monkeypatch.setattr(asynchronous, "request_snapshot", lambda *args: None)
    monkeypatch.setattr(staged_receive, "receive_staged", lambda *args: None)  # refused: the donor moved on
    store = _Store()
    members = [_member(me, store, burn_in) for me in range(MEMBERS)]
    for steps in members:  # a busy machine: now and then a process is descheduled for a few ms
        steps._records = _now_and_then_late(steps._records, random.Random(steps.me))
    writer = _Writer()
    drain = serving.LineageDrain(store, "ns", writer, on_failure=lambda message: None)
    drain.start()
    errors: list[BaseException] = []

    def train(steps: AsynchronousReadySteps) -> None:
        try:
            steps._interval_started = time.monotonic()
            for ready in range(1, ready_steps + 1):
                for _ in range(EVERY):
                    time.sleep(STEP_S)
                steps.step(Observation(0.5 + 0.01 * steps.me, False, ready * EVERY, 0))
        except BaseException as error:  # reported by the test
            errors.append(error)

    threads = [threading.Thread(target=train, args=(steps,)) for steps in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    drain.finish(store)
    return decisions, store, members, writer.lines


@pytest.mark.timeout(90)
def test_members_of_equal_speed_decide_in_step_at_0_1_ms_steps(monkeypatch):
    """The decisions see every peer at the decider's step (``in_step``), with steps of 0.1 ms and members
    now and then descheduled for 30 of them: the wait outlasts a descheduled peer, nobody counts an equal
    peer as a straggler because one interval of it took longer, and nobody trains past a round before the
    others have finished it. The promise is 80 %; this population makes 100 %, so 90 % is asked (the
    earlier rules made 8-12 %; without the wait for peers to finish a round, 70-84 %)."""
    decisions, *_ = run_population(monkeypatch)
    assert len(decisions) == MEMBERS * READY_STEPS
    in_step = sum(seen for _, _, seen in decisions)
    assert in_step >= 0.9 * len(decisions), f"{in_step} of {len(decisions)} decisions in step"


@pytest.mark.timeout(90)
def test_the_keys_in_the_store_and_every_history_stay_bounded_over_the_ready_steps(monkeypatch):
    """After 50 ready steps of 4 members, every one of them trying to copy at most of them (3 attempts
    each, refused): the store holds the members' records, the counters and, per member, the keys of its
    last ready step only (its decision per attempt and each rank's "fetched"); every pushed lineage line
    was written and its key deleted; every history (the book's scores and their progress, the record the
    others read) holds at most ``HISTORY`` scores."""
    ready_steps = 50
    decisions, store, members, lines = run_population(monkeypatch, ready_steps=ready_steps, burn_in=0)
    attempts = AsynchronousReadySteps.attempts
    assert len(lines) == MEMBERS * ready_steps < len(decisions)  # a refused copy decides again
    assert sum(line.event == "exploit" for line in lines) == 0  # every copy was refused: the attempts ran
    assert any("donor moved on" in " ".join(line.mutations) for line in lines)
    kinds: dict[str, int] = {}
    for key in store.data:
        kind = key.split("/")[1]
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds.pop("member") == MEMBERS
    assert kinds.pop("plan") <= MEMBERS * attempts and kinds.pop("fetched", 0) <= MEMBERS * attempts
    assert set(kinds) <= {"lineage_count", "lineage_written"}, kinds  # no lineage line, no request left
    for steps in members:
        own = steps.book.population[steps.me]
        record = steps._records()[steps.me]
        lengths = {len(own["history"]), len(own["history_steps"]), len(record["history"])}
        assert lengths == {HISTORY}, lengths
