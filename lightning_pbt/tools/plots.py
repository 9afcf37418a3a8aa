"""The three pictures of a finished run (``python -m lightning_pbt.report`` draws them):

- ``hyperparameters.png``: each hyperparameter's value per member over the steps;
- ``scores.png``: each member's score at every ready step (x: an exploit);
- ``lineage_tree.png``: who copied whom and when; a member's colour is the member its weights
  originally came from, the best member's ancestry is drawn in black.

and :func:`plot_schedule` (the applications benchmark draws it): every member's values faint, the
schedule one member's final weights were trained with bold. :func:`ancestry_segments` says whose
weights a member's final model was in at each step.

matplotlib (Agg, no display) is imported only when a plot is made.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_pbt.algorithm.lineage import LineageRecord, member_schedule, records_by_member
from lightning_pbt.algorithm.run_reading import donor_step, finite_number, hyperparameter_names

__all__ = [
    "PLOTS",
    "ancestry_segments",
    "hyperparameter_series",
    "new_figure",
    "plot_hyperparameters",
    "plot_lineage_tree",
    "plot_schedule",
    "plot_scores",
    "save_figure",
]

PLOTS = ("hyperparameters.png", "scores.png", "lineage_tree.png")


def new_figure(rows: int, height: float = 2.6, width: float = 8.0) -> Any:
    """A matplotlib Figure drawn by the Agg canvas (no pyplot, no display, no global backend switch).

    Args:
        rows: panels stacked vertically (the height grows with them).
        height: inches per panel.
        width: inches.
    """
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


def save_figure(figure: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` as a PNG at ``path`` (its folder created when missing).

    Args:
        figure: a :func:`new_figure`.
        path: the PNG to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def _last_step(records: Sequence[LineageRecord]) -> int:
    return max((r.step for r in records), default=0)


def hyperparameter_series(records: Sequence[LineageRecord], name: str) -> dict[int, list[tuple[int, Any]]]:
    """Each member's own value of ``name`` at each of its records, in step order: ``{member: [(step,
    value in effect from that step), ...]}`` (members whose records never name it are left out).

    Args:
        records: the run's lineage.
        name: a hyperparameter.
    """
    out: dict[int, list[tuple[int, Any]]] = {}
    for member, recs in records_by_member(records).items():
        series = [(r.step, r.hyperparameters[name]) for r in recs if name in r.hyperparameters]
        if series:
            out[member] = series
    return out


def _value_axis(ax: Any, records: Sequence[LineageRecord], name: str) -> Callable[[Any], Any]:
    """Set up ``ax`` for ``name``'s values (log scale when positive and spread 10x or more; categories
    as ticks) and return what turns a value into its y coordinate."""
    values = [r.hyperparameters[name] for r in records if name in r.hyperparameters]
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    if bool(values) and all(finite_number(v) for v in values):
        if min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_yscale("log")
        return lambda value: value
    categories: list[Any] = []
    for v in values:
        if v not in categories:
            categories.append(v)
    ax.set_yticks(range(len(categories)), [str(c) for c in categories])
    return categories.index


def _step_line(ax: Any, series: Sequence[tuple[int, Any]], to_y: Callable[[Any], Any], **style: Any) -> list[Any]:
    """Draw ``[(step, value), ...]`` as values that hold until the next step; return the y coordinates."""
    ys = [to_y(value) for _, value in series]
    ax.step([step for step, _ in series], ys, where="post", **style)
    return ys


def plot_hyperparameters(records: Sequence[LineageRecord], path: str | os.PathLike[str]) -> Path:
    """One panel per hyperparameter: its value per member (a step line), exploits marked.

    Args:
        records: the run's lineage.
        path: the PNG to write.
    """
    by_member = records_by_member(records)
    names = hyperparameter_names(records) or ["(none)"]
    colors = _colors(by_member)
    figure = new_figure(len(names))
    axes = figure.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        to_y = _value_axis(ax, records, name)
        for member, series in hyperparameter_series(records, name).items():
            ys = _step_line(ax, series, to_y, color=colors[member], label=f"member {member}")
            recs = [r for r in by_member[member] if name in r.hyperparameters]
            exploits = [(r.step, y) for y, r in zip(ys, recs, strict=True) if r.event == "exploit"]
            if exploits:
                ax.plot(*zip(*exploits, strict=True), "o", color=colors[member], markersize=4)
    axes[0].set_title("Hyperparameters per member (o: after an exploit)")
    axes[0].legend(fontsize="small", ncol=min(len(by_member), 4), loc="best")
    axes[-1].set_xlabel("global step")
    return save_figure(figure, path)


def plot_schedule(
    records: Sequence[LineageRecord], path: str | os.PathLike[str], highlight: int, title: str | None = None
) -> Path:
    """One panel per hyperparameter: every member's own values faint, ``highlight``'s schedule bold: the
    values its final weights were trained with, through the members it copied
    (:func:`~lightning_pbt.algorithm.lineage.member_schedule`).

    Args:
        records: the run's lineage.
        path: the PNG to write.
        highlight: the member whose schedule is drawn bold (the best, usually).
        title: the figure's title (default: says what is drawn).
    """
    names = hyperparameter_names(records) or ["(none)"]
    schedule = member_schedule(records, highlight)
    last = _last_step(records)
    figure = new_figure(len(names), height=2.2)
    axes = figure.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        to_y = _value_axis(ax, records, name)
        for series in hyperparameter_series(records, name).values():
            _step_line(ax, series, to_y, color="grey", alpha=0.4, linewidth=0.8)
        bold = [(step, values[name]) for step, values in schedule if name in values]
        if bold:
            bold.append((max(last, bold[-1][0]), bold[-1][1]))  # the last value holds to the end
            _step_line(ax, bold, to_y, color="black", linewidth=2.2, label=f"member {highlight}'s schedule")
    axes[0].set_title(title or f"Every member's hyperparameters (grey)\nand member {highlight}'s schedule (black)")
    axes[0].legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("global step")
    return save_figure(figure, path)


def plot_scores(records: Sequence[LineageRecord], path: str | os.PathLike[str], monitor: str = "score") -> Path:
    """Each member's score at every ready step; x marks a step where the member exploited.

    Args:
        records: the run's lineage.
        path: the PNG to write.
        monitor: the score's name on the y axis.
    """
    by_member = records_by_member(records)
    colors = _colors(by_member)
    figure = new_figure(1, height=3.6)
    ax = figure.subplots()
    for member, recs in by_member.items():
        points = [(r.step, r.score) for r in recs if finite_number(r.score)]
        if points:
            ax.plot(*zip(*points, strict=True), "-", marker=".", color=colors[member], label=f"member {member}")
        exploits = [(r.step, r.score) for r in recs if r.event == "exploit" and finite_number(r.score)]
        if exploits:
            ax.plot(*zip(*exploits, strict=True), "x", color=colors[member], markersize=8)
    ax.set_title(f"{monitor} per member (x: the member copied another after this score)")
    ax.set_xlabel("global step")
    ax.set_ylabel(monitor)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", ncol=min(len(by_member), 4), loc="best")
    return save_figure(figure, path)


def ancestry_segments(
    by_member: Mapping[int, list[LineageRecord]], member: int, last: int
) -> list[tuple[int, int, int]]:
    """``[(member, from_step, to_step)]``, newest first: whose weights ``member``'s final model was in, when.

    A segment that begins with a copy (or a re-initialisation) begins at that step: the record there
    scored the weights *before* the copy, which are not this ancestry's; the donor's segment ends at the
    step it was copied at, whose score is.

    Args:
        by_member: :func:`~lightning_pbt.algorithm.lineage.records_by_member` of a run's lineage.
        member: whose final weights to follow.
        last: the step the newest segment ends at.

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
    by_member = records_by_member(records)
    colors = _colors(by_member)
    last = _last_step(records)
    figure = new_figure(1, height=max(2.0, 0.45 * len(by_member) + 1.0))
    ax = figure.subplots()

    def segment(member: int, begin: int, end: int, color: object) -> None:
        """One stretch of a member's line, coloured by where its weights came from."""
        ax.plot([begin, end], [member] * 2, color=color, linewidth=3, solid_capstyle="butt")

    origin = {m: m for m in by_member}
    steps = sorted({r.step for r in records})
    start = {m: (recs[0].step if recs else 0) for m, recs in by_member.items()}
    for step in steps:
        at_step = [r for r in records if r.step == step]
        before = dict(origin)
        for record in at_step:
            if record.event == "exploit" and record.parent != record.member:
                segment(record.member, start[record.member], step, colors[before[record.member]])
                ax.annotate(
                    "",
                    xy=(step, record.member),
                    xytext=(donor_step(record), record.parent),
                    arrowprops={"arrowstyle": "->", "color": colors[before[record.parent]], "lw": 1.2},
                )
                origin[record.member] = before[record.parent]
                start[record.member] = step
            elif record.event == "rejuvenate":
                segment(record.member, start[record.member], step, colors[before[record.member]])
                ax.plot([step], [record.member], "*", color="grey", markersize=9)
                origin[record.member] = record.member
                start[record.member] = step
    for member in by_member:
        segment(member, start[member], last, colors[origin[member]])
    if highlight is not None and highlight in by_member:
        for member, begin, end in ancestry_segments(by_member, highlight, last):
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
    return save_figure(figure, path)


# -- the whole report --------------------------------------------------------------------------------
