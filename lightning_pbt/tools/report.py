"""What a PBT run leaves behind, read back: a markdown summary, plots and the best schedule.

Command line::

    python -m lightning_pbt.report RUN_DIR          # RUN_DIR/pbt/lineage.jsonl
    python -m lightning_pbt.report path/to/lineage.jsonl [--mode min] [--out DIR] [--member 3]

prints a markdown summary (best member, its score, its schedule, exploits per member) and writes next
to the lineage file (``RUN_DIR/pbt/`` by default):

- ``hyperparameters.png``: each hyperparameter's value per member over the steps;
- ``scores.png``: each member's score at every ready step (x: an exploit);
- ``lineage_tree.png``: who copied whom and when; a member's colour is the member its weights
  originally came from, the best member's ancestry is drawn in black;
- ``schedule.json``: the best member's schedule (``lightning_pbt.algorithm.lineage.member_schedule``), ready for
  :class:`lightning_pbt.plugin.replay.PBTReplay`;
- ``summary.md``: the printed summary.

The lineage does not say whether the score is maximised: ``--mode`` wins, then ``pbt.mode`` in the
run's ``.hydra/config.yaml``, then a ``mode`` in the init records' extras, then the direction of the
recorded exploits (a winner copied by a loser), else ``max``. matplotlib (Agg, no display) is imported
only when plots are made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_pbt.algorithm.lineage import (
    LineageRecord,
    best_member,
    final_records,
    member_schedule,
    read_lineage,
    records_by_member,
)
from lightning_pbt.algorithm.results import format_cell, markdown_table
from lightning_pbt.algorithm.run_reading import (
    find_lineage,
    hyperparameter_names,
    infer_mode,
    run_config_value,
)
from lightning_pbt.tools.plots import plot_hyperparameters, plot_lineage_tree, plot_scores

__all__ = [
    "Report",
    "export_schedule",
    "main",
    "make_report",
    "population_table",
    "summary_markdown",
]



def _exploit_counts(records: Iterable[LineageRecord]) -> tuple[dict[int, int], dict[int, int]]:
    """(how often each member copied another, how often each member was copied)."""
    copied: dict[int, int] = {}
    donated: dict[int, int] = {}
    for record in records:
        copied.setdefault(record.member, 0)
        donated.setdefault(record.member, 0)
    for record in records:
        if record.event == "exploit" and record.parent != record.member:
            copied[record.member] += 1
            donated[record.parent] = donated.get(record.parent, 0) + 1
    return copied, donated


def population_table(records: Sequence[LineageRecord], mode: str = "max") -> str:
    """Markdown: one row per member (its last record), best first: score, hyperparameters, parent.

    Args:
        records: the run's lineage.
        mode: ``"max"`` or ``"min"``: which scores are best.
    """
    final = final_records(records)
    copied, donated = _exploit_counts(records)
    names = hyperparameter_names(final.values())
    from lightning_pbt.algorithm.exploit import rank_members

    order = rank_members(list(final), {m: r.score for m, r in final.items()}, mode)
    rows = [
        [
            m,
            final[m].score,
            *(final[m].hyperparameters.get(n) for n in names),
            final[m].parent,
            copied.get(m, 0),
            donated.get(m, 0),
        ]
        for m in order
    ]
    return markdown_table(["member", "score", *names, "parent", "exploits", "copied by others"], rows)


@dataclass
class Report:
    """What :func:`make_report` found and wrote.

    Attributes:
        lineage: the lineage file read.
        mode: ``"max"`` or ``"min"``.
        mode_source: where ``mode`` came from (see :func:`infer_mode`).
        records: the lineage's records.
        best: the member whose schedule was exported (the best one unless one was asked for; ``None``
            when no member has a finite score, and then no schedule is written).
        schedule: that member's schedule, ``[(step, {name: value}), ...]``.
        markdown: the printed summary.
        files: what was written, ``{"summary": path, "schedule": path, "hyperparameters": path, ...}``.
    """

    lineage: Path
    mode: str
    mode_source: str
    records: list[LineageRecord]
    best: int | None
    schedule: list[tuple[int, dict[str, Any]]]
    markdown: str
    files: dict[str, Path] = field(default_factory=dict)


def summary_markdown(
    records: Sequence[LineageRecord],
    mode: str = "max",
    *,
    lineage: Path | None = None,
    mode_source: str | None = None,
    member: int | None = None,
) -> str:
    """The report's markdown text (best member or ``member``, schedule, population, exploits).

    Args:
        records: the run's lineage.
        mode: ``"max"`` or ``"min"``.
        lineage: the lineage file, named in the text.
        mode_source: where ``mode`` came from, named in the text.
        member: describe this member's schedule instead of the best member's.
    """
    by_member = records_by_member(records)
    steps = sorted({r.step for r in records if r.event != "init"})
    counts = sorted({sum(r.event != "init" for r in recs) for recs in by_member.values()})
    copied, _ = _exploit_counts(records)
    lines = ["# Population Based Training report", ""]
    if lineage is not None:
        lines.append(f"- lineage: `{lineage}`")
    ready = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]} per member (asynchronous)"
    lines.append(
        f"- members: {len(by_member)}, ready steps: {ready}" + (f" (last at step {steps[-1]})" if steps else "")
    )
    lines.append(f"- mode: {mode}" + (f" ({mode_source})" if mode_source else ""))
    lines.append("")
    chosen, heading = member, "Member"
    if chosen is None:
        try:
            chosen, heading = best_member(records, mode), "Best member"
        except ValueError:
            chosen = None
    if chosen is None:
        lines += ["No member has a finite score yet.", ""]
    else:
        last = final_records(records)[chosen]
        lines += [
            f"## {heading}: {chosen}",
            "",
            f"score {format_cell(last.score)} at step {last.step} (epoch {last.epoch}), "
            f"weights from member {last.parent}",
            "",
            "Its schedule (the hyperparameters its final weights were trained with, from each step on):",
            "",
        ]
        schedule = member_schedule(records, chosen)
        names = hyperparameter_names(record for record in records)
        lines += [
            markdown_table(
                ["from step", *names], ([step, *(values.get(n) for n in names)] for step, values in schedule)
            ),
            "",
        ]
    lines += ["## Population (last ready step)", "", population_table(records, mode), ""]
    total = sum(copied.values())
    lines += [f"## Exploits: {total} in total", "", markdown_table(["member", "exploits"], sorted(copied.items())), ""]
    return "\n".join(lines)


def export_schedule(
    records: Sequence[LineageRecord],
    member: int,
    path: str | os.PathLike[str],
    *,
    mode: str | None = None,
    lineage: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``member``'s schedule as JSON (``{"member", "score", "schedule": [{"step", "hyperparameters"}]}``).

    Args:
        records: the run's lineage.
        member: whose schedule (see :func:`lightning_pbt.algorithm.lineage.member_schedule`).
        path: the JSON file to write (folders are created); :class:`~lightning_pbt.plugin.replay.PBTReplay`
            reads it back.
        mode: recorded in the file.
        lineage: the lineage file, recorded in the file.

    Returns:
        ``path``.
    """
    last = final_records(records)[member]
    data = {
        "member": member,
        "score": last.score,
        "step": last.step,
        "mode": mode,
        "lineage": None if lineage is None else os.fspath(lineage),
        "schedule": [{"step": step, "hyperparameters": values} for step, values in member_schedule(records, member)],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _chosen_member(records: Sequence[Any], mode: str, member: int | None, lineage: Path) -> int | None:
    """The member whose schedule is exported: ``member`` if given (it must be in the lineage), else the best
    one (``None`` when no member has a score)."""
    members = {r.member for r in records}
    if member is not None and member not in members:
        raise ValueError(f"member {member} is not in {lineage} (members: {sorted(members)})")
    if member is not None:
        return member
    try:
        return best_member(records, mode)
    except ValueError:
        return None


def make_report(
    path: str | os.PathLike[str],
    *,
    mode: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    plots: bool = True,
    member: int | None = None,
    monitor: str | None = None,
) -> Report:
    """Read the lineage under ``path``, write plots, ``schedule.json`` and ``summary.md`` into ``out_dir``
    (default: the lineage file's folder) and return what was found and written.

    Args:
        path: a run directory, its ``pbt/`` folder or a lineage file.
        mode: ``"max"`` or ``"min"`` (default: inferred, see :func:`infer_mode`).
        out_dir: where the files go (default: next to the lineage file).
        plots: whether to draw the three PNGs (matplotlib).
        member: export this member's schedule instead of the best member's.
        monitor: only names the score on the plots (default: ``pbt.monitor`` of a Hydra run, else
            ``"score"``).

    Returns:
        What was found and written.

    Raises:
        FileNotFoundError: no lineage under ``path``.
        ValueError: an empty or corrupt lineage, or a ``member`` the lineage does not have.

    Examples:
        ```python
        report = make_report("outputs/2026-11-26/12-34-10")
        print(report.markdown)
        trainer = pl.Trainer(callbacks=[PBTReplay(report.files["schedule"])])
        ```
    """
    lineage = find_lineage(path)
    records = read_lineage(lineage)
    if not records:
        raise ValueError(f"{lineage} has no records")
    run_dir = lineage.parent.parent if lineage.parent.name == "pbt" else lineage.parent
    mode_source = "set by the caller"
    if mode is None:
        mode, mode_source = infer_mode(records, run_dir)
    if monitor is None:
        found, _ = run_config_value(run_dir, "pbt.monitor")
        monitor = found if isinstance(found, str) and found else "score"
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    chosen = _chosen_member(records, mode, member, lineage)
    out = Path(out_dir) if out_dir is not None else lineage.parent
    files: dict[str, Path] = {}
    schedule: list[tuple[int, dict[str, Any]]] = []
    if chosen is not None:
        schedule = member_schedule(records, chosen)
        files["schedule"] = export_schedule(records, chosen, out / "schedule.json", mode=mode, lineage=lineage)
    if plots:
        files["hyperparameters"] = plot_hyperparameters(records, out / "hyperparameters.png")
        files["scores"] = plot_scores(records, out / "scores.png", monitor=monitor)
        files["lineage_tree"] = plot_lineage_tree(records, out / "lineage_tree.png", highlight=chosen)
    markdown = summary_markdown(records, mode, lineage=lineage, mode_source=mode_source, member=member)
    if files:
        markdown += "\n## Files\n\n" + "\n".join(f"- {name}: `{p}`" for name, p in files.items()) + "\n"
    files["summary"] = out / "summary.md"
    out.mkdir(parents=True, exist_ok=True)
    files["summary"].write_text(markdown, encoding="utf-8")
    return Report(
        lineage=lineage,
        mode=mode,
        mode_source=mode_source,
        records=records,
        best=chosen,
        schedule=schedule,
        markdown=markdown,
        files=files,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_pbt.report``: print the summary and write the files; the exit status.

    Args:
        argv: the command line without the program name (default: ``sys.argv[1:]``); ``--help`` lists
            the options (``--mode``, ``--out``, ``--member``, ``--monitor``, ``--no-plots``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_pbt.report",
        description="Summarise a PBT run: markdown summary, plots and the best member's schedule.json.",
    )
    parser.add_argument("run_dir", help="the run directory (with pbt/lineage.jsonl) or a lineage.jsonl file")
    parser.add_argument(
        "--mode",
        choices=("min", "max"),
        default=None,
        help="whether a higher or lower score is better (default: from the run, else max)",
    )
    parser.add_argument(
        "--out", default=None, help="where the plots, schedule.json and summary.md go (default: next to lineage.jsonl)"
    )
    parser.add_argument("--member", type=int, default=None, help="export this member's schedule instead of the best")
    parser.add_argument(
        "--monitor", default=None, help="the score's name on the plots (default: the run's pbt.monitor, else 'score')"
    )
    parser.add_argument("--no-plots", action="store_true", help="only the summary and schedule.json")
    args = parser.parse_args(argv)
    try:
        report = make_report(
            args.run_dir,
            mode=args.mode,
            out_dir=args.out,
            plots=not args.no_plots,
            member=args.member,
            monitor=args.monitor,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
