"""Section 7 of RESULTS.md: the applications table, from ``applications.json``.

Two shapes of results are rendered: the population-4 run of 2026-12 (4 members x 1 rank, a 2 x 2 grid,
min/max over seeds; its JSON has no ``population`` key), which stays readable as it was published, and
the population-16 protocol (any population; median and interquartile range, wins/ties/losses with the
sign test and the Wilcoxon signed-rank p-value, the spread of random configurations against seed noise).
"""

from __future__ import annotations

import math
from statistics import median
from typing import Any

from bench.markdown import spread_cell, table

__all__ = ["figure_lines", "render_section", "trained_schedule", "wall_ratio"]

ARM_NAMES = {"pbt": "PBT (truncation)", "pbt_tournament": "PBT (binary tournament)",
             "pbt_ttest": "PBT (Welch t-test)", "pb2": "PB2", "random_search": "random search (PBT, no exploit)",
             "grid": "best of a 2x2 grid", "default": "the app's defaults, one member per seed"}
METRICS = {"test_acc": ("test accuracy", 3), "test_perplexity": ("test perplexity", 3),
           "test_return": ("return on 10 held-out seeds", 1)}


def render_section(r: dict[str, Any], figures: dict[str, Any] | None = None) -> list[str]:
    """Section 7 of RESULTS.md (and the README's Applications table); ``figures``: what
    :func:`bench.app_figures.write_figures` drew beside it (the population-4 results have none)."""
    if "population" in r["config"]:
        return render_population(r, figures)
    return render_population4(r)


def _header(r: dict[str, Any], layout: str, statistics: str) -> list[str]:
    """The section's first paragraph (``statistics`` ends it), then the notes on kept arms and failures."""
    cfg = r["config"]
    out = ["", f"## 7. Applications at population {cfg.get('population', 4)}: PBT against its alternatives at equal "
           "compute", "",
           f"`{r['command']}`, {r['date']}, {r['wall_s'] / 60:.0f} min. {layout}, "
           f"seeds {cfg['seeds']} (paired: member i of every arm starts from the same weights and data/environment "
           "seed); every arm trains every member the same number of steps, so every arm costs the same "
           "member-steps. Result: the test metric of the arm's member with the best final validation score"
           + statistics]
    if cfg.get("arms_kept_from_an_earlier_run"):
        out += ["", f"{cfg['arms_kept_from_an_earlier_run']} arms were kept from an earlier run with the same launch "
                "configs (the wall time above is this run's only); every launch's own wall time is in the JSON."]
    for failure in r.get("failures", []):
        out += ["", f"Did not finish: {failure.splitlines()[0]}"]
    return out


def render_population(r: dict[str, Any], figures: dict[str, Any] | None = None) -> list[str]:
    cfg = r["config"]
    side = math.isqrt(cfg["population"])
    out = _header(r, f"Population {cfg['population']}: {cfg['processes']} processes x {cfg['members_per_process']} "
                     "members taking turns, 1 rank per member",
                  "; median [first quartile, third quartile] over seeds; PBT's wins/ties/losses against each arm "
                  "seed by seed, the exact two-sided sign test (ties left out) and the exact Wilcoxon signed-rank "
                  "p-value of the paired differences; wall time of a launch (all members), median.")
    for app, a in r["apps"].items():
        c = cfg[app]
        name, digits = METRICS[c["test"]]
        out += _task_lines(app, c, a)
        rows = []
        for arm, s in a["summary"].items():
            w = a["pbt_vs"].get(arm)
            versus = "" if w is None else f"{w['wins']}/{w['ties']}/{w['losses']}"
            sign = "" if w is None else f"{w['sign_p']:.3f}"
            wilcoxon = "" if w is None else f"{w['wilcoxon_p']:.3f}"
            label = ARM_NAMES.get(arm, arm).replace("2x2", f"{side}x{side}")
            rows.append([label, _iqr_cell(s["test"], digits), versus, sign, wilcoxon, f"{s['wall_s']['median']:.0f}"])
        out += table(["arm", name, "PBT wins/ties/losses", "sign test p", "Wilcoxon p", "wall s"], rows)
        spread_digits = max(digits, 3)  # significant digits: a return's one would print a spread of 17.4 as 2e+01
        for seed, spreads in a.get("separation", {}).items():
            rc, noise = spreads["random_configurations"], spreads["seed_noise"]
            verdict = "separates" if spreads["separates"] else "does not separate"
            out += ["", f"Seed {seed}: the random configurations' {name} spans IQR {_number(rc['iqr'], spread_digits)} "
                    f"(range {_number(rc['range'], spread_digits)}); the defaults' seed noise IQR "
                    f"{_number(noise['iqr'], spread_digits)} (range {_number(noise['range'], spread_digits)}); ratio "
                    f"{_number(spreads['iqr_ratio'], 2)}, {verdict}"
                    f" (criterion: >= {spreads['factor']:g})."]
        out += figure_lines(app, c["score"], (figures or {}).get("apps", {}).get(app, {}))
    if figures and figures.get("note"):
        out += ["", figures["note"]]
    return out


def _task_lines(app: str, c: dict[str, Any], a: dict[str, Any]) -> list[str]:
    """A task's heading: its settings, metric, complete seeds, and the runs its results come from."""
    name = METRICS[c["test"]][0]
    complete = a["complete_seeds"]
    seeds = f"{len(complete)} complete seeds" + (f" ({', '.join(map(str, complete))})" if "runs" in a else "")
    summaries = [f"`{run['command']}` ({run['date']}, seeds {run['seeds']})" for run in a.get("runs", [])]
    runs = f" Summarised by {'; '.join(summaries)}." if summaries else ""
    finished = sorted(e["finished"] for arms in a["per_seed"].values() for e in arms.values() if "finished" in e)
    if finished:  # when the launches ran: a run may keep launches measured by an earlier one
        runs += f" Launches finished {finished[0]} to {finished[-1]}."
    return ["", f"**{app}** (`examples/{app}.py`, {' '.join(c['overrides'])}): {c['steps']}; score "
            f"{c['score']}; {name}, {'lower' if c['test'] == 'test_perplexity' else 'higher'} is better; "
            f"{seeds}.{runs}", ""]


def figure_lines(app: str, score: str, drawn: dict[str, Any]) -> list[str]:
    """The markdown of an app's figures (those drawn), each with a caption that says what is plotted."""
    out = []
    if "curves" in drawn:
        out += ["", f"![{app}: learning curves of each arm's best member]({drawn['curves']})", "",
                f"*Learning curves.* Per arm, the validation score ({score}) of the arm's best member (the one the "
                f"table reports: best final validation score) at every validation, median over seeds "
                f"{drawn['seeds']} with the interquartile range shaded. For the arms that copy (PBT, PB2) the curve "
                "follows the member's ancestry: up to a copy it is the donor's score (the weights the member went "
                "on training from), after it the member's own; the member's own score before a copy is not on it."]
    if "schedule" in drawn:
        out += ["", f"![{app}: the schedule PBT found]({drawn['schedule']})", "",
                f"*The schedule PBT (truncation) found*, seed {drawn['schedule_seed']}: each hyperparameter over the "
                "global steps, every member's own values at its ready steps in grey, and in black the schedule "
                f"that member {drawn['schedule_member']}'s final weights (the arm's best) were trained with, "
                "through the members it copied."]
    return out


def _number(value: float | None, digits: int) -> str:
    """A spread or a ratio; ``n/a`` where the JSON holds None (not finite: no spread at all)."""
    return "n/a" if value is None else f"{value:.{digits}g}"


def _iqr_cell(s: dict[str, Any], digits: int) -> str:
    if not s.get("n"):
        return "n/a"
    return f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}, {s['q3']:.{digits}f}]"


def render_population4(r: dict[str, Any]) -> list[str]:
    """The population-4 results as published (min/max over seeds, 2x2 grid, a schedule table)."""
    cfg = r["config"]
    out = _header(r, f"{cfg['members']} members x 1 rank per arm",
                  ", median [min, max] over seeds; PBT's wins/ties/losses against each arm, seed by seed; wall time "
                  "of a launch (all members), median.")
    for app, a in r["apps"].items():
        c = cfg[app]
        name, digits = METRICS[c["test"]]
        out += _task_lines(app, c, a)
        rows = []
        for arm, s in a["summary"].items():
            w = a["pbt_vs"].get(arm)
            rows.append([ARM_NAMES[arm], spread_cell(s["test"], digits),
                         "" if w is None else f"{w['wins']}/{w['ties']}/{w['losses']}",
                         f"{s['wall_s']['median']:.0f}", f"{wall_ratio(a, arm):.2f}"])
        out += table(["arm", name, "PBT wins/ties/losses", "wall s", "PBT wall / this arm's (paired median)"], rows)
        grid = "; ".join(", ".join(f"{k}={v:g}" for k, v in point.items()) for point in c["grid"])
        out += ["", f"Grid points: {grid}."]
        first = next((e["pbt"] for e in a["per_seed"].values() if "schedule" in e.get("pbt", {})), None)
        if first is not None:
            names = sorted(first["schedule"][0]) if first["schedule"] else []
            names = [n for n in names if n != "step"]
            out += ["", f"Schedule of PBT's best member (member {first['member']}, first seed, "
                    f"{first['exploits']} exploits in the population; values set at the final step, which "
                    "nothing trained with, left out):", ""]
            out += table(["step", *names], [[str(e["step"]), *(f"{e[n]:.4g}" for n in names)]
                                             for e in trained_schedule(first)])
    return out


def wall_ratio(app_result: dict[str, Any], arm: str) -> float:
    """PBT's launch wall time over ``arm``'s, seed by seed, median: the machine's load drifts between seeds."""
    seeds = [app_result["per_seed"][str(s)] for s in app_result["complete_seeds"]]
    return median(e["pbt"]["wall_s"] / e[arm]["wall_s"] for e in seeds)


def trained_schedule(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The schedule entries some training used: not those set at the last step (after the last ready step)."""
    return [e for e in entry["schedule"] if e["step"] < max(entry["steps"])]
