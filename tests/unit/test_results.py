"""A finished population read back (lightning_pbt.results, python -m lightning_pbt) and what the console
says (lightning_pbt.plugin.console): the ready-step line, printing past a progress bar, each error once."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lightning_pbt import results
from lightning_pbt.algorithm.explore import Explorer, perturbation_note
from lightning_pbt.algorithm.results import MemberResult, PopulationResults
from lightning_pbt.algorithm.scheduler import MemberPlan
from lightning_pbt.algorithm.space import IntUniform, LogUniform, Uniform
from lightning_pbt.distributed.ready_steps.base import missing_monitor_message
from lightning_pbt.plugin import console
from lightning_pbt.plugin.replay import PBTReplay
from lightning_pbt.tools.command import main


def population(checkpoint: str | None = "best.ckpt") -> PopulationResults:
    members = [
        MemberResult(0, 0.5, 40, {"lr": 0.1}, 0, copied_from=2),
        MemberResult(1, None, 40, {"lr": 0.2}, 1),
        MemberResult(2, 0.9, 40, {"lr": 0.05}, 2, checkpoint),
    ]
    return PopulationResults(results.rank_results(members, "max"), "val_acc", "max", "/run")


def test_the_summary_ranks_members_best_first_and_names_the_checkpoint():
    text = results.summary_text(population())
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| member")]
    assert [row.split(" | ")[0] for row in rows] == ["| 2", "| 0", "| 1"]
    assert rows[1] == "| 0 | 0.5 | 40 | 0.1 | 2 |"  # its last copy, from member 2
    assert rows[-1] == "| 1 | n/a | 40 | 0.2 | - |"  # never copied
    assert "Best member: 2 (val_acc 0.9)" in text and "Its checkpoint: best.ckpt" in text
    assert "Its checkpoint: none saved" in results.summary_text(population(None))
    nobody = PopulationResults([MemberResult(0, None, 4, {}, 0)], "val_acc", "max")
    assert nobody.best is None and "No member has a finite score." in results.summary_text(nobody)


def test_results_round_trip_and_the_best_checkpoint_from_a_run_folder(tmp_path):
    model = nn.Linear(3, 2)
    checkpoint = tmp_path / "member_2" / "best.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    written = results.write_results(population(str(checkpoint)), tmp_path / "pbt" / results.RESULTS_FILE)
    loaded = results.load_results(tmp_path)
    assert loaded == population(str(checkpoint)) and results.load_results(written) == loaded
    assert json.loads(written.read_text())["best_member"] == 2
    assert results.best_checkpoint(tmp_path) == str(checkpoint)

    class Loader:
        @classmethod
        def load_from_checkpoint(cls, path, **kwargs):
            return path, kwargs

    assert results.load_best_model(tmp_path, Loader, map_location="cpu") == (str(checkpoint), {"map_location": "cpu"})
    checkpoint.unlink()
    with pytest.raises(FileNotFoundError, match=r"member 2's checkpoint .* is gone"):
        results.best_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="PopulationBasedTraining writes it when fit ends"):
        results.load_results(tmp_path / "member_2")


def test_the_command_line_prints_the_best_member(tmp_path, capsys):
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_bytes(b"x")
    results.write_results(population(str(checkpoint)), tmp_path / "pbt" / results.RESULTS_FILE)
    assert main(["best", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Best member: 2 (val_acc 0.9)" in out and f"load_from_checkpoint('{checkpoint}')" in out
    assert main(["best", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["best", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best_checkpoint_path"] == str(checkpoint)
    checkpoint.unlink()  # the run folder moved or was cleaned: say so, do not print a path that does not load
    assert main(["best", str(tmp_path)]) == 2
    assert "is gone" in capsys.readouterr().err


def test_a_rerun_moves_the_previous_runs_outputs_aside_together(tmp_path):
    assert results.set_aside_previous_run(tmp_path) is None
    for name in ("lineage.jsonl", "results.json", "scores.png", "member_3.ckpt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "notes.txt").write_text("the user's")
    first = results.set_aside_previous_run(tmp_path)
    assert first == tmp_path / "previous_1"
    assert sorted(p.name for p in first.iterdir()) == ["lineage.jsonl", "member_3.ckpt", "results.json", "scores.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "previous_1"]
    (tmp_path / "lineage.jsonl").write_text("second")
    assert results.set_aside_previous_run(tmp_path) == tmp_path / "previous_2"


# -- the console ---------------------------------------------------------------------------------
def plans() -> dict[int, MemberPlan]:
    return {
        0: MemberPlan(0, "exploit", 2, {"lr": 0.06}, ("lr: 0.1 -> 0.06 (resampled)",)),
        1: MemberPlan(1, "rejuvenate", 1, {"lr": 0.2}),
        2: MemberPlan(2, "keep", 2, {"lr": 0.05}),
        3: MemberPlan(3, "keep", 3, {"lr": 0.01}),
    }


def test_one_line_says_who_copied_whom_with_what_values():
    line = console.ready_step_line(40, plans(), {0: 0.5, 1: None, 2: 0.9, 3: 0.95}, "val_loss", "min")
    assert line == (
        "PBT step 40: best member 0 (val_loss 0.5); member 0 copied member 2, lr: 0.1 -> 0.06 (resampled); "
        "member 1 got fresh weights; 2, 3 kept"
    )
    kept = {m: MemberPlan(m, "keep", m, {}) for m in range(2)}
    assert console.ready_step_line(8, kept, {0: None, 1: None}, "acc", "max", last=True) == (
        "PBT step 8: no member has a finite acc; every member kept (last ready step: no explore)"
    )


def test_the_line_goes_through_the_progress_bar_when_it_shows(capsys):
    printed = []
    bar = SimpleNamespace(is_enabled=True, print=printed.append)
    console.say(SimpleNamespace(progress_bar_callback=bar), "PBT step 1")
    assert printed == ["PBT step 1"] and capsys.readouterr().out == ""
    bar.is_enabled = False
    console.say(SimpleNamespace(progress_bar_callback=bar), "PBT step 2")
    console.say(SimpleNamespace(progress_bar_callback=None), "PBT step 3")
    assert printed == ["PBT step 1"] and capsys.readouterr().out == "PBT step 2\nPBT step 3\n"


def _raise_through_the_hook(
    error: BaseException, first: dict | None, member: int, rank: int, capsys, lane_members: list[int] | None = None
) -> str:
    previous = sys.excepthook
    try:
        recorded = None if first is None else json.dumps(first)
        console.install_error_hook(member, rank, lambda: recorded, lane_members or ())
        try:
            raise error
        except BaseException as raised:
            sys.excepthook(type(raised), raised, raised.__traceback__)
    finally:
        sys.excepthook = previous
    return capsys.readouterr().err


def test_an_error_every_rank_raised_is_printed_by_the_first_failure_only_and_names_the_member(capsys):
    first = {"rank": 1, "reason": "member 1 (world rank 1) raised RuntimeError: the decision failed"}
    printed = _raise_through_the_hook(RuntimeError("the decision failed"), first, 1, 1, capsys)
    assert "[member 1, rank 1] Traceback" in printed
    assert "[member 1, rank 1] RuntimeError: the decision failed" in printed
    assert _raise_through_the_hook(RuntimeError("the decision failed"), first, 2, 2, capsys) == ""
    own = _raise_through_the_hook(ValueError("its own"), first, 2, 2, capsys)  # another failure: printed
    assert "[member 2, rank 2] ValueError: its own" in own
    assert "[member 0, rank 0] Traceback" in _raise_through_the_hook(KeyError("x"), None, 0, 0, capsys)


def test_members_taking_turns_name_the_member_whose_lane_raised(capsys):
    """Process 1 hosts members 2 and 3 (members_per_process=2); lane 1's error is re-raised on the main
    thread, whose hook was installed by either lane: the label names member 3."""
    error = ValueError("in lane 1")
    console.mark_failed_lane(error, 1)
    console.mark_failed_lane(error, 0)  # the first mark stays (the lane that raised)
    first = {"rank": 1, "reason": "member 3 (world rank 1) raised ValueError: in lane 1"}
    printed = _raise_through_the_hook(error, first, 2, 1, capsys, lane_members=[2, 3])
    assert "[member 3, rank 1] ValueError: in lane 1" in printed and "[member 2" not in printed
    assert "[member 2, rank 1] KeyError" in _raise_through_the_hook(KeyError("x"), None, 2, 1, capsys, [2, 3])


def test_a_rank_stopped_by_another_ones_failure_says_so_in_one_line(capsys):
    from lightning_pbt.distributed.collectives import PopulationAborted

    printed = _raise_through_the_hook(PopulationAborted("another rank failed"), None, 3, 3, capsys)
    assert printed == "[member 3, rank 3] stopped: another rank failed\n"


@pytest.mark.parametrize(
    ("reason", "line"),
    [
        ("lightning-pbt-snapshot-server-1 failed: RuntimeError: injected", "lightning-pbt-snapshot-server-1 failed: "
         "RuntimeError: injected"),
        ("member 2 (world rank 2) raised ValueError: x", "member 2 (world rank 2) failed; its error is printed there"),
    ],
)
def test_a_rank_that_sees_the_abort_flag_first_prints_the_watchdogs_words(reason, line, capsys, monkeypatch):
    """The training thread and the watchdog race to see another rank's abort flag; either way the rank's one
    line names the cause as the watchdog does (it once printed the flag's raw JSON)."""
    from lightning_pbt.distributed import collectives

    flag = json.dumps({"rank": 1, "reason": reason})
    monkeypatch.setattr(collectives.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(collectives.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    store = SimpleNamespace(check=lambda keys: True, get=lambda key: flag.encode())
    with pytest.raises(SystemExit):
        collectives.PopulationWatchdog(store, rank=0, interval=0.001).run()
    assert capsys.readouterr().out == f"[lightning_pbt rank 0] stopped: {line}\n"

    with pytest.raises(collectives.PopulationAborted) as caught:
        collectives.PopulationGroup.raise_if_aborted(SimpleNamespace(abort_reason=lambda: flag))
    printed = _raise_through_the_hook(caught.value, json.loads(flag), 0, 0, capsys)
    assert printed == f"[member 0, rank 0] stopped: {line}\n"


# -- smaller things ----------------------------------------------------------------------------------
def test_a_clipped_perturbation_says_so_with_the_real_factor():
    lr, layers = LogUniform(1e-4, 0.1), IntUniform(1, 8)
    assert perturbation_note(lr, 0.05, 1.2, 0.06) == "x1.2"
    assert perturbation_note(lr, 0.095, 1.2, 0.1) == "x1.2, clipped at high 0.1: x1.053"
    assert perturbation_note(Uniform(0.1, 0.5), 0.11, 0.8, 0.1) == "x0.8, clipped at low 0.1: x0.9091"
    assert perturbation_note(layers, 8, 1.2, 8) == "x1.2, clipped at high 8: x1"
    explorer = Explorer({"lr": lr}, perturbation_factors=(1.2,), resample_probability=0)
    _, mutations = explorer.explore({"lr": 0.095}, np.random.default_rng(0))
    assert mutations == ["lr: 0.095 -> 0.1 (x1.2, clipped at high 0.1: x1.053)"]


def test_the_missing_monitor_error_lists_the_logged_metrics():
    text = missing_monitor_message("val_accuracy", [0, 1], ["val_acc", "train_loss"])
    assert text.endswith("the metrics logged were ['train_loss', 'val_acc'] (did you mean 'val_acc'?)")
    assert "member(s) [0, 1]" in text
    assert missing_monitor_message("score", [2], []).endswith("no metric was logged at this validation")
    assert "did you mean" not in missing_monitor_message("zzz", [0], ["val_acc"])
    # Population rank 0 hosts no member that missed it: what was logged is not known there, so not named.
    assert missing_monitor_message("score", [2], None).endswith("in validation_step")


def test_replay_knows_pbts_score_for_its_schedule(tmp_path):
    schedule = tmp_path / "schedule.json"
    entries = [{"step": 0, "hyperparameters": {"lr": 1}}]
    schedule.write_text(json.dumps({"member": 3, "score": 0.97, "schedule": entries}))
    replay = PBTReplay(str(schedule))
    assert (replay.pbt_member, replay.pbt_score) == (3, 0.97)
    given = PBTReplay([(0, {"lr": 0.1})])
    assert (given.pbt_member, given.pbt_score) == (None, None)
