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
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_pbt.algorithm.lineage import LineageRecord, best_member, final_records, member_schedule, read_lineage
from lightning_pbt.algorithm.run_reading import donor_step, find_lineage, infer_mode, run_config_value

__all__ = [
    "Report",
    "export_schedule",
    "main",
    "make_report",
    "plot_hyperparameters",
    "plot_lineage_tree",
    "plot_scores",
    "population_table",
    "summary_markdown",
]

PLOTS = ("hyperparameters.png", "scores.png", "lineage_tree.png")


def _by_member(records: Iterable[LineageRecord]) -> dict[int, list[LineageRecord]]:
    out: dict[int, list[LineageRecord]] = {}
    for _, record in sorted(enumerate(records), key=lambda pair: (pair[1].step, pair[0])):
        out.setdefault(record.member, []).append(record)
    return dict(sorted(out.items()))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _names(records: Iterable[LineageRecord]) -> list[str]:
    names: list[str] = []
    for record in records:
        for name in record.hyperparameters:
            if name not in names:
                names.append(name)
    return names


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


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
    names = _names(final.values())
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
    return _table(["member", "score", *names, "parent", "exploits", "copied by others"], rows)


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
    by_member = _by_member(records)
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
            f"score {_fmt(last.score)} at step {last.step} (epoch {last.epoch}), weights from member {last.parent}",
            "",
            "Its schedule (the hyperparameters its final weights were trained with, from each step on):",
            "",
        ]
        schedule = member_schedule(records, chosen)
        names = _names(record for record in records)
        lines += [
            _table(["from step", *names], ([step, *(values.get(n) for n in names)] for step, values in schedule)),
            "",
        ]
    lines += ["## Population (last ready step)", "", population_table(records, mode), ""]
    total = sum(copied.values())
    lines += [f"## Exploits: {total} in total", "", _table(["member", "exploits"], sorted(copied.items())), ""]
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


# -- plots -------------------------------------------------------------------------------------------
def _figure(rows: int, height: float = 2.6, width: float = 8.0) -> Any:
    """A matplotlib Figure drawn by the Agg canvas (no pyplot, no display, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, 0.8 + height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _colors(members: Iterable[int]) -> dict[int, Any]:
    from matplotlib import colormaps

    members = sorted(members)
    cmap = colormaps["tab10" if len(members) <= 10 else "tab20" if len(members) <= 20 else "viridis"]
    n = max(len(members), 1)
    return {m: cmap(i if len(members) <= 20 else i / max(n - 1, 1)) for i, m in enumerate(members)}


def _save(figure: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def _last_step(records: Sequence[LineageRecord]) -> int:
    return max((r.step for r in records), default=0)


def plot_hyperparameters(records: Sequence[LineageRecord], path: str | os.PathLike[str]) -> Path:
    """One panel per hyperparameter: its value per member (a step line), exploits marked.

    Args:
        records: the run's lineage.
        path: the PNG to write.
    """
    by_member = _by_member(records)
    names = _names(records) or ["(none)"]
    colors = _colors(by_member)
    figure = _figure(len(names))
    axes = figure.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        values = [r.hyperparameters.get(name) for r in records if name in r.hyperparameters]
        numeric = bool(values) and all(_finite(v) for v in values)
        categories: list[Any] = []
        if not numeric:
            for v in values:
                if v not in categories:
                    categories.append(v)
        for member, recs in by_member.items():
            recs = [r for r in recs if name in r.hyperparameters]
            if not recs:
                continue
            xs = [r.step for r in recs]
            ys = [r.hyperparameters[name] if numeric else categories.index(r.hyperparameters[name]) for r in recs]
            ax.step(xs, ys, where="post", color=colors[member], label=f"member {member}")
            exploits = [(x, y) for x, y, r in zip(xs, ys, recs, strict=True) if r.event == "exploit"]
            if exploits:
                ax.plot(*zip(*exploits, strict=True), "o", color=colors[member], markersize=4)
        if numeric and values and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_yscale("log")
        if not numeric:
            ax.set_yticks(range(len(categories)), [str(c) for c in categories])
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_title("Hyperparameters per member (o: after an exploit)")
    axes[0].legend(fontsize="small", ncol=min(len(by_member), 4), loc="best")
    axes[-1].set_xlabel("global step")
    return _save(figure, path)


def plot_scores(records: Sequence[LineageRecord], path: str | os.PathLike[str], monitor: str = "score") -> Path:
    """Each member's score at every ready step; x marks a step where the member exploited.

    Args:
        records: the run's lineage.
        path: the PNG to write.
        monitor: the score's name on the y axis.
    """
    by_member = _by_member(records)
    colors = _colors(by_member)
    figure = _figure(1, height=3.6)
    ax = figure.subplots()
    for member, recs in by_member.items():
        points = [(r.step, r.score) for r in recs if _finite(r.score)]
        if points:
            ax.plot(*zip(*points, strict=True), "-", marker=".", color=colors[member], label=f"member {member}")
        exploits = [(r.step, r.score) for r in recs if r.event == "exploit" and _finite(r.score)]
        if exploits:
            ax.plot(*zip(*exploits, strict=True), "x", color=colors[member], markersize=8)
    ax.set_title(f"{monitor} per member (x: the member copied another after this score)")
    ax.set_xlabel("global step")
    ax.set_ylabel(monitor)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", ncol=min(len(by_member), 4), loc="best")
    return _save(figure, path)


def _ancestry(by_member: Mapping[int, list[LineageRecord]], member: int, last: int) -> list[tuple[int, int, int]]:
    """``[(member, from_step, to_step)]``: whose weights ``member``'s final model was in, when.

    The same walk as :func:`lightning_pbt.algorithm.lineage.member_schedule`: an exploit at step s from p means
    the weights were p's before s (before the donor step in an asynchronous run); steps are each
    member's own.
    """
    segments: list[tuple[int, int, int]] = []
    current, upper, inclusive = member, last, True
    for _ in range(sum(len(v) for v in by_member.values()) + 1):
        own = [r for r in by_member.get(current, []) if (r.step <= upper if inclusive else r.step < upper)]
        start, parent, copied_at = (own[0].step if own else 0), None, 0
        for record in reversed(own):
            if record.event in ("init", "rejuvenate"):
                start = record.step
                break
            if record.event == "exploit" and record.parent != current:
                start, parent, copied_at = record.step, record.parent, donor_step(record)
                break
        segments.append((current, start, upper))
        if parent is None:
            break
        current, upper, inclusive = parent, copied_at, False
    return segments


def plot_lineage_tree(
    records: Sequence[LineageRecord], path: str | os.PathLike[str], highlight: int | None = None
) -> Path:
    """Members on the y axis, steps on the x axis; an arrow per exploit from the donor to the copier
    (from the donor's step to the copier's: they differ in an asynchronous run).

    A member's line is coloured by the member its weights originally came from, so a lineage that
    takes over the population shows as one colour spreading; ``highlight``'s ancestry is drawn in black.

    Args:
        records: the run's lineage.
        path: the PNG to write.
        highlight: the member whose ancestry is drawn in black (``None``: none).
    """
    by_member = _by_member(records)
    colors = _colors(by_member)
    last = _last_step(records)
    figure = _figure(1, height=max(2.0, 0.45 * len(by_member) + 1.0))
    ax = figure.subplots()
    origin = {m: m for m in by_member}
    steps = sorted({r.step for r in records})
    start = {m: (recs[0].step if recs else 0) for m, recs in by_member.items()}
    for step in steps:
        at_step = [r for r in records if r.step == step]
        before = dict(origin)
        for record in at_step:
            if record.event == "exploit" and record.parent != record.member:
                ax.plot(
                    [start[record.member], step],
                    [record.member] * 2,
                    color=colors[before[record.member]],
                    linewidth=3,
                    solid_capstyle="butt",
                )
                ax.annotate(
                    "",
                    xy=(step, record.member),
                    xytext=(donor_step(record), record.parent),
                    arrowprops={"arrowstyle": "->", "color": colors[before[record.parent]], "lw": 1.2},
                )
                origin[record.member] = before[record.parent]
                start[record.member] = step
            elif record.event == "rejuvenate":
                ax.plot(
                    [start[record.member], step],
                    [record.member] * 2,
                    color=colors[before[record.member]],
                    linewidth=3,
                    solid_capstyle="butt",
                )
                ax.plot([step], [record.member], "*", color="grey", markersize=9)
                origin[record.member] = record.member
                start[record.member] = step
    for member in by_member:
        ax.plot([start[member], last], [member] * 2, color=colors[origin[member]], linewidth=3, solid_capstyle="butt")
    if highlight is not None and highlight in by_member:
        for member, begin, end in _ancestry(by_member, highlight, last):
            ax.plot([begin, end], [member, member], color="black", linewidth=1.2)
        ax.plot([last], [highlight], "o", color="black")
    ax.set_yticks(list(by_member), [f"member {m}" for m in by_member])
    ax.set_ylim(min(by_member, default=0) - 0.6, max(by_member, default=0) + 0.6)
    ax.invert_yaxis()
    ax.set_xlabel("global step")
    title = "Lineage: an arrow from donor to copier at each exploit\ncolour: the member the weights first came from"
    if highlight is not None:
        title += f"; black: member {highlight}'s ancestry"
    ax.set_title(title, fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    return _save(figure, path)


# -- the whole report --------------------------------------------------------------------------------
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
