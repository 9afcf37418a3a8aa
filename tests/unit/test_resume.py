"""The resume agreement without processes: the decision from a gathered table, the rollback to an older
checkpoint of the agreed ready step, and ``ckpt_path="last"`` resolved in the fit call's arguments."""

from __future__ import annotations

import os
import random
import time
from types import SimpleNamespace

import numpy
import pytest
import torch

from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed.resume import (
    FIT_CKPT_INDEX,
    NO_CHECKPOINT,
    UNREADABLE,
    agree_on_resume,
    agree_on_resume_of_lanes,
    checkpoint_at_ready_step,
    fit_checkpoint,
    pbt_state,
    resume_target,
)
from lightning_pbt.plugin.turns import random_state, set_random_state


def _save(path, ready_step: int, synchronous: bool = True) -> str:
    state = {"last_ready_step": ready_step, "synchronous": synchronous}
    torch.save({"callbacks": {"EarlyStopping{}": {"x": 1}, "PopulationBasedTraining{'monitor': 'm'}": state}}, path)
    time.sleep(0.01)  # distinct modification times: the newest comes first
    return str(path)


def test_no_checkpoint_anywhere_is_a_fresh_start():
    assert resume_target([[NO_CHECKPOINT, 1]] * 4, [0]) is None


def test_synchronous_ranks_resume_at_the_slowest_step_of_the_whole_population():
    assert resume_target([[8, 1], [8, 1], [4, 1], [8, 1]], [0, 1]) == 4


def test_asynchronous_ranks_resume_at_the_slowest_step_of_their_member_only():
    rows = [[8, 0], [6, 0], [2, 0], [2, 0]]
    assert resume_target(rows, [0, 1]) == 6
    assert resume_target(rows, [2, 3]) == 2


def test_unreadable_and_missing_checkpoints_are_errors_naming_the_ranks():
    with pytest.raises(RuntimeError, match=r"world ranks \[1\] cannot read the checkpoint"):
        resume_target([[4, 1], [UNREADABLE, 1], [NO_CHECKPOINT, 1]], [0])
    with pytest.raises(RuntimeError, match=r"world ranks \[2\] have no checkpoint to resume from"):
        resume_target([[4, 1], [4, 1], [NO_CHECKPOINT, 1]], [0])


def test_the_pbt_state_is_found_by_its_key_and_a_checkpoint_by_its_ready_step(tmp_path):
    old = _save(tmp_path / "a.ckpt", 4)
    _save(tmp_path / "b.ckpt", 8)
    newer_old = _save(tmp_path / "c.ckpt", 4)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    assert pbt_state(old) == {"last_ready_step": 4, "synchronous": True}
    assert checkpoint_at_ready_step(str(tmp_path), 4) == newer_old
    assert checkpoint_at_ready_step(str(tmp_path), 6) is None


class _Table:
    """The population group's all-gather over a table of which this rank's row is its own."""

    def __init__(self, others: list[list[int]], rank: int) -> None:
        self.others, self.rank, self.calls = others, rank, 0

    def all_gather(self, mine: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        rows = [list(row) for row in self.others]
        if mine.numel() == 1:  # the second gather: who found its rollback checkpoint (the others did)
            rows = [[1] for _ in rows]
        rows[self.rank] = mine.reshape(-1).tolist()
        return torch.tensor(rows)


def test_a_rank_ahead_rolls_back_to_its_checkpoint_of_the_agreed_step(tmp_path):
    older = _save(tmp_path / "step4.ckpt", 4)
    given = _save(tmp_path / "step8.ckpt", 8)
    topology = PopulationTopology(world_size=2, world_rank=0, member_size=1)
    population = _Table([[0, 0], [4, 1]], rank=0)
    assert agree_on_resume(population, topology, given, None) == older
    assert population.calls == 2  # both gathers on every rank, whatever it resumes from
    assert agree_on_resume(_Table([[0, 0], [8, 1]], rank=0), topology, given, None) is None
    os.remove(older)
    with pytest.raises(RuntimeError, match=r"world ranks \[0\] keep no checkpoint of the step"):
        agree_on_resume(_Table([[0, 0], [4, 1]], rank=0), topology, given, None)


def test_last_is_resolved_against_the_members_folders_in_the_fit_calls_arguments():
    resolved = []

    def parse(fn, path, model_provided, model_connected):
        resolved.append((fn, path))
        return "/run/member_1/last.ckpt"

    trainer = SimpleNamespace(
        _checkpoint_connector=SimpleNamespace(_parse_ckpt_path=parse), state=SimpleNamespace(fn="fit")
    )
    positional = ("model", None, None, None, "last", False)
    args, kwargs, path, weights_only = fit_checkpoint(trainer, positional, {})
    assert args[FIT_CKPT_INDEX] == path == "/run/member_1/last.ckpt" and weights_only is False
    assert args[:FIT_CKPT_INDEX] == positional[:FIT_CKPT_INDEX] and len(args) == len(positional)
    args, kwargs, path, weights_only = fit_checkpoint(trainer, ("model",), {"ckpt_path": "last"})
    assert kwargs["ckpt_path"] == path == "/run/member_1/last.ckpt" and weights_only is None
    assert resolved == [("fit", "last")] * 2
    assert fit_checkpoint(trainer, ("model",), {"ckpt_path": "x.ckpt", "weights_only": True})[2:] == ("x.ckpt", True)
    assert fit_checkpoint(trainer, ("model",), {})[2] is None


class _LaneTable:
    """The population's all-gathers when every process hosts K lanes: ``others`` holds every rank's K rows."""

    def __init__(self, others: list[list[list[int]]], rank: int) -> None:
        self.others, self.rank = others, rank

    def all_gather(self, mine: torch.Tensor) -> torch.Tensor:
        if mine.dim() == 1:  # the second gather: who found its rollback checkpoint (the others did)
            rows = [[1] * len(self.others[0]) for _ in self.others]
        else:
            rows = [list(row) for row in self.others]
        rows[self.rank] = mine.tolist()
        return torch.tensor(rows)


def test_the_members_that_take_turns_in_a_process_agree_together_and_each_rolls_back_in_its_own_folder(tmp_path):
    """2 processes x 2 lanes: member 1 (process 0, lane 1) is at step 4 while its lane-mate member 0 and
    process 1's members are at 8; one agreement for the lanes of a process rolls member 0 back too (lanes
    agreeing one by one would compare member 0 with member 2 only, both at 8)."""
    folders = [tmp_path / f"member_{m}" for m in range(2)]
    for folder in folders:
        folder.mkdir()
    older = _save(folders[0] / "step4.ckpt", 4)
    given = [(_save(folders[0] / "step8.ckpt", 8), None), (_save(folders[1] / "step4.ckpt", 4), None)]
    topology = PopulationTopology(world_size=2, world_rank=0, member_size=1, members_per_process=2)
    population = _LaneTable([[[0, 0], [0, 0]], [[8, 1], [8, 1]]], rank=0)
    assert agree_on_resume_of_lanes(population, topology, given) == [older, None]
    os.remove(older)
    with pytest.raises(RuntimeError, match=r"members \[0\] \(world ranks \[0\]\) keep no checkpoint of the step"):
        agree_on_resume_of_lanes(_LaneTable([[[0, 0], [0, 0]], [[8, 1], [8, 1]]], rank=0), topology, given)
    with pytest.raises(RuntimeError, match=r"members \[3\] \(world ranks \[1\]\) have no checkpoint"):
        agree_on_resume_of_lanes(_LaneTable([[[0, 0], [0, 0]], [[8, 1], [NO_CHECKPOINT, 1]]], 0), topology, given)


def test_a_members_random_state_survives_a_checkpoint_loaded_with_weights_only(tmp_path):
    """The PBT callback keeps the process's RNGs in its checkpoint state: a resumed member draws the same
    dropout masks (torch), augmentations (numpy, random) as it would have without the restart."""
    torch.manual_seed(3), random.seed(4), numpy.random.seed(5)
    torch.save({"random": random_state()}, tmp_path / "state.ckpt")
    drawn = (torch.rand(4), numpy.random.rand(2).tolist(), random.random())
    torch.manual_seed(0), random.seed(0), numpy.random.seed(0)
    set_random_state(torch.load(tmp_path / "state.ckpt", weights_only=True)["random"])
    again = (torch.rand(4), numpy.random.rand(2).tolist(), random.random())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]
