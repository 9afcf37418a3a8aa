"""Members that take turns, without Lightning: the baton (:class:`MemberTurns`), the process-wide state
swapped at each turn, member ids per layout, and the ready step's transfers with several members per
process (threads stand in for processes, over real gloo groups)."""

from __future__ import annotations

import os
import random
import threading
from types import SimpleNamespace

import numpy
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pbt import PopulationBasedTraining, PopulationStrategy
from lightning_pbt.algorithm.scheduler import MemberPlan
from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed import transfer
from lightning_pbt.distributed.ready_steps.base import PopulationBook
from lightning_pbt.distributed.ready_steps.lockstep import SynchronousReadySteps
from lightning_pbt.plugin.console import failed_lane
from lightning_pbt.plugin.turns import LaneFailed, MemberTurns, lane_copies
from lightning_pbt.space import Uniform
from tests.unit.test_transport import run_ranks


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", None])
def test_members_per_process_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="members_per_process must be an integer >= 1"):
        PopulationStrategy(members_per_process=value)


def test_asynchronous_mode_with_turns_is_refused_with_the_reason():
    pbt = PopulationBasedTraining({"x": Uniform(0, 1)}, monitor="m", synchronous=False)
    trainer = SimpleNamespace(strategy=PopulationStrategy(members_per_process=2))
    with pytest.raises(ValueError, match=r"synchronous=False\) does not support .*members_per_process=2"):
        pbt.setup(trainer, None, "fit")


@pytest.mark.parametrize(
    ("world_size", "member_size", "lanes"), [(8, 1, 1), (2, 1, 4), (1, 1, 8), (4, 2, 1), (2, 2, 2)]
)
def test_a_member_has_the_same_id_and_ranks_whichever_the_layout(world_size, member_size, lanes):
    """Member m is lane m % K of slot m // K: each id is hosted once, by the ranks member_ranks names, and
    its DDP rank j is rank j of its slot."""
    hosted = {}
    for world_rank in range(world_size):
        base = PopulationTopology(world_size, world_rank, member_size, members_per_process=lanes)
        for view in base.lanes():
            assert view.world_rank_of(view.member_id, view.member_rank) == world_rank
            assert view.lane_of(view.member_id) == view.lane
            hosted.setdefault(view.member_id, []).append(world_rank)
    assert sorted(hosted) == list(range(world_size // member_size * lanes))
    assert all(ranks == list(base.member_ranks(member)) for member, ranks in hosted.items())


class FakeLane:
    """A member lane's protocol as MemberTurns sees it; records what the process did."""

    def __init__(self, lane: int, log: list) -> None:
        self.topology = SimpleNamespace(lane=lane)
        self.me = lane
        self.log = log

    def stopped_observation(self):
        return ("stopped", self.me)

    def population_step(self, lanes):
        self.log.append(("step", [observation for _, observation in lanes]))
        return {protocol.me: f"result {protocol.me} {len(self.log)}" for protocol, _ in lanes}

    def serve_until_everyone_stopped(self, lanes):
        self.log.append(("serve", [protocol.me for protocol in lanes]))


def run_lanes(lanes: int, rounds: dict[int, int], fail: tuple[int, int] | None = None, park: bool = False):
    """Lane k trains ``rounds[k]`` intervals (drawing from the process RNG it seeded itself), a ready step
    after each, then stops. Returns the log, each lane's draws and each lane's results or error. ``park``:
    the baton's parking hook logs ``("park", lane)`` and its unpark ``("unpark", lane)``."""
    log: list = []

    def parking(protocol):
        log.append(("park", protocol.me))
        return lambda: log.append(("unpark", protocol.me))

    turns, draws = MemberTurns(lanes, park=parking if park else None), {k: [] for k in range(lanes)}
    outcome: dict[int, object] = {}
    running: list[int] = []

    def fit(lane: int) -> None:
        protocol = FakeLane(lane, log)
        torch.manual_seed(100 + lane), numpy.random.seed(100 + lane), random.seed(100 + lane)
        os.environ["PL_GLOBAL_SEED"] = str(100 + lane)
        for r in range(rounds[lane]):
            assert not running, f"lane {lane} runs while lane {running} runs"
            running.append(lane)
            log.append(("train", lane, r))
            draws[lane].append(
                (float(torch.rand(1)), float(numpy.random.rand()), random.random(), os.environ["PL_GLOBAL_SEED"])
            )
            if fail == (lane, r):
                running.clear()
                raise ValueError("boom")
            running.clear()
            turns.ready_step(protocol, (lane, r))
        turns.finish(protocol)
        log.append(("end", lane))

    def main(lane: int) -> None:
        try:
            turns.run(lane, lambda: fit(lane))
            outcome[lane] = "ok"
        except BaseException as error:
            outcome[lane] = error

    threads = [threading.Thread(target=main, args=(lane,), daemon=True) for lane in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), log
    return log, draws, outcome


def test_lanes_take_turns_in_lane_order_and_meet_once_per_ready_step():
    log, _, outcome = run_lanes(3, {0: 3, 1: 1, 2: 3})
    assert outcome == {0: "ok", 1: "ok", 2: "ok"}
    assert log == [
        ("train", 0, 0), ("train", 1, 0), ("train", 2, 0),
        ("step", [(0, 0), (1, 0), (2, 0)]),  # one population step carrying every lane's row
        ("train", 0, 1), ("train", 2, 1),  # lane 1 stopped when its turn came: out of the rotation
        ("step", [(0, 1), ("stopped", 1), (2, 1)]),
        ("train", 0, 2), ("train", 2, 2),
        ("step", [(0, 2), ("stopped", 1), (2, 2)]),
        ("serve", [0, 1, 2]),  # the last lane to stop serves the rest of the population
        ("end", 0), ("end", 1), ("end", 2),  # then the fits end one by one, in lane order
    ]  # fmt: skip


def test_each_lane_draws_from_its_own_random_stream_across_turns(monkeypatch):
    """The process-wide RNGs (torch, numpy, Python's ``random``) and the seed variable ``seed_everything``
    sets are saved when a lane parks and restored when it resumes: every lane draws what it would draw
    alone, from each of them."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # the lanes change it; monkeypatch puts it back
    _, draws, _ = run_lanes(3, {0: 4, 1: 4, 2: 4})
    for lane, values in draws.items():
        torch_alone, numpy_alone = torch.Generator().manual_seed(100 + lane), numpy.random.RandomState(100 + lane)
        random_alone = random.Random(100 + lane)
        alone = [
            (
                float(torch.rand(1, generator=torch_alone)),
                float(numpy_alone.rand()),
                random_alone.random(),
                str(100 + lane),
            )
            for _ in range(4)
        ]
        assert values == alone, lane


def test_a_failing_lane_stops_the_others_of_its_process():
    _, _, outcome = run_lanes(3, {0: 3, 1: 3, 2: 3}, fail=(1, 1))
    assert isinstance(outcome[1], ValueError)
    assert isinstance(outcome[0], LaneFailed) and isinstance(outcome[2], LaneFailed)
    assert failed_lane(outcome[1]) == 1  # re-raised on the main thread, the error hook names lane 1's member


class StateMember:
    """A member's training state with a tensor larger than a transfer bucket (sent as it is, not packed)
    and a small nested one; loads the first as a module loads its weights (in place) and the second as an
    optimizer loads its state (keeping the tensors it is given), so a copy that shares storage with the
    donor, or a donor whose state changed before it was sent, would show."""

    device = torch.device("cpu")

    def __init__(self, member: int) -> None:
        large = transfer.BUCKET_BYTES // 4 + 1000  # float32 elements
        self.state = {"w": torch.full((large,), float(member)), "opt": {"m": torch.arange(5.0) + member}}

    def training_state(self) -> dict:
        return self.state

    def load_training_state(self, state: dict, model_in_place: bool) -> None:
        self.state["w"].copy_(state["w"])  # as a module loads its parameters: into its own tensors
        self.state["opt"] = state["opt"]  # as an optimizer loads its state: keeping the tensors


def test_exploits_with_two_members_per_process_copy_locally_and_across_processes():
    """2 processes x 2 lanes (members 0, 1 in process 0; 2, 3 in process 1): 1 <- 0 and 3 <- 2 inside a
    process, 2 <- 1 across. Members 1 and 2 are losers and donors at once: each gives what it held before
    the step. No copy shares the donor's storage (the donors train on afterwards)."""
    plans = {
        0: MemberPlan(0, "keep", 0, {}),
        1: MemberPlan(1, "exploit", 0, {}),
        2: MemberPlan(2, "exploit", 1, {}),
        3: MemberPlan(3, "exploit", 2, {}),
    }

    def body(group):
        topology = PopulationTopology(world_size=2, world_rank=group.rank, members_per_process=2)
        local = {view.member_id: StateMember(view.member_id) for view in topology.lanes()}
        steps = SynchronousReadySteps(
            population=group, topology=topology, namespace="ns", scheduler=None, book=PopulationBook(),
            member=None, mode="max", monitor="m", seed=0,
        )  # fmt: skip
        steps._move_states(plans, local)
        for member in local.values():  # every member trains on: no other member may see it
            member.state["w"].add_(1000.0)
            member.state["opt"]["m"].add_(1000.0)
        return {m: (float(s.state["w"][0]), s.state["opt"]["m"].tolist()) for m, s in local.items()}

    held = {member: value for rank in run_ranks(2, "gloo", body) for member, value in rank.items()}
    assert held == {
        0: (1000.0, [1000.0, 1001.0, 1002.0, 1003.0, 1004.0]),
        1: (1000.0, [1000.0, 1001.0, 1002.0, 1003.0, 1004.0]),  # member 0's, in its own storage
        2: (1001.0, [1001.0, 1002.0, 1003.0, 1004.0, 1005.0]),  # member 1's before the step
        3: (1002.0, [1002.0, 1003.0, 1004.0, 1005.0, 1006.0]),  # member 2's before the step
    }


def test_lane_copies_give_each_member_its_own_trainer_callbacks_model_and_loaders_but_share_the_datasets():
    """What the launcher wrapper deep-copies for lanes 1..K-1: nothing per member is shared (a callback
    object shared between members would mix their ModelCheckpoint paths or EarlyStopping counts), while
    the datasets and what it is told to share are the same objects in every lane."""
    dataset = TensorDataset(torch.randn(64, 4), torch.zeros(64))
    loader = DataLoader(dataset, batch_size=8, shuffle=True)
    callbacks = [ModelCheckpoint(save_last=True), EarlyStopping(monitor="m")]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=PopulationStrategy(members_per_process=3), callbacks=callbacks,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model, launcher = nn.Linear(4, 1), object()
    lanes = [(trainer, (model, loader), {"launcher": launcher})]
    lanes += lane_copies(lanes[0], 2, shared=[launcher, trainer.strategy._launcher])  # as run_member_lanes shares
    kinds = (ModelCheckpoint, EarlyStopping)
    per_lane = [[next(cb for cb in t.callbacks if isinstance(cb, kind)) for kind in kinds] for t, _, _ in lanes]
    for kind in range(len(kinds)):
        assert len({id(callbacks[kind]) for callbacks in per_lane}) == 3, kinds[kind]
    assert len({id(t) for t, _, _ in lanes}) == len({id(t.strategy) for t, _, _ in lanes}) == 3
    assert len({id(m) for _, (m, _), _ in lanes}) == len({id(m.weight) for _, (m, _), _ in lanes}) == 3
    assert all(torch.equal(m.weight, model.weight) for _, (m, _), _ in lanes)
    assert len({id(loader) for _, (_, loader), _ in lanes}) == 3
    assert all(loader.dataset is dataset for _, (_, loader), _ in lanes)
    assert all(kwargs["launcher"] is launcher for _, _, kwargs in lanes)
