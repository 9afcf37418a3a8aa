"""The three pictures of a finished run (``python -m lightning_pbt.report`` draws them):

- ``hyperparameters.png``: each hyperparameter's value per member over the steps;
- ``scores.png``: each member's score at every ready step (x: an exploit);
- ``lineage_tree.png``: who copied whom and when; a member's colour is the member its weights
  originally came from, the best member's ancestry is drawn in black.

matplotlib (Agg, no display) is imported only when a plot is made.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_pbt.algorithm.lineage import LineageRecord, records_by_member
from lightning_pbt.algorithm.run_reading import donor_step, finite_number, hyperparameter_names

__all__ = ["PLOTS", "plot_hyperparameters", "plot_lineage_tree", "plot_scores"]

PLOTS = ("hyperparameters.png", "scores.png", "lineage_tree.png")


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
    by_member = records_by_member(records)
    names = hyperparameter_names(records) or ["(none)"]
    colors = _colors(by_member)
    figure = _figure(len(names))
    axes = figure.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        values = [r.hyperparameters.get(name) for r in records if name in r.hyperparameters]
        numeric = bool(values) and all(finite_number(v) for v in values)
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
    by_member = records_by_member(records)
    colors = _colors(by_member)
    figure = _figure(1, height=3.6)
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
    by_member = records_by_member(records)
    colors = _colors(by_member)
    last = _last_step(records)
    figure = _figure(1, height=max(2.0, 0.45 * len(by_member) + 1.0))
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
