"""lightning_pbt.tools.report on a constructed lineage: summary, plots, schedule.json, mode inference, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_pbt.algorithm.lineage import LineageRecord, LineageWriter, member_schedule
from lightning_pbt.algorithm.run_reading import find_lineage, infer_mode
from lightning_pbt.tools.report import main, make_report, population_table, summary_markdown

PNG = b"\x89PNG\r\n\x1a\n"


def rec(step, member, score, event="keep", parent=None, lr=0.1, opt="sgd", **extra):
    return LineageRecord(
        step=step,
        epoch=step // 10,
        member=member,
        score=score,
        event=event,
        parent=member if parent is None else parent,
        hyperparameters={"lr": lr, "opt": opt},
        extra=extra,
    )


def records() -> list[LineageRecord]:
    """3 members. Step 10: 2 copies 0. Step 20: 1 copies 2 (who holds 0's weights). Step 30: 0 diverges."""
    return [
        rec(0, 0, None, "init", lr=0.1),
        rec(0, 1, None, "init", lr=0.01, opt="adam"),
        rec(0, 2, None, "init", lr=0.001),
        rec(10, 0, 0.9, lr=0.1),
        rec(10, 1, 0.8, lr=0.01, opt="adam"),
        rec(10, 2, 0.5, "exploit", parent=0, lr=0.12),
        rec(20, 0, 0.91, lr=0.1),
        rec(20, 1, 0.7, "exploit", parent=2, lr=0.1, opt="adam"),
        rec(20, 2, 0.95, lr=0.12),
        rec(30, 0, None, lr=0.1),
        rec(30, 1, 0.96, lr=0.1, opt="adam"),
        rec(30, 2, 0.97, lr=0.12),
    ]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    with LineageWriter(tmp_path / "pbt" / "lineage.jsonl") as writer:
        writer.write(records())
    return tmp_path


def test_find_lineage_accepts_run_dir_pbt_dir_and_file(run_dir):
    path = run_dir / "pbt" / "lineage.jsonl"
    assert find_lineage(run_dir) == find_lineage(run_dir / "pbt") == find_lineage(path) == path
    (run_dir / "member_0").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no lineage\.jsonl"):
        find_lineage(run_dir / "member_0")


def test_report_writes_non_empty_pngs_schedule_and_summary(run_dir):
    report = make_report(run_dir)
    assert report.best == 2 and report.mode == "max"
    for name in ("hyperparameters", "scores", "lineage_tree"):
        data = report.files[name].read_bytes()
        assert report.files[name].parent == run_dir / "pbt"
        assert data.startswith(PNG) and len(data) > 5000
    schedule = json.loads((run_dir / "pbt" / "schedule.json").read_text())
    assert schedule["member"] == 2 and schedule["score"] == 0.97 and schedule["mode"] == "max"
    assert (
        [(e["step"], e["hyperparameters"]) for e in schedule["schedule"]]
        == [(step, values) for step, values in member_schedule(records(), 2)]
        == [(0, {"lr": 0.1, "opt": "sgd"}), (10, {"lr": 0.12, "opt": "sgd"})]
    )
    assert (run_dir / "pbt" / "summary.md").read_text() == report.markdown


def test_summary_names_best_member_schedule_and_exploits(run_dir):
    text = make_report(run_dir, plots=False).markdown
    assert "## Best member: 2" in text
    assert "score 0.97 at step 30" in text
    assert "| from step | lr | opt |" in text and "| 10 | 0.12 | sgd |" in text
    assert "## Exploits: 2 in total" in text
    assert "| 1 | 1 |" in text and "| 2 | 1 |" in text and "| 0 | 0 |" in text
    assert not (run_dir / "pbt" / "scores.png").exists()


def test_population_table_best_first_with_parent_and_nan_last():
    table = population_table(records(), "max").splitlines()
    assert table[0] == "| member | score | lr | opt | parent | exploits | copied by others |"
    assert [row.split(" | ")[0] for row in table[2:]] == ["| 2", "| 1", "| 0"]  # member 0's score is null
    assert "| 0 | n/a |" in table[-1]


def test_mode_min_picks_the_lowest_score(run_dir):
    report = make_report(run_dir, mode="min", plots=False)
    assert report.best == 1  # 0.96 < 0.97; member 0 has no finite score
    assert "## Best member: 1" in report.markdown


def test_mode_is_inferred_from_exploit_direction_hydra_config_and_init_extras(tmp_path):
    assert infer_mode(records()) == ("max", "the direction of the recorded exploits")
    flipped = [LineageRecord(**{**r.__dict__, "score": None if r.score is None else -r.score}) for r in records()]
    assert infer_mode(flipped)[0] == "min"
    assert infer_mode(records()[:3])[0] == "max"  # nothing to go by: the default
    tagged = [rec(0, 0, None, "init", mode="min"), *records()[3:]]
    assert infer_mode(tagged) == ("min", "the lineage's init records")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("pbt:\n  mode: min\n")
    assert infer_mode(records(), tmp_path)[0] == "min"


def test_no_finite_score_still_reports(tmp_path):
    path = tmp_path / "lineage.jsonl"
    with LineageWriter(path) as writer:
        writer.write(records()[:3])
    report = make_report(path)
    assert report.best is None and "No member has a finite score yet." in report.markdown
    assert report.files["lineage_tree"].read_bytes().startswith(PNG)
    assert "schedule" not in report.files


def test_member_option_and_categorical_values(run_dir):
    report = make_report(run_dir, member=1)
    assert "## Member: 1" in report.markdown
    assert json.loads(report.files["schedule"].read_text())["member"] == 1
    with pytest.raises(ValueError, match="member 7 is not in"):
        make_report(run_dir, member=7)


def test_cli_prints_markdown_and_reports_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main([str(run_dir / "pbt" / "lineage.jsonl"), "--out", str(out), "--mode", "max"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Population Based Training report") and "## Best member: 2" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "hyperparameters.png",
        "lineage_tree.png",
        "schedule.json",
        "scores.png",
        "summary.md",
    ]
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_summary_markdown_without_files():
    text = summary_markdown(records(), "max")
    assert "members: 3, ready steps: 3 (last at step 30)" in text


def test_asynchronous_lineage_with_steps_that_do_not_line_up(tmp_path):
    """Member 1 (slow) copies member 0's snapshot of step 24 at its own step 8 (``donor_step``)."""
    lines = [
        rec(0, 0, None, "init", lr=0.1),
        rec(0, 1, None, "init", lr=0.5),
        rec(8, 0, 0.6, lr=0.1),
        rec(4, 1, 0.2, lr=0.5),
        rec(16, 0, 0.7, lr=0.2),
        rec(24, 0, 0.8, lr=0.2),
        LineageRecord(8, 0, 1, 0.3, "exploit", 0, {"lr": 0.3, "opt": "sgd"}, donor_step=24),
        rec(12, 1, 0.9, lr=0.3),
        rec(32, 0, 0.85, lr=0.2),
    ]
    # The exploit compares the copier's score with the donor's at the donor's step (0.3 -> 0.8): max.
    assert infer_mode(lines) == ("max", "the direction of the recorded exploits")
    with LineageWriter(tmp_path / "pbt" / "lineage.jsonl") as writer:
        writer.write(lines)
    report = make_report(tmp_path, mode="max")
    for name in ("hyperparameters", "scores", "lineage_tree"):
        assert report.files[name].read_bytes().startswith(PNG)
    assert "ready steps: 3-4 per member (asynchronous)" in report.markdown
    assert "## Best member: 1" in report.markdown
    schedule = json.loads((tmp_path / "pbt" / "schedule.json").read_text())["schedule"]
    assert [entry["step"] for entry in schedule] == [0, 16, 24]  # member 0's steps, then 1's from 24
