"""bench/applications.py's bookkeeping (no launch): which member an arm reports, paired wins in the right
direction, a summary of an interrupted run that counts only seeds where every arm finished, the grid
and the options of ``python -m bench --only applications``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.applications import APPS, DEFAULT_ARMS, arm_result, collect, grid_points, plan
from bench.applications_report import render_section, trained_schedule


def member(index: int, val: float | None, test: float) -> dict:
    return {"arm": "pbt", "member": index, "val": val, "test": test, "fit_s": 1.0, "steps": 10,
            "hyperparameters": {"lr": 0.1}}


def test_arm_reports_the_test_metric_of_the_best_validation_member():
    members = [member(3, None, 1.0), member(2, 0.7, 0.8), member(1, 0.7, 0.6), member(0, 0.5, 0.9)]
    best = arm_result(members, "max")
    assert (best["member"], best["test"]) == (1, 0.6)  # the best validation, ties to the lower id; not the best test
    assert best["member_tests"] == [0.9, 0.6, 0.8, 1.0]  # every member's, in member order
    best = arm_result(members, "min")
    assert (best["member"], best["test"]) == (0, 0.9)  # an unscored member is never chosen


def write_arm(root: Path, app: str, seed: int, arm: str, tests: list[float]) -> None:
    out = root / app / f"seed{seed}_{arm}"
    out.mkdir(parents=True)
    for index, value in enumerate(tests):
        (out / f"member_{index}.json").write_text(json.dumps(member(index, value, value)))
    (out / "wall.json").write_text(json.dumps({"wall_s": 5.0}))


def test_summary_of_an_interrupted_run_uses_complete_seeds_only(tmp_path):
    app = "language_model"  # lower perplexity is better
    for seed, (pbt, other) in enumerate([(10.0, 11.0), (12.0, 11.0), (9.0, 11.0)]):
        for arm in DEFAULT_ARMS:
            write_arm(tmp_path, app, seed, arm, [pbt if arm == "pbt" else other, 99.0])
    write_arm(tmp_path, app, 3, "pbt", [1.0, 2.0])  # seed 3 stopped after its first arm
    for arm in DEFAULT_ARMS:  # a saturated task: every member of every arm at the same return
        write_arm(tmp_path, "reinforcement_learning", 0, arm, [-500.0, -500.0])
    summary = collect(tmp_path)["apps"][app]
    assert summary["complete_seeds"] == [0, 1, 2]
    assert summary["summary"]["pbt"]["test"] == {"median": 10.0, "q1": 9.5, "q3": 11.0, "iqr": 1.5, "n": 3}
    # differences (theirs - ours, lower is better) +1, -1, +2: two wins, one loss
    versus = summary["pbt_vs"]["grid"]
    assert (versus["wins"], versus["ties"], versus["losses"]) == (2, 0, 1)
    assert versus["sign_p"] == pytest.approx(1.0)  # 2 * P(X <= 1 | n = 3) = 2 * 4/8, capped
    # ranks 1.5, 1.5, 3; T- = 1.5; of the 8 subsets of {1.5, 1.5, 3}, three sum to <= 1.5: 2 * 3/8
    assert versus["wilcoxon_p"] == pytest.approx(0.75)
    assert set(summary["per_seed"]) == {"0", "1", "2", "3"}
    assert set(collect(tmp_path)["apps"]) == set(APPS)
    # per seed, every member of random search against every member of the defaults
    assert summary["separation"]["0"]["random_configurations"]["range"] == pytest.approx(88.0)
    assert summary["separation"]["0"]["iqr_ratio"] == pytest.approx(1.0)
    assert not summary["separation"]["0"]["separates"]
    text = "\n".join(render_section({**collect(tmp_path), "command": "python -m bench", "date": "today",
                                     "wall_s": 60.0, "failures": [],
                                     "config": {**collect(tmp_path)["config"], "seeds": [0, 1, 2], "population": 16,
                                                "processes": 2, "members_per_process": 8}}))
    assert "| best of a 4x4 grid | 11.000 [11.000, 11.000] | 2/0/1 | 1.000 | 0.750 | 5 |" in text


def test_published_schedule_leaves_out_values_set_after_the_last_training_step():
    entry = {"steps": [480], "schedule": [{"step": 0, "lr": 1.0}, {"step": 336, "lr": 2.0}, {"step": 480, "lr": 3.0}]}
    assert [e["step"] for e in trained_schedule(entry)] == [0, 336]


def test_the_population_4_results_stay_readable():
    published = json.loads((Path(__file__).parents[2] / "bench" / "results" / "applications_p4.json").read_text())
    text = "\n".join(render_section(published))
    assert "best of a 2x2 grid" in text and "4 members x 1 rank per arm" in text
    # the statistics end the first paragraph, not the note on arms kept from an earlier run after it
    assert "best final validation score, median [min, max] over seeds;" in text
    assert "own wall time is in the JSON.\n" in text


def test_the_population_16_results_stay_readable():
    """A table summarised over several runs names them in one sentence, and a return's spread prints as a
    number (17.4), not as its one significant digit (2e+01)."""
    published = json.loads((Path(__file__).parents[2] / "bench" / "results" / "applications.json").read_text())
    text = "\n".join(render_section(published))
    rl = published["apps"]["reinforcement_learning"]
    assert len(rl["runs"]) >= 2
    task_line = next(line for line in text.splitlines() if line.startswith("**reinforcement_learning**"))
    assert task_line.count("Summarised by") == 1 and task_line.count("`python -m bench") == len(rl["runs"])
    spreads = [line for line in text.splitlines() if line.startswith("Seed ") and "held-out" in line]
    assert spreads and not any("e+" in line for line in spreads)
    first = rl["separation"][min(rl["separation"], key=int)]["random_configurations"]["iqr"]
    assert f"spans IQR {first:.3g} " in text


def test_grid_is_square_with_the_first_axis_outermost():
    points = grid_points("image_classification", 16)
    assert len(points) == 16
    assert [(p["lr"], p["augment"]) for p in points[:5]] == [(0.01, 0.0), (0.01, 0.25), (0.01, 0.5), (0.01, 1.0),
                                                            (0.03, 0.0)]
    assert {p["label_smoothing"] for p in points} == {0.1}
    # population 4: the 2 x 2 grid of the published population-4 results
    assert [(p["lr"], p["dropout"]) for p in grid_points("language_model", 4)] == [
        (1e-3, 0.0), (1e-3, 0.1), (3e-3, 0.0), (3e-3, 0.1)]
    with pytest.raises(ValueError, match="population of 4 or 16"):
        grid_points("reinforcement_learning", 8)


def test_plan_defaults_and_refusals():
    full = plan()
    assert (full.population, full.members_per_process, full.processes) == (16, 8, 2)
    assert full.seeds == tuple(range(10)) and full.arms == DEFAULT_ARMS
    smoke = plan(smoke=True)
    assert (smoke.population, smoke.members_per_process, smoke.seeds) == (4, 2, (0,))
    assert plan(population=4).members_per_process == 1  # the layout of the population-4 results
    chosen = plan(seeds=[10, 11], population=16, members_per_process=4, apps=["language_model"], arms=["pbt"])
    assert (chosen.seeds, chosen.processes, chosen.apps, chosen.arms) == ((10, 11), 4, ("language_model",), ("pbt",))
    with pytest.raises(ValueError, match="multiple of --members-per-process"):
        plan(population=16, members_per_process=3)
    with pytest.raises(ValueError, match="population of 4 or 16"):
        plan(population=8)  # the grid arm has no 8-point grid
    assert plan(population=8, arms=["pbt", "random_search"]).processes == 2
    with pytest.raises(ValueError, match="unknown arm"):
        plan(arms=["hyperband"])


def test_a_second_run_keeps_arms_measured_with_the_same_launch_config(tmp_path, monkeypatch):
    import bench.applications as applications

    launched: list[tuple[str, str, int, int]] = []

    def fake_launch(module, nproc, cfg, timeout, log_path):  # stands in for the processes of one arm
        launched.append((cfg["app"], cfg["arm"], cfg["seed"], nproc))
        for index in range(nproc * cfg["members_per_process"]):
            Path(cfg["out"], f"member_{index}.json").write_text(json.dumps(member(index, 0.5, 0.5)))

    monkeypatch.setattr(applications, "launch", fake_launch)
    monkeypatch.setattr(applications, "SCRATCH", tmp_path)
    arms = ["pbt", "grid"]
    every_arm = len(APPS) * len(arms)
    payload = applications.run(seeds=[0], arms=arms)
    assert payload["config"]["arms_kept_from_an_earlier_run"] == 0
    assert len(launched) == every_arm and {n for *_, n in launched} == {2}  # 16 members as 2 processes x 8
    assert all(e["members"] == 16 for a in payload["apps"].values() for e in a["per_seed"]["0"].values())
    payload = applications.run(seeds=[0], arms=arms)  # the same configs: nothing runs again
    assert len(launched) == every_arm and payload["config"]["arms_kept_from_an_earlier_run"] == every_arm
    assert all(a["complete_seeds"] == [0] for a in payload["apps"].values())
    monkeypatch.setitem(APPS["language_model"], "overrides", ["trainer.max_steps=10"])
    applications.run(seeds=[0, 1], arms=arms)  # a changed config runs again; a new seed runs for every app
    assert sorted(launched[every_arm:]) == sorted(
        [("language_model", arm, 0, 2) for arm in arms] + [(app, arm, 1, 2) for app in APPS for arm in arms])
    # a run summarises its own seeds, not every seed on disk
    assert all(a["complete_seeds"] == [1] for a in applications.run(seeds=[1], arms=arms)["apps"].values())
    applications.run(seeds=[1], arms=arms, members_per_process=4)  # another layout: its own folder, runs again
    assert launched[-1][-1] == 4


def test_a_pilots_overrides_follow_the_apps_own_and_are_named_in_the_results(tmp_path, monkeypatch):
    import bench.applications as applications

    launched: list[dict] = []

    def fake_launch(module, nproc, cfg, timeout, log_path):
        launched.append(cfg)
        for index in range(nproc * cfg["members_per_process"]):
            Path(cfg["out"], f"member_{index}.json").write_text(json.dumps(member(index, 0.5, 0.5)))

    monkeypatch.setattr(applications, "launch", fake_launch)
    monkeypatch.setattr(applications, "SCRATCH", tmp_path)
    options = {"seeds": [100], "apps": ["image_classification"], "arms": ["random_search", "default"]}
    applications.run(**options)
    pilot = ["trainer.max_epochs=30", "pbt.every_n_epochs=3"]
    payload = applications.run(**options, overrides=pilot)
    assert len(launched) == 4  # a changed budget is another launch config: both arms run again
    own = APPS["image_classification"]["overrides"]
    assert all(cfg["overrides"] == [*own, *pilot] for cfg in launched[2:])  # after the app's own: they win
    assert payload["config"]["image_classification"]["overrides"] == [*own, *pilot]
    assert payload["config"]["image_classification"]["steps"].endswith("(before trainer.max_epochs=30 "
                                                                        "pbt.every_n_epochs=3)")
    assert APPS["image_classification"]["overrides"] == own  # the table's settings are untouched
    with pytest.raises(ValueError, match="KEY=VALUE"):
        applications.plan(overrides=["trainer.max_epochs"])


def test_the_populations_of_different_seeds_share_no_member_seed():
    from bench.applications import base_seed, worker_overrides

    members = [base_seed(s, 16) + i for s in range(10) for i in range(16)]  # the strategy's base + member id
    assert len(set(members)) == 160
    assert base_seed(0, 4) == 0 and base_seed(3, 4) == 12
    cfg = {"app": "language_model", "arm": "random_search", "seed": 2, "base_seed": base_seed(2, 16),
           "out": "/tmp/x", "overrides": ["trainer.max_steps=300"], "population": 16, "members_per_process": 8}
    overrides = worker_overrides(cfg, 2)
    assert overrides[0] == "seed=32" and "seed=2" not in overrides  # the callback's seed follows: pbt.seed=${seed}
    # the app's overrides, then the arm's: the arm's win
    assert overrides[-2:] == ["trainer.max_steps=300", "pbt.burn_in=1000000000"]


def test_a_table_is_built_over_several_runs_of_the_same_protocol(tmp_path, monkeypatch):
    """``python -m bench --only applications`` keeps what applications.json held and the run did not
    measure: a language table can take several sessions."""
    import bench.applications as applications
    from bench.__main__ import main

    scores = {"pbt": 10.0, "random_search": 11.0, "grid": 12.0, "default": 13.0}

    def fake_launch(module, nproc, cfg, timeout, log_path):
        value = scores[cfg["arm"]] + cfg["seed"] + (100 if cfg["app"] == "image_classification" else 0)
        for index in range(nproc * cfg["members_per_process"]):
            Path(cfg["out"], f"member_{index}.json").write_text(json.dumps(member(index, value, value + index)))

    monkeypatch.setattr(applications, "launch", fake_launch)
    monkeypatch.setattr(applications, "SCRATCH", tmp_path / "scratch")
    out = tmp_path / "results"

    def bench(*args: str) -> dict:
        assert main(["--only", "applications", "--out", str(out), *args]) == 0
        return json.loads((out / "applications.json").read_text())

    bench("--apps", "image_classification", "--seeds", "0", "--arms", "pbt", "random_search")
    bench("--apps", "language_model", "--seeds", "0", "1", "--arms", "pbt", "random_search")
    shutil.rmtree(tmp_path / "scratch")  # a later session: the scratch launches are gone
    scores["pbt"] = 9.0  # seed 1's pbt is measured again, and this run's launch wins
    r = bench("--apps", "language_model", "--seeds", "1", "2", "--arms", "pbt", "random_search", "grid", "default")
    language = r["apps"]["language_model"]
    assert list(r["apps"]) == ["image_classification", "language_model"]  # the app this run left out is kept
    assert r["apps"]["image_classification"]["per_seed"]["0"]["pbt"]["test"] == 110.0
    assert r["config"]["image_classification"]["overrides"] == APPS["image_classification"]["overrides"]
    assert set(language["per_seed"]) == {"0", "1", "2"}
    assert set(language["per_seed"]["0"]) == {"pbt", "random_search"}  # seed 0 from the first run only
    assert language["per_seed"]["1"]["pbt"]["test"] == 10.0 and language["per_seed"]["0"]["pbt"]["test"] == 10.0
    # every arm of either run must have finished a seed for it to count
    assert language["complete_seeds"] == [1, 2] and r["config"]["arms"] == ["pbt", "random_search", "grid", "default"]
    assert language["summary"]["pbt"]["test"]["median"] == pytest.approx(10.5)  # 10 (seed 1), 11 (seed 2)
    assert [run["seeds"] for run in language["runs"]] == [[0, 1], [1, 2]]
    assert r["config"]["seeds"] == [0, 1, 2]
    report = (out / "RESULTS.md").read_text()  # when the kept launches ran, not only when this run summarised them
    assert f"Launches finished {language['per_seed']['0']['pbt']['finished']} to " in report
    # seeds off the table (a rerun on new seeds) or a pilot's overrides replace the app's results
    r = bench("--apps", "language_model", "--seeds", "10", "--arms", "pbt", "random_search")
    assert set(r["apps"]["language_model"]["per_seed"]) == {"10"} and "image_classification" in r["apps"]
    r = bench("--apps", "language_model", "--seeds", "3", "--arms", "pbt", "random_search")
    assert set(r["apps"]["language_model"]["per_seed"]) == {"3"}  # the rerun's seed 10 stays out of the table
    r = bench("--apps", "language_model", "--seeds", "4", "--arms", "pbt", "random_search",
              "--overrides", "trainer.max_steps=10")
    assert set(r["apps"]["language_model"]["per_seed"]) == {"4"}
    # results published before amendment 1 (member seeds s + i) are never merged with later ones
    stale = json.loads((out / "applications.json").read_text())
    del stale["config"]["member_seeds"]
    (out / "applications.json").write_text(json.dumps(stale))
    assert set(bench("--apps", "language_model", "--seeds", "5", "--arms", "pbt")["apps"]) == {"language_model"}


def test_a_merged_table_draws_the_schedule_of_its_first_complete_seed():
    from bench.applications import merge_published

    def results(seeds: list[int], figure_seed: int) -> dict:
        arms = ["pbt", "random_search"]
        per_seed = {str(s): {arm: {"test": 1.0, "member_tests": [1.0], "wall_s": 1.0} for arm in arms} for s in seeds}
        return {"config": {"seeds": seeds, "arms": arms, "population": 16, "member_seeds": "P s + i",
                           "language_model": {"overrides": APPS["language_model"]["overrides"]}},
                "apps": {"language_model": {"per_seed": per_seed,
                                            "schedule_figure": {"seed": figure_seed, "member": 0, "records": []}}}}

    merged = merge_published(results([2, 3], 2), results([0, 1], 0))["apps"]["language_model"]
    assert merged["complete_seeds"] == [0, 1, 2, 3] and merged["schedule_figure"]["seed"] == 0  # the earlier run's
    merged = merge_published(results([0], 0), results([1], 1))["apps"]["language_model"]
    assert merged["schedule_figure"]["seed"] == 0  # this run's
