"""ReadySteps on real gloo groups in threads (what every rank must agree on), and asynchronous bookkeeping."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lightning_pbt.algorithm.scheduler import PBTScheduler
from lightning_pbt.algorithm.space import LogUniform
from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed.optimizer_layout import optimizer_layout
from lightning_pbt.distributed.ready_steps.asynchronous import AsynchronousReadySteps
from lightning_pbt.distributed.ready_steps.base import PopulationBook
from lightning_pbt.distributed.ready_steps.lockstep import SynchronousReadySteps
from lightning_pbt.distributed.ready_steps.records import (
    everyone_diverged,
    peers_caught_up,
    snapshot_due,
    wait_for_peers,
)
from tests.unit.test_transport import run_ranks, survives_abort


def start(
    tmp_path, layouts: dict[int, list], lineage: str = "lineage.jsonl", averages: dict[int, list] | None = None
) -> list[object]:
    """Every rank starts; returns each rank's error message, or None."""
    scheduler = PBTScheduler({"lr": LogUniform(1e-3, 0.1)})

    def body(group):
        book = PopulationBook(
            population={m: {"hyperparameters": scheduler.initial_hyperparameters(m), "history": []} for m in (0, 1)}
        )
        protocol = SynchronousReadySteps(
            population=group,
            topology=PopulationTopology(world_size=2, world_rank=group.rank),
            namespace="pbt/0",
            scheduler=scheduler,
            book=book,
            member=None,
            mode="max",
            monitor="val_acc",
            seed=0,
        )
        try:
            protocol.start(
                str(tmp_path / lineage),
                restored=False,
                layout=layouts[group.rank],
                step=0,
                epoch=0,
                start_values={},
                init_extra={},
                averages=(averages or {}).get(group.rank, ()),
            )
        except RuntimeError as error:
            return str(error)
        finally:
            protocol.close()
        return None

    return run_ranks(2, "gloo", body)


def layout(*group_sizes: int) -> list:
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(sum(group_sizes))]
    groups, i = [], 0
    for size in group_sizes:
        groups.append({"params": params[i : i + size]})
        i += size
    return optimizer_layout([torch.optim.SGD(groups, lr=0.1)])


@survives_abort
def test_members_with_different_optimizers_stop_every_rank_with_the_same_message(tmp_path):
    errors = start(tmp_path, {0: layout(2, 1), 1: layout(3)})
    assert errors[0] == errors[1]
    assert "the optimizers of world ranks [1] differ from world rank 0's" in errors[0]
    assert "has 2 param group(s) in the donor, 1 in the loser" in errors[0]
    assert not (tmp_path / "lineage.jsonl").exists()  # refused before the lineage was opened


def sized_layout(out_features: int) -> list:
    """One SGD param group of a ``Linear(10, out_features)``: two parameters whatever the size."""
    return optimizer_layout([torch.optim.SGD(torch.nn.Linear(10, out_features).parameters(), lr=0.1)])


def test_param_groups_that_differ_only_in_size_stop_every_rank_naming_the_sizes(tmp_path):
    """Same optimizer, same param-group count, parameter count and keys; only the sizes differ (a member
    built with another width): every rank says so, with both sizes, and blames nothing else."""
    errors = start(tmp_path, {0: sized_layout(5), 1: sized_layout(6)})
    assert errors[0] == errors[1]
    assert "the optimizers of world ranks [1] differ from world rank 0's" in errors[0]
    assert "param group 0 holds 2 parameter(s) of 55 elements in the donor, 2 of 66 in the loser" in errors[0]
    assert "weight-averaging" not in errors[0]
    assert not (tmp_path / "lineage.jsonl").exists()


def test_a_difference_no_check_names_is_reported_as_it_is(tmp_path, monkeypatch):
    """Should the fingerprint ever cover more than the optimizer comparison reads (a field added to the
    layout), the error shows both ranks' layouts instead of blaming the weight averages, which are equal."""
    from lightning_pbt.distributed.ready_steps import base

    monkeypatch.setattr(base, "describe_layout_mismatch", lambda donor, loser: None)
    errors = start(tmp_path, {0: sized_layout(5), 1: sized_layout(6)})
    assert errors[0] == errors[1] and "weight-averaging" not in errors[0]
    assert "laid out differently from world rank 0's" in errors[0]
    assert "'numel': 55" in errors[0] and "'numel': 66" in errors[0]


@survives_abort
def test_members_with_different_weight_averages_stop_every_rank_with_the_same_message(tmp_path):
    errors = start(tmp_path, {0: layout(2, 1), 1: layout(2, 1)}, averages={0: ["EMAWeightAveraging"], 1: []})
    assert errors[0] == errors[1]
    assert "the weight-averaging callbacks of world ranks [1] ([] on rank 1)" in errors[0]
    assert "differ from world rank 0's (['EMAWeightAveraging'])" in errors[0]
    assert not (tmp_path / "lineage.jsonl").exists()  # refused before the lineage was opened


@survives_abort
def test_equal_optimizers_start_and_rank_0_writes_the_init_lines(tmp_path):
    assert start(tmp_path, {0: layout(2, 1), 1: layout(2, 1)}) == [None, None]
    assert len((tmp_path / "lineage.jsonl").read_text().splitlines()) == 2


@survives_abort
def test_a_lineage_problem_on_rank_0_is_every_ranks_error(tmp_path):
    (tmp_path / "blocker").write_text("")  # a file where the lineage's folder should be
    errors = start(tmp_path, {0: layout(1), 1: layout(1)}, lineage="blocker/lineage.jsonl")
    assert errors[0] == errors[1] and "cannot continue the lineage" in errors[0]


def test_snapshots_between_ready_steps_fall_every_n_steps_after_the_last_one():
    due = [s for s in range(1, 30) if snapshot_due(s, last_ready_step=12, every=5)]
    assert due == [17, 22, 27]  # counted from the ready step, not from step 0
    assert [s for s in range(1, 10) if snapshot_due(s, last_ready_step=-1, every=4)] == [4, 8]  # before the first
    assert not any(snapshot_due(s, last_ready_step=12, every=5) for s in range(0, 13))  # never at or before it
    assert not any(snapshot_due(s, last_ready_step=0, every=None) for s in range(50))


def test_a_member_with_only_in_between_snapshots_has_not_scored_yet():
    """The run ends as 'every member diverged' only once every member has scored at a ready step: a
    member whose snapshots so far are between ready steps (servable, score None) has not."""
    nan = {"version": 4, "ready": True, "score": None}
    early = {"version": 1, "ready": False, "score": None}
    assert not everyone_diverged({0: nan, 1: early})
    assert everyone_diverged({0: nan, 1: {**early, "ready": True, "version": 2}})
    assert not everyone_diverged({0: nan, 1: {"version": 2, "ready": True, "score": 0.5}})
    assert not everyone_diverged({0: nan, 1: {"version": -1, "score": None}})  # a record from before ready flags


def test_peers_have_caught_up_when_every_other_member_scored_at_this_step_or_stopped():
    at = {0: {"done": False, "ready_step": 50}}
    assert peers_caught_up({**at, 1: {"done": False, "ready_step": 50}}, me=0, step=50)
    assert peers_caught_up({**at, 1: {"done": False, "ready_step": 90}}, me=0, step=50)  # ahead
    assert not peers_caught_up({**at, 1: {"done": False, "ready_step": 49}}, me=0, step=50)
    assert not peers_caught_up({**at, 1: {"done": False, "ready_step": None}}, me=0, step=50)  # not yet
    assert peers_caught_up({**at, 1: {"done": True, "ready_step": 10}}, me=0, step=50)  # stopped
    copied = {"done": False, "ready_step": 50, "copied": True}  # decided at this step already
    assert peers_caught_up({**at, 1: copied}, me=0, step=50)
    assert not peers_caught_up({0: at[0], 1: copied, 2: {"done": False, "ready_step": 30}}, me=0, step=50)
    assert peers_caught_up({0: {"done": False, "ready_step": 10}}, me=0, step=50)  # its own is not read


def test_a_record_before_any_ready_step_has_not_scored_at_its_step():
    """A member's first record (start, or a resume at step 120) is no score: the others wait for its first
    ready step. A copy's progress runs ahead of its step; the wait reads the step, the ranking the progress."""
    from lightning_pbt.distributed.ready_steps.records import public_record

    start = public_record({}, {"lr": 0.1}, step=120, epoch=3, score=None, version=-1, offset=0)
    assert start["ready_step"] is None and start["ready_progress"] is None and not start["ready"]
    scored = public_record({"history": [0.5]}, {"lr": 0.1}, step=130, epoch=3, score=0.5, version=0, offset=30)
    assert (scored["ready_step"], scored["ready_progress"], scored["progress"]) == (130, 160, 160)
    assert not peers_caught_up({1: start}, me=0, step=120) and peers_caught_up({1: scored}, me=0, step=130)


def test_waiting_for_peers_ends_when_they_score_or_at_the_deadline():
    calls = []

    def read():
        calls.append(1)
        return {0: {"ready_step": 8}, 1: {"done": False, "ready_step": 8 if len(calls) >= 3 else 4}}

    waited = wait_for_peers(read, me=0, step=8, seconds=30.0)
    assert len(calls) == 3 and waited < 1.0  # returns at the read that shows member 1 at step 8
    calls.clear()
    waited = wait_for_peers(lambda: {1: {"done": False, "ready_step": 4}}, me=0, step=8, seconds=0.2)
    assert 0.2 <= waited < 0.5  # never caught up: the deadline ends it
    assert wait_for_peers(lambda: {1: {"done": True}}, me=0, step=8, seconds=30.0) < 0.05


class _Store(dict):
    def set(self, key, value):
        self[key] = value

    def add(self, key, amount):
        self[key] = self.get(key, 0) + amount
        return self[key]

    def delete_key(self, key):
        self.pop(key, None)


class _Server:
    def __init__(self):
        self.taken = []

    def take_snapshot(self, version, flat, device):
        self.taken.append(version)


class _Member:
    def __init__(self):
        self.weights = torch.full((512, 512), 3.0)  # 1 MB: fresh weights differ from these everywhere

    def training_state(self):
        return {"model": {"w": self.weights}}

    def rejuvenate(self, seed):
        self.weights = torch.randn(512, 512, generator=torch.Generator().manual_seed(seed))

    def apply(self, hyperparameters):
        pass


def _asynchronous(store, book=None, world_rank=0, member_size=1, **options):
    """An asynchronous protocol of member 0 on a fake store and snapshot server, without a process group."""

    book = book or PopulationBook(population={0: {"hyperparameters": {"lr": 0.1}}}, hyperparameters={"lr": 0.1})
    steps = AsynchronousReadySteps(
        population=SimpleNamespace(store=store, device=torch.device("cpu")),
        topology=PopulationTopology(world_size=member_size, member_size=member_size, world_rank=world_rank),
        namespace="ns", scheduler=PBTScheduler({"lr": LogUniform(1e-3, 1.0)}, seed=0), book=book,
        member=_Member(), mode="max", monitor="val", seed=0, **options,
    )  # fmt: skip
    steps.server = _Server()
    return steps


def _deciding(plan):
    """A stand-in for the leader's decision: always ``plan``; records the leader's wait it was given."""
    given = []

    def decide(observation, attempt, leader_wait_s):
        given.append(leader_wait_s)
        return {"plan": plan.to_dict(), "view": {}, "compared": {}}

    return decide, given


@pytest.mark.parametrize("event", ["keep", "rejuvenate"])
def test_a_rejuvenated_member_leaves_the_rankings_until_its_next_ready_step(event):
    """After fresh weights the record's score describes weights thrown away, and the snapshots taken between
    ready steps would serve the new ones under it: the member is left out of the others' rankings
    (``copied``) until it publishes a score again. A member that keeps stays ranked."""
    from lightning_pbt.algorithm.scheduler import MemberPlan
    from lightning_pbt.distributed.ready_steps.base import Observation

    store = _Store()
    steps = _asynchronous(store, snapshot_every=2)
    steps._shared_decision, _ = _deciding(MemberPlan(0, event, 0, {"lr": 0.1}, ()))
    steps._publish(0, 0, None, version=-1, done=False)
    steps.step(Observation(0.5, False, 10, 0))
    for step in (11, 12, 12, 13, 14):  # step 12 twice: gradient accumulation, two batches end at it
        steps.between_ready_steps(step)
    record = json.loads(store["ns/member/0"])
    assert steps.server.taken == [0, 1, 2]  # the ready step's snapshot, then steps 12 and 14
    assert (record["snapshot_step"], record["version"], record["score"], record["step"]) == (14, 2, 0.5, 10)
    assert record.get("copied", False) is (event == "rejuvenate")


def test_a_member_waits_for_peers_a_fraction_of_its_own_last_interval(monkeypatch):
    """The wait's bound is ``wait_for_peers`` times the time since the member's previous ready step began
    (or it started), its wait left out: it follows the member's own pace and does not grow with the run.
    Stragglers are those that have not scored at its previous ready step (none at its first). Having
    finished its ready step, it waits what is left of the bound for the peers that scored at it to finish it."""
    import time

    from lightning_pbt.algorithm.scheduler import MemberPlan
    from lightning_pbt.distributed.ready_steps import asynchronous
    from lightning_pbt.distributed.ready_steps.base import Observation

    bounds, finishing = [], []
    waited_for = []

    def spy(read, me, step, seconds, since=None):
        bounds.append((seconds, since))
        waited_for.append(step)
        time.sleep(0.01)
        return 0.01

    def spy_finish(read, condition, seconds):
        finishing.append(seconds)
        return 0.0

    monkeypatch.setattr(asynchronous, "wait_for_peers", spy)
    monkeypatch.setattr(asynchronous, "wait_until", spy_finish)
    # It copied a snapshot 30 steps ahead of its own step once: it waits for the others' steps, not for
    # them to reach its progress (a whole interval later).
    book = PopulationBook(
        population={0: {"hyperparameters": {"lr": 0.1}, "progress_offset": 30}}, hyperparameters={"lr": 0.1}
    )
    store = _Store()
    steps = _asynchronous(store, book, wait_for_peers=0.5)
    steps._shared_decision, _ = _deciding(MemberPlan(0, "keep", 0, {"lr": 0.1}, ()))
    steps._publish(0, 0, None, version=-1, done=False)
    published, finished = [], []
    for step, interval in ((10, 0.4), (20, 0.1)):
        time.sleep(interval)
        steps.step(Observation(0.5, False, step, 0))
        published.append(steps._record["interval_s"])
        finished.append(json.loads(store[steps._record_key(0)])["finished_step"])
    (first, first_since), (second, second_since) = bounds
    assert 0.2 <= first < 0.35 and 0.05 <= second < 0.15  # not 0.25: measured from the last ready step
    assert (first_since, second_since) == (None, 10)
    assert published == pytest.approx([2 * first, 2 * second])  # the record tells the others its pace
    assert finishing == pytest.approx([first - 0.01, second - 0.01]) and finished == [10, 20]
    assert waited_for == [10, 20]


def test_a_members_other_ranks_wait_for_its_decision_as_long_as_its_leader_may_wait_for_peers():
    """Rank 1 of a member reads its leader's decision from the store: it waits the store's timeout plus
    what the leader may spend waiting for peers (``wait_for_peers`` of an interval can exceed the timeout
    on long intervals), not the store's timeout alone."""
    import time
    from datetime import timedelta

    from lightning_pbt.algorithm.scheduler import MemberPlan
    from lightning_pbt.distributed.ready_steps.base import Observation

    class Store(_Store):
        timeout = timedelta(minutes=10)

        def __init__(self):
            super().__init__()
            self.waited = []

        def wait(self, keys, timeout):
            self.waited.append(timeout)

        def get(self, key):
            return json.dumps({"plan": {}, "view": {}, "compared": {}})

    store = Store()
    steps = _asynchronous(store, world_rank=1, member_size=2, wait_for_peers=1.0)
    steps._shared_decision(Observation(0.5, False, 10, 0), 0, leader_wait_s=1200.0)
    assert store.waited == [timedelta(minutes=30)]
    # At a ready step, that is wait_for_peers times the interval just ended.
    steps._shared_decision, asked = _deciding(MemberPlan(0, "keep", 0, {"lr": 0.1}, ()))
    time.sleep(0.2)
    steps.step(Observation(0.5, False, 10, 0))
    assert len(asked) == 1 and 0.2 <= asked[0] < 1.0


def test_an_asynchronous_member_keeps_what_it_trained_with_at_its_last_ready_step():
    """At its last ready step (no training follows) a member does not decide, copy or explore: it still
    publishes its score and snapshot (a donor to members still training) and records ``extra.last``."""
    from lightning_pbt.algorithm.scheduler import MemberPlan
    from lightning_pbt.distributed.ready_steps.base import Observation

    store = _Store()
    steps = _asynchronous(store)
    steps._shared_decision, asked = _deciding(MemberPlan(0, "rejuvenate", 0, {"lr": 0.2}, ("lr: 0.1 -> 0.2",)))
    steps._publish(0, 0, None, version=-1, done=False)
    result = steps.step(Observation(0.5, False, 10, 0, last=True))
    assert asked == [] and result.plan == MemberPlan(0, "keep", 0, {"lr": 0.1}, ())
    assert steps.book.hyperparameters == {"lr": 0.1} and steps.member.weights[0, 0] == 3.0
    record = json.loads(store["ns/member/0"])
    assert (record["score"], record["version"]) == (0.5, 0) and steps.server.taken == [0]
    pushed = [json.loads(value) for key, value in store.items() if "/lineage/" in key]
    assert pushed and pushed[-1][0]["extra"]["last"] is True and pushed[-1][0]["event"] == "keep"
    steps.step(Observation(0.6, False, 20, 1))  # not its last: it decides as usual
    assert len(asked) == 1 and steps.book.hyperparameters == {"lr": 0.2}


def test_asynchronous_decisions_are_announced_once_each_as_the_drain_writes_them():
    """No population step in asynchronous mode: population rank 0 prints one line per member decision that
    copied or re-initialised, from the lines its drain writes (every member's, not only its own)."""
    from lightning_pbt.algorithm.lineage import LineageRecord
    from lightning_pbt.distributed.ready_steps.asynchronous import announcer

    said = []
    records = [
        LineageRecord(40, 1, 2, 0.5, "exploit", 1, {"lr": 0.2}, ["lr: 0.25 -> 0.2 (x0.8)"], donor_step=36),
        LineageRecord(40, 1, 0, 0.9, "keep", 0, {"lr": 0.1}),
        LineageRecord(44, 1, 3, None, "rejuvenate", 3, {"lr": 0.3}),
    ]
    announcer(said.append, "val")(records)
    assert said == [
        "PBT member 2 at its step 40 (val 0.5): copied member 1's step 36, lr: 0.25 -> 0.2 (x0.8)",
        "PBT member 3 at its step 44 (val n/a): got fresh weights",
    ]
