"""bench/app_figures.py: the learning curve of an arm's best member follows its ancestry, the schedule
figure draws the lineage's values, and the report places both figures beside RESULTS.md (or says why
not). Hand-made launches (member records and a lineage), no training: milliseconds, plus the drawing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.app_figures import ancestry_curve, best_member_curve, median_curves, write_figures
from bench.applications import collect
from bench.applications_report import render_section
from lightning_pbt.algorithm.lineage import LineageRecord, LineageWriter, read_lineage
from lightning_pbt.tools.plots import hyperparameter_series

# Three members, validation every 5 steps, ready steps every 10. At step 10 member 2 copies member 0
# (and explores lr 0.3 -> 0.36); at step 20 member 1 copies member 2 (lr 0.36 -> 0.288). Every score is
# different, so a curve that takes a score from the wrong member or step shows.
HISTORIES = {
    0: [[5, 0.31], [10, 0.42], [15, 0.47], [20, 0.55], [25, 0.58], [30, 0.60]],
    1: [[5, 0.12], [10, 0.18], [15, 0.21], [20, 0.25], [25, 0.71], [30, 0.74]],
    2: [[5, 0.05], [10, 0.09], [15, 0.48], [20, 0.63], [25, 0.66], [30, 0.69]],
}
LINEAGE = [
    LineageRecord(0, 0, 0, None, "init", 0, {"lr": 0.3, "opt": "sgd"}),
    LineageRecord(0, 0, 1, None, "init", 1, {"lr": 0.01, "opt": "adam"}),
    LineageRecord(0, 0, 2, None, "init", 2, {"lr": 0.05, "opt": "adam"}),
    LineageRecord(10, 1, 0, 0.42, "keep", 0, {"lr": 0.3, "opt": "sgd"}),
    LineageRecord(10, 1, 1, 0.18, "keep", 1, {"lr": 0.01, "opt": "adam"}),
    LineageRecord(10, 1, 2, 0.09, "exploit", 0, {"lr": 0.36, "opt": "sgd"}),
    LineageRecord(20, 2, 0, 0.55, "keep", 0, {"lr": 0.3, "opt": "sgd"}),
    LineageRecord(20, 2, 1, 0.25, "exploit", 2, {"lr": 0.288, "opt": "sgd"}),
    LineageRecord(20, 2, 2, 0.63, "keep", 2, {"lr": 0.36, "opt": "sgd"}),
    LineageRecord(30, 3, 0, 0.60, "keep", 0, {"lr": 0.3, "opt": "sgd"}),
    LineageRecord(30, 3, 1, 0.74, "keep", 1, {"lr": 0.288, "opt": "sgd"}),
    LineageRecord(30, 3, 2, 0.69, "keep", 2, {"lr": 0.36, "opt": "sgd"}),
]


def write_launch(out: Path, arm: str, histories: dict, lineage: list | None, wall_s: float = 5.0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for member, history in histories.items():
        (out / f"member_{member}.json").write_text(json.dumps({
            "arm": arm, "member": member, "val": history[-1][1], "test": history[-1][1] - 0.01, "fit_s": 1.0,
            "steps": history[-1][0], "monitor": "val_acc", "history": history, "hyperparameters": {"lr": 0.1}}))
    if lineage is not None:
        with LineageWriter(out / "pbt" / "lineage.jsonl") as writer:
            writer.write(lineage)
    (out / "wall.json").write_text(json.dumps({"wall_s": wall_s}))


def test_best_members_curve_is_the_donors_score_before_each_copy_and_its_own_after(tmp_path):
    write_launch(tmp_path, "pbt", HISTORIES, LINEAGE)
    members = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("member_*.json"))]
    # member 1's final weights: member 0's up to step 10, member 2's (a copy of them) up to 20, its own after
    assert best_member_curve(tmp_path, members, 1) == [
        [5, 0.31, 0], [10, 0.42, 0], [15, 0.48, 2], [20, 0.63, 2], [25, 0.71, 1], [30, 0.74, 1]]
    # member 2 copied once; member 0 never: its own history
    assert best_member_curve(tmp_path, members, 2) == [
        [5, 0.31, 0], [10, 0.42, 0], [15, 0.48, 2], [20, 0.63, 2], [25, 0.66, 2], [30, 0.69, 2]]
    assert best_member_curve(tmp_path, members, 0) == [[s, v, 0] for s, v in HISTORIES[0]]


def test_an_arm_without_lineage_plots_the_members_own_history(tmp_path):
    write_launch(tmp_path, "grid", HISTORIES, None)
    members = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("member_*.json"))]
    assert best_member_curve(tmp_path, members, 2) == [[s, v, 2] for s, v in HISTORIES[2]]
    del members[2]["history"]  # a launch from before the history was recorded: no curve, not a wrong one
    assert best_member_curve(tmp_path, members, 2) is None


def test_ancestry_curve_leaves_out_the_score_of_weights_dropped_at_a_copy():
    histories = {0: [[4, 1.0], [8, 2.0]], 1: [[4, 10.0], [8, 20.0], [12, 30.0]]}
    # newest first: member 1 from its copy at step 4 to 12, before that member 0 up to step 4
    assert ancestry_curve(histories, [(1, 4, 12), (0, 0, 4)]) == [[4, 1.0, 0], [8, 20.0, 1], [12, 30.0, 1]]


def test_median_curve_over_seeds_per_step():
    per_seed = {str(seed): {"pbt": {"curve": [[5, v5, 0], [10, v10, 0]]}, "grid": {"curve": None}}
                for seed, (v5, v10) in enumerate([(0.1, 0.4), (0.3, None), (0.2, 0.8), (0.9, 0.6)])}
    curves = median_curves(per_seed, ["0", "1", "2", "3"], ["pbt", "grid"])
    # step 5: 0.1 0.2 0.3 0.9 -> median 0.25, quartiles (inclusive) 0.175 and 0.45; step 10: 0.4 0.6 0.8
    assert curves["pbt"] == [[5, pytest.approx(0.25), pytest.approx(0.175), pytest.approx(0.45), 4],
                             [10, pytest.approx(0.6), pytest.approx(0.5), pytest.approx(0.7), 3]]
    assert "grid" not in curves  # no curve at all: no line
    assert median_curves(per_seed, ["2"], ["pbt"])["pbt"] == [[5, 0.2, 0.2, 0.2, 1], [10, 0.8, 0.8, 0.8, 1]]


def test_schedule_series_are_each_members_own_values_from_the_lineage():
    assert hyperparameter_series(LINEAGE, "lr") == {
        0: [(0, 0.3), (10, 0.3), (20, 0.3), (30, 0.3)],
        1: [(0, 0.01), (10, 0.01), (20, 0.288), (30, 0.288)],
        2: [(0, 0.05), (10, 0.36), (20, 0.36), (30, 0.36)],
    }
    assert hyperparameter_series(LINEAGE, "opt")[2] == [(0, "adam"), (10, "sgd"), (20, "sgd"), (30, "sgd")]
    assert hyperparameter_series(LINEAGE, "momentum") == {}


def applications_payload(root: Path) -> dict:
    payload = collect(root, apps=("image_classification",), arms=("pbt", "grid"))
    payload["config"].update(seeds=[0, 1], population=16, processes=2, members_per_process=8, arms=["pbt", "grid"])
    return {**payload, "command": "python -m bench --only applications", "date": "today", "wall_s": 60.0,
            "failures": []}


def two_seeds(root: Path) -> None:
    for seed in (0, 1):
        app = root / "image_classification"
        shifted = {m: [[s, round(v - 0.1 * seed, 6)] for s, v in h] for m, h in HISTORIES.items()}
        write_launch(app / f"seed{seed}_pbt", "pbt", shifted, LINEAGE)
        write_launch(app / f"seed{seed}_grid", "grid", {m: [[s, v - 0.05 * seed] for s, v in h]
                                                         for m, h in HISTORIES.items()}, None)


def drawn_lines(monkeypatch) -> list:
    """The figures drawn, instead of their files."""
    import lightning_pbt.tools.plots as plots

    figures: list = []

    def keep(figure, path):
        figures.append((Path(path).name, figure))
        return Path(path)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def test_figures_draw_the_curves_and_the_lineages_values(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    two_seeds(tmp_path / "raw")
    interrupted = {m: [[s, v + 0.5] for s, v in h] for m, h in HISTORIES.items()}  # seed 2: PBT only, not complete
    write_launch(tmp_path / "raw" / "image_classification" / "seed2_pbt", "pbt", interrupted, LINEAGE)
    payload = applications_payload(tmp_path / "raw")
    a = payload["apps"]["image_classification"]
    assert a["per_seed"]["1"]["pbt"]["curve"][2] == [15, 0.38, 2]  # collect keeps each arm's curve
    assert a["per_seed"]["0"]["grid"]["member"] == 1  # best final validation 0.74
    figures = drawn_lines(monkeypatch)
    drawn = write_figures(payload, tmp_path)
    assert drawn["apps"]["image_classification"]["schedule_member"] == 1
    (curves_name, curves), (schedule_name, schedule) = figures
    assert (curves_name, schedule_name) == ("applications_image_classification_curves.png",
                                           "applications_image_classification_schedule.png")
    pbt, grid = curves.axes[0].get_lines()
    assert [t.get_text() for t in curves.axes[0].get_legend().get_texts()] == ["PBT (truncation)", "best of a 4x4 grid"]
    # the ancestry (0.31 0.42 0.48 0.63 0.71 0.74 at seed 0, 0.1 less at seed 1): median of two seeds
    assert list(pbt.get_ydata()) == pytest.approx([0.26, 0.37, 0.43, 0.58, 0.66, 0.69])
    band = curves.axes[0].collections[0].get_paths()[0].vertices[:, 1]  # seed 2 is not complete: left out
    assert (band.min(), band.max()) == pytest.approx((0.31 - 0.075, 0.74 - 0.025))  # q1 at the first, q3 at the last
    assert drawn["apps"]["image_classification"]["seeds"] == [0, 1]
    assert list(grid.get_ydata()) == pytest.approx([v - 0.025 for _, v in HISTORIES[1]])  # median of 2 seeds
    lr = schedule.axes[0 if schedule.axes[0].get_ylabel() == "lr" else 1]
    *grey, bold = lr.get_lines()
    assert [list(line.get_ydata()) for line in grey] == [[v for _, v in s] for s in
                                                        hyperparameter_series(LINEAGE, "lr").values()]
    # member 1's schedule: member 0's lr until its donor copied at 10, then 0.36, then its own 0.288 to the end
    assert list(bold.get_xdata()) == [0, 10, 20, 30] and list(bold.get_ydata()) == [0.3, 0.36, 0.288, 0.288]


def test_report_writes_the_figures_beside_results_and_links_them(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.report import write_report

    two_seeds(tmp_path / "raw")
    payload = applications_payload(tmp_path / "raw")
    payload.update(machine={"cpu_model": "cpu", "cores": 2}, versions={"python": "3", "torch": "2",
                                                                      "pytorch_lightning": "2"})
    (tmp_path / "applications.json").write_text(json.dumps(payload))
    text = write_report(tmp_path).read_text()
    for name in ("curves", "schedule"):
        relative = f"figures/applications_image_classification_{name}.png"
        assert f"]({relative})" in text
        assert (tmp_path / relative).read_bytes().startswith(b"\x89PNG")
    assert "follows the member's ancestry" in text and "seed 0" in text


def test_without_matplotlib_nothing_is_drawn_and_the_report_says_so(tmp_path, monkeypatch):
    two_seeds(tmp_path / "raw")
    payload = applications_payload(tmp_path / "raw")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    drawn = write_figures(payload, tmp_path)
    assert drawn["apps"] == {} and "matplotlib is not installed" in drawn["note"]
    assert not (tmp_path / "figures").exists()
    text = "\n".join(render_section(payload, drawn))
    assert "matplotlib is not installed" in text and "![" not in text


def test_schedule_figure_keeps_the_lineage_of_the_first_complete_seed(tmp_path):
    two_seeds(tmp_path / "raw")
    source = applications_payload(tmp_path / "raw")["apps"]["image_classification"]["schedule_figure"]
    assert (source["seed"], source["member"]) == (0, 1)
    kept = [LineageRecord.from_dict(row) for row in source["records"]]
    original = read_lineage(tmp_path / "raw" / "image_classification" / "seed0_pbt" / "pbt" / "lineage.jsonl")
    assert [(r.step, r.member, r.event, r.parent, r.score, r.hyperparameters) for r in kept] == [
        (r.step, r.member, r.event, r.parent, r.score, r.hyperparameters) for r in original]
