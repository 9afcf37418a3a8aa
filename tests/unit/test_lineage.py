"""Lineage: strict JSON lines, durable appends, crash-tolerant reads, schedules through parent links."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lightning_pbt.algorithm.lineage import (
    LineageRecord,
    LineageWriter,
    best_member,
    final_records,
    member_schedule,
    read_lineage,
    truncate_after,
    truncate_members_after,
)


def rec(step: int, member: int, event: str, parent: int, lr: float, score: float | None = 0.5) -> LineageRecord:
    return LineageRecord(
        step=step,
        epoch=step // 10,
        member=member,
        score=score,
        event=event,
        parent=parent,
        hyperparameters={"lr": lr},
    )


def lineage() -> list[LineageRecord]:
    """Two members; 1 copies 0 at step 10, then 0 copies 1 at step 20, then 1 is rejuvenated at 30."""
    return [
        rec(0, 0, "init", 0, 0.1, None),
        rec(0, 1, "init", 1, 0.2, None),
        rec(10, 0, "keep", 0, 0.1, 0.9),
        rec(10, 1, "exploit", 0, 0.12, 0.3),
        rec(20, 0, "exploit", 1, 0.15, 0.4),
        rec(20, 1, "keep", 1, 0.12, 0.8),
        rec(30, 0, "keep", 0, 0.15, 0.7),
        rec(30, 1, "rejuvenate", 1, 0.12, 0.6),
        rec(40, 0, "stop", 0, 0.15, 0.75),
        rec(40, 1, "keep", 1, 0.12, math.nan),
    ]


def test_write_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "pbt" / "lineage.jsonl"
    records = lineage()
    records[3].mutations = ["lr: 0.1 -> 0.12 (x1.2)"]
    records[3].timing = {"gather": 0.01, "decide": 0.001, "transfer": 0.2}
    records[3].extra = {"note": "x"}
    with LineageWriter(path) as writer:
        writer.write(records[:4])
        writer.write(records[4])
    with LineageWriter(path) as writer:  # reopening appends
        writer.write(records[5:])
    back = read_lineage(path)
    assert back[:-1] == records[:-1]
    assert back[-1].score is None  # NaN -> null
    assert len(path.read_text().splitlines()) == len(records)


def test_to_json_is_strict_one_line_and_sorted() -> None:
    record = rec(5, 2, "exploit", 1, 0.1, math.inf)
    record.timing = {"gather": math.nan}
    record.hyperparameters = {"b": np.float64(0.5), "a": np.int64(3)}
    text = record.to_json()
    assert "\n" not in text and "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["score"] is None and data["timing"] == {"gather": None}
    assert list(data) == sorted(data) and data["hyperparameters"] == {"a": 3, "b": 0.5}
    assert text.index('"a"') < text.index('"b"')


def test_from_dict_validates_and_keeps_unknown_keys() -> None:
    data = json.loads(rec(1, 0, "keep", 0, 0.1).to_json())
    assert LineageRecord.from_dict({**data, "new_field": 1}).extra == {"new_field": 1}
    with pytest.raises(ValueError, match=r"missing key\(s\) \['parent'\]"):
        LineageRecord.from_dict({k: v for k, v in data.items() if k != "parent"})
    with pytest.raises(ValueError, match="'step' must be an integer"):
        LineageRecord.from_dict({**data, "step": "1"})
    with pytest.raises(ValueError, match="'score' must be a number or null"):
        LineageRecord.from_dict({**data, "score": "high"})


def test_truncated_last_line_is_tolerated_and_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "lineage.jsonl"
    records = lineage()
    with LineageWriter(path) as writer:
        writer.write(records[:3])
    full = records[3].to_json()
    with open(path, "a") as f:
        f.write(full[: len(full) // 2])  # a crash in the middle of a write
    assert read_lineage(path) == records[:3]
    with LineageWriter(path) as writer:
        writer.write(records[3:5])
    assert read_lineage(path) == records[:5]


def test_corrupt_middle_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "lineage.jsonl"
    lines = [r.to_json() for r in lineage()[:3]]
    lines[1] = lines[1][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"lineage\.jsonl:2: corrupt lineage line"):
        read_lineage(path)
    path.write_text("\n".join([lines[0], lines[2], "[1, 2]"]) + "\n")  # complete but wrong last line
    with pytest.raises(ValueError, match=r"lineage\.jsonl:3: corrupt lineage line: expected a JSON object"):
        read_lineage(path)


def test_truncate_after_keeps_init_and_earlier_steps(tmp_path: Path) -> None:
    path = tmp_path / "lineage.jsonl"
    records = lineage()
    with LineageWriter(path) as writer:
        writer.write(records)
    assert truncate_after(path, 15) == 4
    assert read_lineage(path) == records[:4]
    assert LineageWriter.truncate_after(path, -1) == 2  # init lines always stay
    assert [r.event for r in read_lineage(path)] == ["init", "init"]
    assert truncate_after(tmp_path / "missing.jsonl", 3) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lineage.jsonl"]  # no temp file left


def test_member_schedule_follows_parent_links() -> None:
    records = lineage()
    # member 0: init (0.1) kept to 20; at 20 it took member 1's weights, which member 1 got from
    # member 0 at 10 (lr 0.12) and which before 10 were member 0's (lr 0.1).
    assert member_schedule(records, 0) == [(0, {"lr": 0.1}), (10, {"lr": 0.12}), (20, {"lr": 0.15})]
    # member 1 was rejuvenated at 30: only its training from then on counts
    assert member_schedule(records, 1) == [(30, {"lr": 0.12})]
    assert member_schedule(records[:6], 1) == [(0, {"lr": 0.1}), (10, {"lr": 0.12})]
    with pytest.raises(ValueError, match="member 7 has no lineage records"):
        member_schedule(records, 7)


def test_member_schedule_without_init_and_out_of_order_records() -> None:
    records = [rec(20, 0, "keep", 0, 0.2), rec(10, 0, "keep", 0, 0.2), rec(30, 0, "keep", 0, 0.3)]
    assert member_schedule(records, 0) == [(10, {"lr": 0.2}), (30, {"lr": 0.3})]


def test_final_records_and_best_member() -> None:
    records = lineage()
    final = final_records(records)
    assert final[0].event == "stop" and final[1].step == 40
    assert best_member(records, "max") == 0  # member 1's last score is NaN: never best
    assert best_member(records, "min") == 0
    assert best_member([*records, rec(50, 1, "keep", 1, 0.1, 0.9)], "max") == 1
    assert best_member([*records, rec(50, 1, "keep", 1, 0.1, 0.75)], "max") == 0  # tie: lower id
    with pytest.raises(ValueError, match="no member has a finite score"):
        best_member(records[:2], "max")


def async_lineage() -> list[LineageRecord]:
    """Asynchronous: member 0 (fast) and 1 (slow) have their own steps. At its step 8, member 1 copies
    member 0's snapshot of step 24; member 0 ran lr 0.1 until 16, then 0.2."""
    return [
        rec(0, 0, "init", 0, 0.1, None),
        rec(0, 1, "init", 1, 0.5, None),
        rec(8, 0, "keep", 0, 0.1),
        rec(16, 0, "keep", 0, 0.2),
        rec(4, 1, "keep", 1, 0.5),
        rec(24, 0, "keep", 0, 0.2),
        LineageRecord(8, 0, 1, 0.4, "exploit", 0, {"lr": 0.3}, donor_step=24),
        rec(12, 1, "keep", 1, 0.3),
        rec(32, 0, "keep", 0, 0.25),
    ]


def test_asynchronous_schedule_counts_the_training_the_weights_received() -> None:
    # Member 1's final weights: member 0's first 24 steps (0.1, then 0.2 from 16), then member 1's own
    # steps from 8 on, which continue the copied weights at their 24th step: 0.3 from 24 + (8 - 8).
    assert member_schedule(async_lineage(), 1) == [(0, {"lr": 0.1}), (16, {"lr": 0.2}), (24, {"lr": 0.3})]
    # Member 0 never copied: its own steps.
    assert member_schedule(async_lineage(), 0) == [(0, {"lr": 0.1}), (16, {"lr": 0.2}), (32, {"lr": 0.25})]


def test_donor_step_round_trips_and_appears_only_when_set(tmp_path) -> None:
    path = tmp_path / "lineage.jsonl"
    with LineageWriter(path) as writer:
        writer.write(async_lineage())
    back = read_lineage(path)
    assert back == async_lineage()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line.get("donor_step") for line in lines if "donor_step" in line] == [24]


def test_truncating_per_member_keeps_each_members_own_steps(tmp_path) -> None:
    path = tmp_path / "lineage.jsonl"
    with LineageWriter(path) as writer:
        writer.write(async_lineage())
    assert truncate_members_after(path, {0: 16, 1: 4}) == 5
    assert [(r.member, r.step) for r in read_lineage(path)] == [(0, 0), (1, 0), (0, 8), (0, 16), (1, 4)]


def test_background_writes_are_durable_before_the_next_one_and_at_close(tmp_path) -> None:
    path = tmp_path / "lineage.jsonl"
    writer = LineageWriter(path)
    writer.write_in_background(lineage()[:2])
    writer.wait()
    assert len(read_lineage(path)) == 2
    writer.write_in_background(lineage()[2:4])
    writer.write_in_background(lineage()[4:6])  # waits for the previous one first
    writer.close()
    assert read_lineage(path) == lineage()[:6]
