"""Two asynchronous members on real gloo threads, each its own ``AsynchronousReadySteps`` with its snapshot
server, store records, decisions and lineage drain (no Lightning, no processes): what a copy takes over
from the donor's snapshot, and what a decision that waits for its peers compares.

The members hold real training state (a 1.2 MB weight with its Adam moments) and differ in it, so a test
can tell a copied state from a kept one; they are in different states (a donor ahead in training, score
histories of different lengths).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_pbt.algorithm.lineage import read_lineage
from lightning_pbt.algorithm.scheduler import PBTScheduler
from lightning_pbt.algorithm.space import LogUniform
from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed.collectives import PopulationGroup
from lightning_pbt.distributed.optimizer_layout import optimizer_layout
from lightning_pbt.distributed.ready_steps.asynchronous import AsynchronousReadySteps
from lightning_pbt.distributed.ready_steps.base import Observation, PopulationBook
from tests.unit.test_transport import digest, member, run_ranks, state_of

NAMESPACE = "pbt/0"
LOSER, DONOR = 0, 1


class TrainingMember:
    """The ``LocalMember`` the protocol sees: a model and its optimizer, as the callback hands them over."""

    device = torch.device("cpu")

    def __init__(self, seed: int) -> None:
        self.model, self.optimizer = member(seed)
        self.inputs = torch.randn(8, 300, generator=torch.Generator().manual_seed(seed))

    def training_state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizers": [self.optimizer.state_dict()]}

    def load_training_state(self, state: Mapping[str, Any], model_in_place: bool) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizers"][0])

    def apply(self, hyperparameters: Mapping[str, Any]) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = hyperparameters["lr"]

    def rejuvenate(self, seed: int) -> None:
        raise AssertionError("nobody is rejuvenated here")

    def train(self) -> None:
        """One optimizer step: the state moves on."""
        self.model(self.inputs).pow(2).sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def digest(self) -> list[bytes]:
        """Every tensor's bytes: weights and optimizer moments (the hyperparameters are explored after a copy)."""
        return digest(state_of(self.model, self.optimizer))[1:]


def status(lr: float, history: list[float], steps: list[int]) -> dict[str, Any]:
    """A member's entry in the book after the ready steps at ``steps`` scored ``history``."""
    return {
        "hyperparameters": {"lr": lr},
        "score": history[-1] if history else None,
        "history": list(history),
        "history_steps": list(steps),
        "parent": None,
        "done": False,
    }


def protocol(
    group: PopulationGroup, training: TrainingMember, book: PopulationBook, **options: Any
) -> AsynchronousReadySteps:
    topology = PopulationTopology(world_size=group.size, world_rank=group.rank)
    scheduler = PBTScheduler({"lr": LogUniform(1e-3, 0.1)}, quantile_fraction=0.5, seed=3)
    scheduler.use_member_stream(topology.member_id)  # as the callback does for synchronous=False
    return AsynchronousReadySteps(
        population=group, topology=topology, namespace=NAMESPACE, scheduler=scheduler, book=book,
        member=training, mode="max", monitor="val_acc", seed=3, **options,
    )  # fmt: skip


def start(steps: AsynchronousReadySteps, lineage: Path, step: int) -> None:
    steps.start(
        str(lineage),
        restored=False,
        layout=optimizer_layout([steps.member.optimizer]),
        step=step,
        epoch=0,
        start_values={},
        init_extra={},
    )


def ready_lines(lineage: Path, member_id: int) -> dict[int, Any]:
    return {r.step: r for r in read_lineage(str(lineage)) if r.member == member_id and r.event != "init"}


# -- a copy takes the donor snapshot's progress and score history ---------------------------------------
DONOR_HISTORY = [0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80]  # its ready steps 4..28; it scores 0.9 at 32
DONOR_STEPS = [4, 8, 12, 16, 20, 24, 28]


def test_a_copy_takes_the_donor_snapshots_progress_and_score_history(tmp_path):
    """The donor is 20 steps ahead (its snapshot of step 32) and has 8 scores; the loser, at its step 12,
    has 3. After the copy the loser holds the donor's weights, and with them the donor's training: its
    progress is the snapshot's (32 at its own step 12, so 36 four steps later) and its score history is the
    donor's (stamped with the donor's progress). Its next record, which the others rank, says so, and its
    next decision compares everyone at that progress."""
    lineage = tmp_path / "lineage.jsonl"
    members = {LOSER: TrainingMember(0), DONOR: TrainingMember(1)}
    assert members[LOSER].digest() != members[DONOR].digest()

    def body(group: PopulationGroup) -> object:
        me = group.rank
        population = {
            LOSER: status(0.01, [0.10, 0.12], [4, 8]),
            DONOR: status(0.05, DONOR_HISTORY, DONOR_STEPS),
        }
        last = {LOSER: 8, DONOR: 28}[me]
        book = PopulationBook(
            population=population, hyperparameters=dict(population[me]["hyperparameters"]), last_ready_step=last
        )
        steps = protocol(group, members[me], book)
        store = group.store
        try:
            start(steps, lineage, last)
            if me == DONOR:
                snapshot = members[DONOR].digest()
                result = steps.step(Observation(0.9, False, 32, 3))
                store.set("donor scored", "1")
                store.wait(["loser done"])
                steps.finish()
                return result.plan.event, snapshot
            store.wait(["donor scored"])
            copied = steps.step(Observation(0.1, False, 12, 1))
            own = dict(book.population[LOSER])
            held = members[LOSER].digest()
            members[LOSER].train()  # four more steps of training, one optimizer step is enough to tell
            kept = steps.step(Observation(0.95, False, 16, 1))
            record = dict(steps._record)
            store.set("loser done", "1")
            steps.finish()
            return copied.plan, own, held, kept.plan, record
        finally:
            steps.close()

    (copied, own, held, kept, record), (donor_event, snapshot) = run_ranks(2, "gloo", body)
    assert donor_event == "keep"
    assert (copied.event, copied.parent) == ("exploit", DONOR) and held == snapshot
    # Right after the copy: the donor's history, at the donor's progress; 20 steps ahead of its own step.
    assert own["history"] == [*DONOR_HISTORY, 0.9] and own["history_steps"] == [*DONOR_STEPS, 32]
    assert own["progress_offset"] == 32 - 12
    # Four steps later it scores 0.95 (the best): its record carries that history on, at progress 36 ...
    assert kept.event == "keep"
    assert (record["step"], record["progress"], record["ready_progress"]) == (16, 36, 36)
    assert record["history"] == [*DONOR_HISTORY, 0.9, 0.95] and record["history_steps"] == [*DONOR_STEPS, 32, 36]
    # ... and its decision compared itself at 36 and the donor at its latest score not beyond that (32).
    lines = ready_lines(lineage, LOSER)
    assert lines[12].donor_step == 32
    assert lines[16].extra["compared"] == {"0": {"progress": 36, "score": 0.95}, "1": {"progress": 32, "score": 0.9}}


# -- a member that waits for its peers compares their scores of its own step ----------------------------
def test_waiting_for_peers_compares_the_peers_score_of_the_same_step(tmp_path):
    """With ``wait_for_peers=1.0`` the loser, at its ready step 8, waits until the donor (better) has
    scored at step 8 too, then ranks that score and copies the donor's snapshot of step 8.

    The order is forced, not timed: the donor scores at step 8 only once the loser has read the
    population's records at its step 8 (so that score cannot be there before the loser's first look), and
    the loser's wait may last up to 30 s (a whole last interval): only a wait that ends before the donor
    scores, or a decision that does not wait, ranks the donor's score of step 4."""
    lineage = tmp_path / "lineage.jsonl"
    members = {LOSER: TrainingMember(0), DONOR: TrainingMember(1)}

    def body(group: PopulationGroup) -> object:
        me = group.rank
        population = {LOSER: status(0.01, [], []), DONOR: status(0.05, [], [])}
        book = PopulationBook(population=population, hyperparameters=dict(population[me]["hyperparameters"]))
        steps = protocol(group, members[me], book, wait_for_peers=1.0 if me == LOSER else None)
        store = group.store
        try:
            start(steps, lineage, 0)
            if me == DONOR:
                members[DONOR].train()
                steps.step(Observation(0.9, False, 4, 0))
                store.set("donor scored at 4", "1")
                store.wait(["loser looked"])
                members[DONOR].train()
                snapshot = members[DONOR].digest()
                steps.step(Observation(0.95, False, 8, 0))
                store.wait(["loser done"])
                steps.finish()
                return snapshot
            store.wait(["donor scored at 4"])
            read = steps._records

            def records_then_tell() -> dict[int, dict[str, Any]]:
                records = read()
                store.set("loser looked", "1")  # after the read: this look cannot see the donor at step 8
                return records

            steps._records = records_then_tell
            steps._interval_started = time.monotonic() - 30.0  # its last interval: 30 s, so it waits up to 30 s
            result = steps.step(Observation(0.1, False, 8, 0))
            store.set("loser done", "1")
            steps.finish()
            return result.plan, members[LOSER].digest()
        finally:
            steps.close()

    (plan, held), snapshot = run_ranks(2, "gloo", body)
    line = ready_lines(lineage, LOSER)[8]
    assert line.extra["compared"]["1"] == {"progress": 8, "score": 0.95}
    assert line.extra["in_step"] and 0.0 < line.extra["waited_s"] < 30.0
    assert (plan.event, plan.parent, line.donor_step) == ("exploit", DONOR, 8)
    assert held == snapshot
