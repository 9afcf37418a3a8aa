"""bench/applications.py's bookkeeping (no launch): which member an arm reports, paired wins in the right
direction, and a summary of an interrupted run that counts only seeds where every arm finished."""

from __future__ import annotations

import json
from pathlib import Path

from bench.applications import APPS, arm_result, arms_for, collect, paired_wins, trained_schedule


def rank(member: int, val: float | None, test: float) -> dict:
    return {"arm": "pbt", "member": member, "val": val, "test": test, "fit_s": 1.0, "steps": 10,
            "hyperparameters": {"lr": 0.1}}


def test_arm_reports_the_test_metric_of_the_best_validation_member():
    ranks = [rank(0, 0.5, 0.9), rank(1, 0.7, 0.6), rank(2, 0.7, 0.8), rank(3, None, 1.0)]
    best = arm_result(ranks, "max")
    assert (best["member"], best["test"]) == (1, 0.6)  # the best validation, ties to the lower id; not the best test
    best = arm_result(ranks, "min")
    assert (best["member"], best["test"]) == (0, 0.9)  # an unscored member is never chosen


def test_paired_wins_follow_the_metric_direction():
    assert paired_wins([0.9, 0.5, 0.7], [0.8, 0.6, 0.7], "max") == {"wins": 1, "ties": 1, "losses": 1}
    assert paired_wins([10.0, 12.0, 5.0], [11.0, 11.0, 6.0], "min") == {"wins": 2, "ties": 0, "losses": 1}


def write_arm(root: Path, app: str, seed: int, arm: str, tests: list[float]) -> None:
    out = root / app / f"seed{seed}_{arm}"
    out.mkdir(parents=True)
    for member, value in enumerate(tests):
        (out / f"rank_{member}.json").write_text(json.dumps(rank(member, value, value)))
    (out / "wall.json").write_text(json.dumps({"wall_s": 5.0}))


def test_summary_of_an_interrupted_run_uses_complete_seeds_only(tmp_path):
    app = "language_model"  # lower perplexity is better
    for seed, (pbt, other) in enumerate([(10.0, 11.0), (12.0, 11.0)]):
        for arm in arms_for(app):
            write_arm(tmp_path, app, seed, arm, [pbt if arm == "pbt" else other, 99.0])
    write_arm(tmp_path, app, 2, "pbt", [1.0, 2.0])  # seed 2 stopped after its first arm
    summary = collect(tmp_path)["apps"][app]
    assert summary["complete_seeds"] == [0, 1]
    assert summary["summary"]["pbt"]["test"]["n"] == 2
    assert summary["pbt_vs"]["grid"] == {"wins": 1, "ties": 0, "losses": 1}
    assert set(summary["per_seed"]) == {"0", "1", "2"}
    assert set(collect(tmp_path)["apps"]) == set(APPS)


def test_published_schedule_leaves_out_values_set_after_the_last_training_step():
    entry = {"steps": [480], "schedule": [{"step": 0, "lr": 1.0}, {"step": 336, "lr": 2.0}, {"step": 480, "lr": 3.0}]}
    assert [e["step"] for e in trained_schedule(entry)] == [0, 336]


def test_a_second_run_keeps_arms_measured_with_the_same_launch_config(tmp_path, monkeypatch):
    import bench.applications as applications

    launched: list[tuple[str, str, int]] = []

    def fake_launch(module, nproc, cfg, timeout, log_path):  # stands in for the 4-rank launch
        launched.append((cfg["app"], cfg["arm"], cfg["seed"]))
        for member in range(nproc):
            Path(cfg["out"], f"rank_{member}.json").write_text(json.dumps(rank(member, 0.5, 0.5)))

    monkeypatch.setattr(applications, "launch", fake_launch)
    monkeypatch.setattr(applications, "SCRATCH", tmp_path)
    monkeypatch.setattr(applications, "SEEDS", (0,))
    every_arm = sum(len(arms_for(app)) for app in APPS)
    assert applications.run()["config"]["arms_kept_from_an_earlier_run"] == 0
    assert len(launched) == every_arm
    payload = applications.run()  # the same configs: nothing runs again
    assert len(launched) == every_arm and payload["config"]["arms_kept_from_an_earlier_run"] == every_arm
    assert all(a["complete_seeds"] == [0] for a in payload["apps"].values())
    monkeypatch.setitem(APPS["language_model"], "overrides", ["trainer.max_steps=10"])
    monkeypatch.setattr(applications, "SEEDS", (0, 1))
    applications.run()  # a changed config runs again; a new seed runs for every app
    assert sorted(launched[every_arm:]) == sorted(
        [("language_model", arm, 0) for arm in arms_for("language_model")]
        + [(app, arm, 1) for app in APPS for arm in arms_for(app)])
    monkeypatch.setattr(applications, "SEEDS", (1,))  # a run summarises its own seeds, not every seed on disk
    assert all(a["complete_seeds"] == [1] for a in applications.run()["apps"].values())
