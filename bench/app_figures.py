"""The figures of the applications report: per task, the learning curves of each arm's best member and
the schedule PBT found.

What they are drawn from, and why it is kept in ``applications.json`` (so that ``python -m bench
--report`` redraws them without the raw launches, which stay out of git):

- every member records its validation score at every validation of its fit (``history`` in its
  ``member_<id>.json``, :class:`bench.app_members.FinalEvaluation`); an arm's best member's curve
  (:func:`best_member_curve`) follows its ancestry through the lineage: before a copy the weights it
  went on training were the donor's, so the curve is the donor's score up to the step it was copied at
  and the member's own after it (its own score at the copy step scored the weights it dropped);
- the schedule figure needs every member's hyperparameters at every ready step: the PBT arm's lineage
  of one seed (:func:`schedule_source`), drawn by :func:`lightning_pbt.tools.plots.plot_schedule`.

matplotlib is optional (the ``examples`` extra): without it :func:`write_figures` draws nothing and
says so, and the report prints that line instead of the figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.applications_report import ARM_NAMES
from bench.stats import median_iqr
from lightning_pbt.algorithm.lineage import LineageRecord, read_lineage, records_by_member
from lightning_pbt.tools.plots import ancestry_segments

__all__ = ["ancestry_curve", "best_member_curve", "figure_files", "median_curves", "schedule_source",
           "write_figures"]

NO_MATPLOTLIB = ("Figures not drawn: matplotlib is not installed (it comes with the examples' extra: "
                 "`pip install -e '.[examples]'`).")
_LINEAGE_KEYS = ("step", "epoch", "member", "event", "parent", "score", "hyperparameters")


def ancestry_curve(histories: Mapping[int, Sequence[Sequence[Any]]],
                   segments: Sequence[tuple[int, int, int]]) -> list[list[Any]]:
    """``[[step, score, member whose weights were scored], ...]``, oldest first, along ``segments``
    (:func:`~lightning_pbt.tools.plots.ancestry_segments`, newest first): of each segment ``(member,
    begin, end)`` the member's scores at ``begin < step <= end``. The step a segment begins at is left
    out: there the member scored the weights it then dropped for a copy (or a re-initialisation); no
    validation of a fit happens at step 0, where the first segment begins."""
    return [[step, score, member] for member, begin, end in reversed(segments)
            for step, score in histories.get(member, ()) if begin < step <= end]


def best_member_curve(out: Path, members: Iterable[Mapping[str, Any]], best: int) -> list[list[Any]] | None:
    """The validation curve of member ``best`` of the launch in ``out`` along its ancestry (an arm
    without a lineage, or one that never copies, is the member's own history); ``None`` when the
    members recorded no history (launches from before it was recorded)."""
    histories = {m["member"]: m["history"] for m in members if m.get("history") is not None}
    if best not in histories:
        return None
    last = max((step for step, _ in histories[best]), default=0)
    lineage = out / "pbt" / "lineage.jsonl"
    by_member = records_by_member(read_lineage(lineage)) if lineage.exists() else {}
    return ancestry_curve(histories, ancestry_segments(by_member, best, last))


def schedule_source(launch: Path, seed: int, best: int) -> dict[str, Any] | None:
    """What the schedule figure is drawn from: the lineage of one launch (``launch/pbt/lineage.jsonl``)
    without its timings and texts, the seed and the member drawn bold; ``None`` without a lineage."""
    path = launch / "pbt" / "lineage.jsonl"
    if not path.exists():
        return None
    rows = []
    for record in read_lineage(path):
        row = {key: value for key, value in record.to_dict().items() if key in _LINEAGE_KEYS}
        if record.donor_step is not None:
            row["donor_step"] = record.donor_step
        rows.append(row)
    return {"seed": seed, "member": best, "records": rows}


def median_curves(per_seed: Mapping[str, Mapping[str, Any]], seeds: Iterable[Any],
                  arms: Iterable[str]) -> dict[str, list[list[Any]]]:
    """Per arm, at every step any of ``seeds`` has a score: ``[step, median, first quartile, third
    quartile, seeds counted]`` of the best member's curve over those seeds (missing scores left out)."""
    out: dict[str, list[list[Any]]] = {}
    for arm in arms:
        by_step: dict[int, list[float | None]] = {}
        for seed in seeds:
            for step, score, _ in (per_seed.get(str(seed), {}).get(arm, {}).get("curve") or ()):
                by_step.setdefault(step, []).append(score)
        rows = [[step, s["median"], s["q1"], s["q3"], s["n"]]
                for step, s in ((step, median_iqr(values)) for step, values in sorted(by_step.items())) if s["n"]]
        if rows:
            out[arm] = rows
    return out


def figure_files(app: str) -> dict[str, str]:
    """Where an app's two figures go, relative to the results folder (``RESULTS.md``'s)."""
    return {"curves": f"figures/applications_{app}_curves.png", "schedule": f"figures/applications_{app}_schedule.png"}


def _curve_seeds(a: Mapping[str, Any]) -> list[Any]:
    """The seeds a curve is summarised over: the complete seeds, as the table (else every seed found)."""
    return list(a.get("complete_seeds") or a.get("per_seed", {}))


def write_figures(r: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """Draw both figures of every app of ``applications.json`` ``r`` that has what they need, under
    ``folder`` (the results folder; the files are :func:`figure_files`).

    Returns:
        ``{"note": None or why nothing was drawn, "apps": {app: {"curves": path, "schedule": path,
        "seeds": [...], "schedule_seed": seed, "schedule_member": member}}}`` (paths relative to
        ``folder``; a figure that could not be drawn is absent).
    """
    wanted = {}
    for app, a in r.get("apps", {}).items():
        curves = median_curves(a.get("per_seed", {}), _curve_seeds(a), a.get("summary") or r["config"].get("arms", ()))
        if curves or a.get("schedule_figure"):
            wanted[app] = (a, curves)
    if not wanted:
        return {"note": None, "apps": {}}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {"note": NO_MATPLOTLIB, "apps": {}}
    from lightning_pbt.tools.plots import plot_schedule

    drawn: dict[str, dict[str, Any]] = {}
    for app, (a, curves) in wanted.items():
        files, entry = figure_files(app), drawn.setdefault(app, {})
        if curves:
            score = r["config"][app]["score"]
            _plot_curves(curves, folder / files["curves"], f"{app}: each arm's best member's {score}",
                         math.isqrt(r["config"].get("population", 4)))
            entry.update(curves=files["curves"], seeds=_curve_seeds(a))
        source = a.get("schedule_figure")
        if source:
            records = [LineageRecord.from_dict(row) for row in source["records"]]
            plot_schedule(records, folder / files["schedule"], source["member"],
                          title=f"{app}: the schedule PBT found (seed {source['seed']})\nevery member's own values "
                                f"grey, the best member's ({source['member']}) schedule black")
            entry.update(schedule=files["schedule"], schedule_seed=source["seed"], schedule_member=source["member"])
    return {"note": None, "apps": drawn}


def _plot_curves(curves: Mapping[str, list[list[Any]]], path: Path, title: str, side: int) -> None:
    from lightning_pbt.tools.plots import new_figure, save_figure

    figure = new_figure(1, height=3.6)
    ax = figure.subplots()
    for arm, rows in curves.items():
        steps = [row[0] for row in rows]
        label = ARM_NAMES.get(arm, arm).replace("2x2", f"{side}x{side}")  # the grid's side, as in the table
        (line,) = ax.plot(steps, [row[1] for row in rows], "-", marker=".", label=label)
        ax.fill_between(steps, [row[2] for row in rows], [row[3] for row in rows], color=line.get_color(), alpha=0.15)
    ax.set_title(title + "\nalong its ancestry; median over seeds, interquartile range shaded", fontsize="medium")
    ax.set_xlabel("global step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    save_figure(figure, path)
