"""The edges of a fit (lightning_pbt.plugin.fit_edges): members that start alike, per-member weights, the last
ready step, and the results every rank learns at the end. Collectives run on threads over gloo
(tests/unit/test_transport.run_ranks), as the strategy builds them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lightning_pbt.algorithm.scheduler import MemberPlan, PBTScheduler
from lightning_pbt.algorithm.space import LogUniform
from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed.ready_steps.base import PopulationBook
from lightning_pbt.distributed.ready_steps.lockstep import SynchronousReadySteps
from lightning_pbt.plugin import fit_edges
from lightning_pbt.plugin.callback import PopulationBasedTraining
from tests.unit.test_transport import run_ranks

SPACE = {"lr": LogUniform(1e-4, 1e-1)}


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.Linear(256, 10))


def topology(rank: int, size: int = 4, member_size: int = 1) -> PopulationTopology:
    return PopulationTopology(world_size=size, world_rank=rank, member_size=member_size)


# -- identical starts ------------------------------------------------------------------------------
def test_the_digest_tells_one_changed_element_and_another_seed_apart():
    a, b = net(0), net(0)
    assert fit_edges.weights_digest(a) == fit_edges.weights_digest(b)
    with torch.no_grad():
        b[2].bias[3] += 1e-7
    assert fit_edges.weights_digest(a) != fit_edges.weights_digest(b)
    assert fit_edges.weights_digest(net(0)) != fit_edges.weights_digest(net(1))
    assert 0 <= fit_edges.weights_digest(a) < 2**48  # exact in the float64 the gather carries


@pytest.mark.parametrize(
    ("seeds", "groups"),
    [((0, 0, 0, 0), [[0, 1, 2, 3]]), ((0, 1, 0, 1), [[0, 2], [1, 3]]), ((0, 1, 2, 3), [])],
)
def test_members_that_start_alike_are_told_on_the_warning_rank_only(seeds, groups):
    nets = [net(seed) for seed in seeds]  # built here: the threads share torch's global generator

    def body(group):
        rank = group.rank
        return fit_edges.identical_start_warning(group, topology(rank), nets[rank], rank == 0, "as_built")

    messages = run_ranks(4, "gloo", body)
    assert messages[1:] == [None, None, None]  # every rank took part, one says it
    if not groups:
        assert messages[0] is None
        return
    assert messages[0] == fit_edges.identical_start_message(groups, 4, "as_built")
    assert fit_edges.identical_groups(dict(enumerate(fit_edges.weights_digest(net(s)) for s in seeds))) == groups


def test_a_member_of_two_ranks_counts_once():
    digest = [fit_edges.weights_digest(net(member)) for member in (0, 1)]

    def body(group):  # 2 members x 2 ranks; the ranks of a member hold the same weights (DDP)
        return fit_edges.gather_weight_digests(group, topology(group.rank, 4, 2), digest[group.rank // 2])

    digests = run_ranks(4, "gloo", body)
    assert all(d == digests[0] for d in digests) and sorted(digests[0]) == [0, 1]
    assert digests[0][0] != digests[0][1]


@pytest.mark.parametrize(
    ("seeds", "groups"),
    [((0, 1, 2, 3), []), ((0, 1, 1, 3), [[1, 2]]), ((5, 5, 6, 6), [[0, 1], [2, 3]]), ((7, 1, 7, 3), [[0, 2]])],
)
def test_members_that_take_turns_are_compared_member_by_member(seeds, groups):
    """2 processes x 2 lanes: member m = process x 2 + lane; each lane gathers in its turn, and the lane that
    completes the process's digests decides (on population rank 0 only)."""
    nets = [net(seed) for seed in seeds]

    def body(group):
        seen: dict[int, int] = {}  # MemberTurns.pooled["digests"]: shared by the process's lanes
        said = []
        for lane in (0, 1):
            view = PopulationTopology(world_size=2, world_rank=group.rank, members_per_process=2, lane=lane)
            said.append(fit_edges.identical_start_warning(group, view, nets[view.member_id], group.rank == 0,
                                                          "as_built", seen))  # fmt: skip
        return said, seen

    (said0, seen0), (said1, seen1) = run_ranks(2, "gloo", body)
    assert seen0 == seen1 == {m: fit_edges.weights_digest(nets[m]) for m in range(4)}
    # Lane 0 knew only members 0 and 2 (alike in the last case: said once, when lane 1 completes the view).
    assert said0[0] is None and said1 == [None, None]  # rank 1 never says
    assert said0[1] == (fit_edges.identical_start_message(groups, 4, "as_built") if groups else None)


def test_the_message_names_the_groups_and_the_fix():
    everyone = fit_edges.identical_start_message([[0, 1, 2, 3]], 4, "as_built")
    assert "all 4 members start from identical weights" in everyone
    for fix in ("configure_model", "initial_weights='per_member'", "initial_weights='shared'"):
        assert fix in everyone
    some = fit_edges.identical_start_message([[0, 2], [1, 3, 4]], 6, "as_built")
    assert "members 0 and 2 start" in some and "members 1, 3 and 4 start" in some
    assert "reset_parameters" in fit_edges.identical_start_message([[0, 1]], 2, "per_member")


class _Fake:
    """Just enough trainer and strategy for the callback's on_fit_start."""

    def __init__(self, model: nn.Module, member_seed: int, ckpt_path: str | None = None) -> None:
        self.optimizer = torch.optim.Adam(model.parameters())
        self.trainer = SimpleNamespace(strategy=None, optimizers=[self.optimizer], ckpt_path=ckpt_path)
        self.strategy = SimpleNamespace(member_seed=member_seed)


class _Module(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)  # every process builds the same weights
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 2))
        self.hparams = {}


def _start(member_seed: int, initial_weights: str, ckpt_path: str | None = None, restored: bool = False):
    module = _Module()
    fake = _Fake(module, member_seed, ckpt_path)
    pbt = PopulationBasedTraining(SPACE, monitor="val", initial_weights=initial_weights)
    pbt._strategy, pbt._restored = fake.strategy, restored
    pbt.on_fit_start(fake.trainer, module)
    return fit_edges.weights_digest(module)


def test_per_member_weights_come_from_the_member_seed_and_only_on_a_fresh_start():
    built = fit_edges.weights_digest(_Module())
    fresh = {seed: _start(seed, "per_member") for seed in (0, 1, 2)}
    assert len(set(fresh.values())) == 3 and built not in fresh.values()
    assert _start(1, "per_member") == fresh[1]  # a function of the member's seed alone
    assert _start(1, "per_member", ckpt_path="last.ckpt") == built  # resumed: its checkpoint's weights stay
    assert _start(1, "per_member", restored=True) == built
    assert _start(1, "as_built") == built and _start(1, "shared") == built


def test_initial_weights_and_verbose_are_checked():
    with pytest.raises(ValueError, match="initial_weights must be one of"):
        PopulationBasedTraining(SPACE, monitor="val", initial_weights="random")
    with pytest.raises(ValueError, match="verbose must be True or False"):
        PopulationBasedTraining(SPACE, monitor="val", verbose="yes")


# -- the last ready step ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "ends"),
    [
        ((100, 100, 3, None, False), True),  # max_steps reached
        ((96, 100, 3, 4, False), False),
        ((96, -1, 4, 4, False), True),  # max_epochs reached
        ((96, -1, 3, 4, False), False),
        ((50, -1, 2, 10, True), True),  # the trainer stops (early stopping)
        ((50, -1, 2, 10, True, None, 5), False),  # ... but min_epochs keeps it going
        ((50, -1, 2, 10, True, 60, None), False),  # ... or min_steps
        ((50, None, 2, None, False), False),
    ],
)
def test_training_ends_here(args, ends):
    assert fit_edges.training_ends_here(*args) is ends


def _decide_last(last: bool) -> dict[int, MemberPlan]:
    """Lockstep's decision for 4 members, one far behind the others, at a ready step."""
    population = {m: {"hyperparameters": {"lr": 0.01 * (m + 1)}, "history": []} for m in range(4)}
    steps = SynchronousReadySteps(
        population=None, topology=topology(0), namespace="ns", scheduler=PBTScheduler(SPACE, seed=0),
        book=PopulationBook(population, {}), member=None, mode="max", monitor="val", seed=0,
    )  # fmt: skip
    rows = [[score, 40, 1, 0, 0, last] for score in (0.9, 0.1, 0.8, 0.7)]
    decision = steps._decide(dict(enumerate(torch.tensor(rows, dtype=torch.float64))))
    assert decision["last"] == {str(m): last for m in range(4)}
    return {int(m): MemberPlan.from_dict(plan) for m, plan in decision["plans"].items()}


def test_no_member_is_replaced_or_explored_at_its_last_ready_step():
    assert _decide_last(False)[1].event == "exploit"  # the same population before its last step
    plans = _decide_last(True)
    assert all(plan.event == "keep" and not plan.mutations for plan in plans.values())
    assert all(plans[m].hyperparameters == {"lr": 0.01 * (m + 1)} for m in range(4))


# -- the end of fit --------------------------------------------------------------------------------
def test_all_gather_json_gives_every_rank_every_payload_in_rank_order():
    payloads = [{}, {"a": [1.5, None]}, {"big": "x" * 100_000}, {"rank": 3, "text": "é"}]
    gathered = run_ranks(4, "gloo", lambda group: group.all_gather_json(payloads[group.rank]))
    assert all(g == payloads for g in gathered)


def _book(member: int, score: float | None) -> PopulationBook:
    population = {m: {"score": None, "parent": m} for m in range(4)}
    population[member].update(score=score, parent=(member + 1) % 4)
    return PopulationBook(population, {"lr": 0.01 * (member + 1)}, ready_count=3, last_ready_step=24)


class _Trainer:
    def __init__(self, checkpoint: object | None) -> None:
        self.checkpoint_callback, self.saved = checkpoint, []

    def save_checkpoint(self, path: str) -> None:
        self.saved.append(path)


@pytest.mark.parametrize("with_checkpoints", [True, False])
def test_every_rank_learns_the_same_results_and_the_best_member_without_a_checkpoint_saves_one(with_checkpoints):
    scores = [0.5, 0.9, math.nan, 0.7]
    trainers = [
        _Trainer(SimpleNamespace(best_model_path=f"m{m}.ckpt", last_model_path=f"m{m}-last.ckpt",
                                 best_model_score=torch.tensor(s)))
        if with_checkpoints else _Trainer(None)
        for m, s in enumerate(scores)
    ]  # fmt: skip

    def body(group):
        m = group.rank
        book = _book(m, None if math.isnan(scores[m]) else scores[m])
        results, saved = fit_edges.finish_results(group, [(trainers[m], m, book)], "val", "max", "/run", "/run/pbt")
        fit_edges.save_if_best(trainers[m], m, results, saved)
        return results

    results = run_ranks(4, "gloo", body)
    assert all(r == results[0] for r in results)
    ranked = results[0].members
    assert [r.member for r in ranked] == [1, 3, 0, 2]  # best first, the unknown score last
    assert ranked[0].hyperparameters == {"lr": 0.02} and ranked[0].step == 24 and ranked[0].parent == 2
    if with_checkpoints:
        assert results[0].best.checkpoint_path == "m1.ckpt" and results[0].best.checkpoint_score == pytest.approx(0.9)
        assert all(not t.saved for t in trainers)
    else:  # only the best member's ranks save, and every rank knows where
        assert results[0].best.checkpoint_path == "/run/pbt/member_1.ckpt"
        assert [t.saved for t in trainers] == [[], ["/run/pbt/member_1.ckpt"], [], []]


def test_members_that_take_turns_give_one_result_each_and_the_best_one_saves_in_its_own_lane():
    """2 processes x 2 lanes (members 0-3 = process x 2 + lane): each process gathers once for both of its
    members; every rank learns all four, best first; only the best member's trainer saves."""
    scores = [0.5, 0.7, 0.9, 0.6]
    trainers = [_Trainer(None) for _ in scores]

    def body(group):
        hosted = [(trainers[m], m, _book(m, scores[m])) for m in (2 * group.rank, 2 * group.rank + 1)]
        results, saved = fit_edges.finish_results(group, hosted, "val", "max", "/run", "/run/pbt")
        for lane_trainer, member, _ in hosted:  # each lane in its turn
            fit_edges.save_if_best(lane_trainer, member, results, saved)
        return results

    results = run_ranks(2, "gloo", body)
    assert results[0] == results[1]
    assert [r.member for r in results[0].members] == [2, 1, 3, 0]  # every member once, best first
    assert results[0].best.checkpoint_path == "/run/pbt/member_2.ckpt"
    assert [t.saved for t in trainers] == [[], [], ["/run/pbt/member_2.ckpt"], []]


def test_the_loggers_hparams_yaml_follows_the_values_in_effect(tmp_path):
    logger = CSVLogger(str(tmp_path), name="", version="")
    logger.log_hyperparams({"lr": 0.05, "dropout": 0.1, "width": 32})  # what Lightning logs at fit start
    assert fit_edges.log_hyperparameters([logger], {"lr": 0.012, "dropout": 0.3}) is None
    logger.save()
    assert yaml.safe_load((tmp_path / "hparams.yaml").read_text()) == {"lr": 0.012, "dropout": 0.3, "width": 32}

    class Refusing:
        def log_hyperparams(self, params):
            raise ValueError("Changing param values is not allowed")

    assert "Refusing could not record" in fit_edges.log_hyperparameters([Refusing(), logger], {"lr": 0.02})
