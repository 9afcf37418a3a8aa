"""The markdown report (``RESULTS.md``) rendered from the JSON results in a results folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ORDER = ("transfer", "ready_step", "overhead", "quality", "schedule")


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    results = {}
    for name in ORDER:
        path = folder / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text(encoding="utf-8"))
    return results


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _met(target: dict[str, Any]) -> str:
    if not target.get("applies", True):
        return "n/a (smoke size)"
    return "**met**" if target.get("met") else "**missed**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _spread(s: dict[str, Any], digits: int = 3) -> str:
    return f"{_f(s['median'], digits)} [{_f(s['min'], digits)}, {_f(s['max'], digits)}]"


def render(results: dict[str, dict[str, Any]]) -> str:
    if not results:
        return "# Benchmark results\n\nNo results yet: run `make bench`.\n"
    first = next(iter(results.values()))
    m, v = first["machine"], first["versions"]
    out = ["# Benchmark results", ""]
    out.append(f"Machine: {m['cpu_model']}, {m['cores']} cores, {_f(m.get('memory_gb'), 0)} GB RAM, "
               f"GPU: {m.get('gpu') or 'none'} (shared and noisy; load average at start "
               f"{m.get('load_average_at_start')}). Python {v['python']}, torch {v['torch']}, "
               f"pytorch-lightning {v['pytorch_lightning']}.")
    smoke = any(r.get("smoke") for r in results.values())
    if smoke:
        out += ["", "**Smoke size: these numbers only show that the benchmarks run.**"]
    out += ["", "Every timing is a median over repetitions after warm-up; every comparison is a ratio measured in",
            "the same run (and, for 1 and 2, the same processes, interleaved)."]

    targets: list[list[str]] = []
    if "transfer" in results:
        r = results["transfer"]
        t = r["targets"]["ratio_at_10MB_and_above"]
        targets.append(["1. exploit transfer, ours / raw send-recv, at >= 10 MB", t["target"],
                        f"worst {_f(t['value'])}", _met(t)])
    if "ready_step" in results:
        t = results["ready_step"]["targets"]["grows_no_faster_than_allgather"]
        value = t["value"]
        targets.append(["2. ready step grows no faster than the all-gather", "growth ours <= growth all-gather",
                        f"{_f(value['ours_growth'])}x vs {_f(value['raw_allgather_growth'])}x", _met(t)])
    if "overhead" in results:
        t = results["overhead"]["targets"]["ratio"]
        extra = ""
        if "interleaved_value" in t:
            extra = f" (interleaved {_f(t['interleaved_value'], 3)}, CPU time {_f(t.get('cpu_value'), 3)})"
        targets.append([f"3. training throughput with / without the callback ({t['model']})", t["target"],
                        f"{_f(t['value'], 3)}{extra}", _met(t)])
    if targets:
        out += ["", "## Targets", "", *_table(["what", "target", "measured", ""], targets)]

    if "transfer" in results:
        r = results["transfer"]
        out += ["", "## 1. Exploit transfer (model + Adam state, winner -> loser, gloo, CPU)", "",
                f"`{r['command']}`, {r['date']}. Ours = `state_dict` + `flatten_state` + the callback's "
                "`_transfer_states` (JSON skeleton and tensors in one round, received into the loser's own "
                "tensors, optimizer `load_state_dict`); raw = "
                "`torch.distributed.send/recv` of one flat buffer of the same bytes. Prototype = "
                "`bench/transfer_proto.py` (in-place receive, one round trip, JSON skeleton).", ""]
        rows = [[row["layout"], f"{row['state_bytes'] / 1e6:.1f} MB", str(row["messages"]), _f(row["ours_ms"]),
                 _f(row["raw_ms"]), f"**{_f(row['ratio'])}**", _f(row["prototype_ms"]), _f(row["prototype_ratio"]),
                 _f(row["raw_gbps"])]
                for row in r["rows"]]
        out += _table(["layout", "state", "messages", "ours ms", "raw ms", "ours/raw", "prototype ms",
                       "prototype/raw", "raw GB/s"], rows)
        profile = r["profiles"].get("2x1") or next(iter(r["profiles"].values()), None)
        if profile:
            sizes = list(profile)
            phases = [p for p in profile[sizes[0]]["receiver_ms"]
                      if any(profile[s]["receiver_ms"][p] or profile[s]["sender_ms"][p] for s in sizes)]
            out += ["", "Where the time goes, 2x1 layout, mean ms per exploit (phases of `_transfer_states` timed one "
                    "by one; sender / receiver):", ""]
            rows = [[p.replace("_", " ")] + [f"{_f(profile[s]['sender_ms'][p])} / {_f(profile[s]['receiver_ms'][p])}"
                                             for s in sizes] for p in phases]
            out += _table(["phase", *[f"{s} MB" for s in sizes]], rows)
    if "ready_step" in results:
        r = results["ready_step"]
        out += ["", "## 2. Ready-step latency, no transfer (tiny model, 1 rank per member)", "",
                f"`{r['command']}`, {r['date']}. Ours = the callback's whole ready step (row all-gather with "
                "`flatten_state`, decision, JSON broadcast, apply, fsynced lineage); the references run on the "
                "same population group in the same processes. 8 and 16 ranks oversubscribe the 2 cores.", ""]
        rows = [[str(row["ranks"]), _f(row["ours_ms"]), _f(row["callback_gather_ms"]), _f(row["callback_decide_ms"]),
                 _f(row["raw_allgather_ms"]), _f(row["collectives_ms"]), _f(row["ratio"]),
                 f"{_f(row['ours_growth'])}x", f"{_f(row['raw_allgather_growth'])}x"]
                for row in r["rows"]]
        out += _table(["ranks", "ours ms", "of which gather", "of which decide+broadcast", "bare all-gather ms",
                       "all-gather + decision broadcast ms", "ours/all-gather", "ours growth", "all-gather growth"],
                      rows)
    if "overhead" in results:
        r = results["overhead"]
        out += ["", "## 3. Training overhead (2 members x 1 rank, ready every "
                f"{r['config']['every_n_train_steps']} steps, an exploit at every ready step)", "",
                f"`{r['command']}`, {r['date']}.", ""]

        def iqr(s: dict[str, Any]) -> str:
            return "{} [{}, {}]".format(*(_f(s[k], 3) for k in ("median", "q1", "q3")))

        segment = r["rows"][0]["interleaved"]["segment_steps"]
        out += ["Wall clock, separate runs alternating ABBA (the measure the target names), and two measures that "
                f"resist the other jobs on this machine: one run alternating {segment}-step segments with the "
                "ready steps on and off, and CPU seconds per step (all ranks). Ratios are throughput with / "
                "without PBT.", ""]
        rows = [[row["model"], f"{row['params']:,}", f"{row['state_mb']:.2f} MB", _f(row["step_ms_baseline"]),
                 _f(row["pbt_steps_per_s"], 1), _f(row["baseline_steps_per_s"], 1), f"**{_f(row['ratio'], 3)}**",
                 iqr(row["ratio_paired"]), iqr(row["interleaved_ratio"]), _f(row["cpu_ratio"], 3),
                 iqr(row["interleaved_cpu_ratio"]), f"{100 * row['ready_time_fraction']:.1f} %",
                 _f(row["ready_step_ms"]["median"], 1), str(row["reps"])]
                for row in r["rows"]]
        out += _table(["model", "params", "state", "step ms (no PBT)", "steps/s with PBT", "steps/s without",
                       "ratio of medians", "neighbour-run ratios, median [q1, q3]", "interleaved segments",
                       "CPU time", "CPU time, interleaved", "wall time in ready steps", "ready step ms",
                       "runs per arm"], rows)
        tails = ", ".join(f"{row['model']}: {_f(row['end_of_fit_ms']['pbt'], 0)} ms vs "
                          f"{_f(row['end_of_fit_ms']['baseline'], 0)} ms" for row in r["rows"])
        out += ["", f"Once per fit, after the last step, until `on_train_end` has run everywhere: {tails} "
                "(with / without the callback)."]
    if "quality" in results:
        r = results["quality"]
        cfg = r["config"]
        out += ["", "## 4. Search quality at equal compute", "", f"`{r['command']}`, {r['date']}.", "",
                f"Toy (Jaderberg et al. Fig. 2, 2 members, {cfg['toy']['seeds']} seeds): best true Q "
                "(optimum 1.2), median [min, max].", ""]
        rows = [[str(row["steps"]), _spread(row["pbt"]), _spread(row["grid"]), _spread(row["random_search"]),
                 f"{row['pbt_beats_grid_seeds']}/{row['seeds']}", f"{row['pbt_beats_random_seeds']}/{row['seeds']}"]
                for row in r["toy"]]
        out += _table(["steps", "PBT", "grid (paper)", "random search", "PBT > grid", "PBT > random"], rows)
        d = cfg["digits"]
        out += ["", f"Digits ({d['model']}, {d['optimizer']}, {d['space']}, {d['members']} members x "
                f"{d['epochs']} epochs, {len(d['seeds'])} seeds): test accuracy of the member with the best "
                "validation accuracy, median [min, max].", ""]
        s, w = r["digits"]["summary"], r["digits"]["wins"]
        rows = [["PBT", _spread(s["pbt"]["test_acc"]), _spread(s["pbt"]["mean_member_test_acc"]), ""],
                ["random search (same population, no callback)", _spread(s["random_search"]["test_acc"]),
                 _spread(s["random_search"]["mean_member_test_acc"]),
                 "PBT wins/ties/losses: {wins}/{ties}/{losses}".format(**w["pbt_vs_random_search"])],
                [f"default (lr = {d['default_lr']})", _spread(s["default"]["test_acc"]),
                 _spread(s["default"]["mean_member_test_acc"]),
                 "PBT wins/ties/losses: {wins}/{ties}/{losses}".format(**w["pbt_vs_default"])]]
        out += _table(["arm", "best member's test accuracy", "mean member's test accuracy", "paired by seed"], rows)
    if "schedule" in results:
        out += render_schedule(results["schedule"])
    return "\n".join(out) + "\n"


SCHEDULE_ARMS = (
    ("pbt", "PBT"),
    ("pb2", "PB2"),
    ("random_search", "random search"),
    ("cosine", "cosine from the grid's best"),
    ("grid", "grid: best constant (oracle)"),
)
SCHEDULE_PAIRS = (
    ("pb2_vs_pbt", "PB2 vs PBT"),
    ("pbt_vs_random_search", "PBT vs random"),
    ("pb2_vs_random_search", "PB2 vs random"),
    ("pbt_vs_grid", "PBT vs grid"),
    ("pb2_vs_grid", "PB2 vs grid"),
    ("pbt_vs_cosine", "PBT vs cosine"),
    ("pb2_vs_cosine", "PB2 vs cosine"),
)


def render_schedule(r: dict[str, Any]) -> list[str]:
    """Section 5: the schedule task (lower excess risk is better)."""
    cfg = r["config"]
    out = [
        "",
        "## 5. Schedules: a task where the best learning rate changes during training",
        "",
        f"`{r['command']}`, {r['date']}. Noisy quadratic model: linear regression, {cfg['dim']} dimensions "
        f"({cfg['input_variances']}), minibatch SGD (batch {cfg['batch']}), {cfg['steps']} steps, "
        f"{cfg['space']}, {len(cfg['seeds'])} seeds. The population runs in one process with the library's "
        "`PBTScheduler` (see `bench/schedule.py`). Test excess risk of the member with the best final "
        "validation loss (lower is better), median [min, max] over seeds; the grid costs "
        f"{len(cfg['grid'])} runs, the other arms one run per member.",
        "",
    ]
    rows = [
        [f"{row['members']} x every {row['ready']}"]
        + [_spread(row["summary"][arm]["excess_risk"], 4) for arm, _ in SCHEDULE_ARMS]
        for row in r["rows"]
    ]
    out += _table(["members x ready steps", *(label for _, label in SCHEDULE_ARMS)], rows)
    out += [
        "",
        "Paired by seed, wins/ties/losses of the first arm (lower excess risk wins), and the median "
        "ratio of each arm's excess risk to the grid's:",
        "",
    ]
    rows = [
        [f"{row['members']} x every {row['ready']}"]
        + ["{wins}/{ties}/{losses}".format(**row["wins"][key]) for key, _ in SCHEDULE_PAIRS]
        + [" / ".join(_f(row["summary"][arm]["ratio_to_grid"]["median"]) for arm in ("pbt", "pb2", "cosine"))]
        for row in r["rows"]
    ]
    out += _table(
        ["members x ready steps", *(label for _, label in SCHEDULE_PAIRS), "ratio to grid: PBT / PB2 / cosine"], rows
    )
    out += [
        "",
        "The schedules found: learning rate of the best member at 10 % / 50 % / 90 % of training (median "
        "over seeds), the grid's best constant, and PB2's decision time per ready step:",
        "",
    ]
    rows = []
    for row in r["rows"]:
        s = row["summary"]
        found = [
            " / ".join(f"{s[arm]['lr_at'][q]['median']:.3g}" for q in ("10%", "50%", "90%")) for arm in ("pbt", "pb2")
        ]
        rows.append(
            [
                f"{row['members']} x every {row['ready']}",
                *found,
                f"{s['grid']['lr']['median']:.3g}",
                _f(s["pb2"]["decide_ms_per_ready_step"]["median"], 0),
            ]
        )
    out += _table(["members x ready steps", "PBT", "PB2", "grid's best constant", "PB2 ms per ready step"], rows)
    return out


def write_report(folder: Path) -> Path:
    path = folder / "RESULTS.md"
    path.write_text(render(load_results(folder)), encoding="utf-8")
    return path
