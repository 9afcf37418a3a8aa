"""The markdown report (``RESULTS.md``) rendered from the JSON results in a results folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.markdown import fmt, spread_cell, table

ORDER = (
    "transfer", "ready_step", "overhead", "quality", "schedule", "asynchronous", "decisions", "pbt_function_plugin",
    "turns", "applications", "trainer_memory",
)
# What `python -m bench` runs without --only: applications takes an hour and trainer_memory a quarter of one,
# so they are asked for by name.
DEFAULT = ORDER[:-2]


# Published results that no benchmark writes any more, rendered after the current ones: the applications
# at population 4 (2026-12-05), which `--only applications` (population 16) replaced.
ARCHIVED = ("applications_p4",)


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    results = {}
    for name in (*ORDER, *ARCHIVED):
        path = folder / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text(encoding="utf-8"))
    return results


def _met(target: dict[str, Any]) -> str:
    if not target.get("applies", True):
        return "n/a (smoke size)"
    return "**met**" if target.get("met") else "**missed**"


def render(results: dict[str, dict[str, Any]], figures: dict[str, Any] | None = None) -> str:
    """RESULTS.md from the results; ``figures``: the applications figures drawn beside it."""
    if not results:
        return "# Benchmark results\n\nNo results yet: run `make bench`.\n"
    first = next(iter(results.values()))
    m, v = first["machine"], first["versions"]
    out = ["# Benchmark results", ""]
    out.append(f"Machine: {m['cpu_model']}, {m['cores']} cores, {fmt(m.get('memory_gb'), 0)} GB RAM, "
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
                        f"worst {fmt(t['value'])}", _met(t)])
    if "ready_step" in results:
        t = results["ready_step"]["targets"]["grows_no_faster_than_allgather"]
        value = t["value"]
        targets.append(["2. ready step grows no faster than the all-gather", "growth ours <= growth all-gather",
                        f"{fmt(value['ours_growth'])}x vs {fmt(value['raw_allgather_growth'])}x", _met(t)])
    if "overhead" in results:
        t = results["overhead"]["targets"]["ratio"]
        extra = ""
        if "interleaved_value" in t:
            extra = f" (interleaved {fmt(t['interleaved_value'], 3)}, CPU time {fmt(t.get('cpu_value'), 3)})"
        targets.append([f"3. training throughput with / without the callback ({t['model']})", t["target"],
                        f"{fmt(t['value'], 3)}{extra}", _met(t)])
    if "asynchronous" in results:
        t = results["asynchronous"]["targets"]
        targets.append(["6. member-steps/s, asynchronous / synchronous, 2 of 4 members 3x slower",
                        t["async_over_sync_mixed"]["target"], fmt(t["async_over_sync_mixed"]["value"], 3),
                        _met(t["async_over_sync_mixed"])])
        targets.append(["6. member-steps/s with the asynchronous callback / without, equal speeds",
                        t["async_callback_over_none_equal"]["target"],
                        fmt(t["async_callback_over_none_equal"]["value"], 3),
                        _met(t["async_callback_over_none_equal"])])
    if targets:
        out += ["", "## Targets", "", *table(["what", "target", "measured", ""], targets)]

    if "transfer" in results:
        r = results["transfer"]
        out += ["", "## 1. Exploit transfer (model + Adam state, winner -> loser, gloo, CPU)", "",
                f"`{r['command']}`, {r['date']}. Ours = the synchronous ready step's `_move_states`: the donor's "
                "`training_state` + `flatten_state` + `pack_state` + `send_state`, the loser's own `flatten_state` "
                "(its in-place targets) + `receive_state` (header, then skeleton and messages, into its own tensors "
                "when the spec hashes match) + `load_training_state`; raw = `torch.distributed.send/recv` of one "
                "flat buffer of the same bytes; raw same group = that send/recv on the population group's backend. "
                "(The earlier prototype, `bench/transfer_proto.py`, is gone: its one-round, in-place receive is the "
                "package's path now.)", ""]
        rows = [[row["layout"], f"{row['state_bytes'] / 1e6:.1f} MB", str(row["messages"]), fmt(row["ours_ms"]),
                 fmt(row["raw_ms"]), f"**{fmt(row['ratio'])}**", fmt(row["raw_same_group_ms"]), fmt(row["raw_gbps"]),
                 fmt(row.get("received_in_place")), fmt(row["state_copied_exactly"])]
                for row in r["rows"]]
        out += table(["layout", "state", "messages", "ours ms", "raw ms", "ours/raw", "raw same group ms",
                       "raw GB/s", "in place", "copied exactly"], rows)
        profile = r["profiles"].get("2x1") or next(iter(r["profiles"].values()), None)
        if profile:
            sizes = list(profile)
            phases = [p for p in profile[sizes[0]]["receiver_ms"]
                      if any(profile[s]["receiver_ms"][p] or profile[s]["sender_ms"][p] for s in sizes)]
            out += ["", "Where the time goes, 2x1 layout, mean ms per exploit (the steps of `_move_states` timed one "
                    "by one; sender / receiver):", ""]
            rows = [[p.replace("_", " ")] + [f"{fmt(profile[s]['sender_ms'][p])} / {fmt(profile[s]['receiver_ms'][p])}"
                                             for s in sizes] for p in phases]
            out += table(["phase", *[f"{s} MB" for s in sizes]], rows)
    if "ready_step" in results:
        r = results["ready_step"]
        out += ["", "## 2. Ready-step latency, no transfer (tiny model, 1 rank per member)", "",
                f"`{r['command']}`, {r['date']}. Ours = the callback's whole synchronous ready step "
                "(`on_validation_end` -> `SynchronousReadySteps.step`: row all-gather, decision, JSON broadcast, "
                "apply, lineage handed to its background writer); the references run on the same population group "
                "in the same processes. 8 and 16 ranks oversubscribe the 2 cores.", ""]
        rows = [[str(row["ranks"]), fmt(row["ours_ms"]), fmt(row["raw_allgather_ms"]), fmt(row["collectives_ms"]),
                 fmt(row["ratio"]), f"{fmt(row['ours_growth'])}x", f"{fmt(row['raw_allgather_growth'])}x"]
                for row in r["rows"]]
        out += table(["ranks", "ours ms", "bare all-gather ms", "all-gather + decision broadcast ms",
                       "ours/all-gather", "ours growth", "all-gather growth"], rows)
        breakdowns = [row for row in r["rows"] if "breakdown_ms" in row]  # absent from older results
        if breakdowns:
            out += ["", "The step's own work, ms (slowest rank per phase; every rank starts after a barrier, so the "
                    "gather holds almost no waiting; the lineage: population rank 0):", ""]
            rows = [[str(row["ranks"])] + [fmt(row["breakdown_ms"][k]) for k in
                                           ("gather", "decide_and_broadcast", "transfer", "lineage_submit",
                                            "lineage_write_background")]
                    for row in breakdowns]
            out += table(["ranks", "gather", "decide + broadcast", "transfer", "lineage hand-over (training thread)",
                           "lineage write + fsync (background)"], rows)
    if "overhead" in results:
        r = results["overhead"]
        out += ["", "## 3. Training overhead (2 members x 1 rank, ready every "
                f"{r['config']['every_n_train_steps']} steps, an exploit at every ready step)", "",
                f"`{r['command']}`, {r['date']}.", ""]

        def iqr(s: dict[str, Any]) -> str:
            return "{} [{}, {}]".format(*(fmt(s[k], 3) for k in ("median", "q1", "q3")))

        segment = r["rows"][0]["interleaved"]["segment_steps"]
        out += ["Wall clock, separate runs alternating ABBA (the measure the target names), and two measures that "
                f"resist the other jobs on this machine: one run alternating {segment}-step segments with the "
                "ready steps on and off, and CPU seconds per step (all ranks). Ratios are throughput with / "
                "without PBT.", ""]
        rows = [[row["model"], f"{row['params']:,}", f"{row['state_mb']:.2f} MB", fmt(row["step_ms_baseline"]),
                 fmt(row["pbt_steps_per_s"], 1), fmt(row["baseline_steps_per_s"], 1), f"**{fmt(row['ratio'], 3)}**",
                 iqr(row["ratio_paired"]), iqr(row["interleaved_ratio"]), fmt(row["cpu_ratio"], 3),
                 iqr(row["interleaved_cpu_ratio"]), f"{100 * row['ready_time_fraction']:.1f} %",
                 fmt(row["ready_step_ms"]["median"], 1), str(row["reps"])]
                for row in r["rows"]]
        out += table(["model", "params", "state", "step ms (no PBT)", "steps/s with PBT", "steps/s without",
                       "ratio of medians", "neighbour-run ratios, median [q1, q3]", "interleaved segments",
                       "CPU time", "CPU time, interleaved", "wall time in ready steps", "ready step ms",
                       "runs per arm"], rows)
        tails = ", ".join(f"{row['model']}: {fmt(row['end_of_fit_ms']['pbt'], 0)} ms vs "
                          f"{fmt(row['end_of_fit_ms']['baseline'], 0)} ms" for row in r["rows"])
        out += ["", f"Once per fit, after the last step, until `on_train_end` has run everywhere: {tails} "
                "(with / without the callback)."]
        breakdowns = [(row["model"], row["ready_step_breakdown"]) for row in r["rows"] if "ready_step_breakdown" in row]
        if breakdowns:  # absent from older results
            out += ["", "Where a ready step's time goes in these runs (issue 12 item 6; ms, mean per ready step and "
                    "rank, so the parts add up; `bench/breakdown.py`). At each ready step the rank with the shortest "
                    "all-gather arrived last, so its gather is the collective's own cost and the others' excess is "
                    "waiting; transfer: the losers' exploits alone; lineage: per write, on population rank 0:", ""]
            out += table(*_sync_breakdown(breakdowns))
    if "quality" in results:
        r = results["quality"]
        cfg = r["config"]
        out += ["", "## 4. Search quality at equal compute", "", f"`{r['command']}`, {r['date']}.", "",
                f"Toy (Jaderberg et al. Fig. 2, 2 members, {cfg['toy']['seeds']} seeds): best true Q "
                "(optimum 1.2), median [min, max].", ""]
        rows = [[str(row["steps"]), spread_cell(row["pbt"]), spread_cell(row["grid"]),
                 spread_cell(row["random_search"]),
                 f"{row['pbt_beats_grid_seeds']}/{row['seeds']}", f"{row['pbt_beats_random_seeds']}/{row['seeds']}"]
                for row in r["toy"]]
        out += table(["steps", "PBT", "grid (paper)", "random search", "PBT > grid", "PBT > random"], rows)
        d = cfg["digits"]
        out += ["", f"Digits ({d['model']}, {d['optimizer']}, {d['space']}, {d['members']} members x "
                f"{d['epochs']} epochs, {len(d['seeds'])} seeds): test accuracy of the member with the best "
                "validation accuracy, median [min, max].", ""]
        s, w = r["digits"]["summary"], r["digits"]["wins"]
        rows = [["PBT", spread_cell(s["pbt"]["test_acc"]), spread_cell(s["pbt"]["mean_member_test_acc"]), ""],
                ["random search (same population, no callback)", spread_cell(s["random_search"]["test_acc"]),
                 spread_cell(s["random_search"]["mean_member_test_acc"]),
                 "PBT wins/ties/losses: {wins}/{ties}/{losses}".format(**w["pbt_vs_random_search"])],
                [f"default (lr = {d['default_lr']})", spread_cell(s["default"]["test_acc"]),
                 spread_cell(s["default"]["mean_member_test_acc"]),
                 "PBT wins/ties/losses: {wins}/{ties}/{losses}".format(**w["pbt_vs_default"])]]
        out += table(["arm", "best member's test accuracy", "mean member's test accuracy", "paired by seed"], rows)
    if "schedule" in results:
        out += render_schedule(results["schedule"])
    out += render_asynchronous_quality(results)
    if "decisions" in results:
        out += render_decisions(results["decisions"])
    if "pbt_function_plugin" in results:
        from bench.pbt_function_plugin import render_section as render_plugin_pbt_function

        out += render_plugin_pbt_function(results["pbt_function_plugin"])
    if "asynchronous" in results:
        out += _asynchronous_section(results["asynchronous"])
    if "turns" in results:
        out += render_turns(results["turns"])
    from bench.applications_report import render_section as render_applications

    if "applications" in results:
        out += render_applications(results["applications"], figures)
    if "applications_p4" in results:
        out += render_applications(results["applications_p4"])
    if "trainer_memory" in results:
        from bench.trainer_memory import render_section as render_memory

        out += render_memory(results["trainer_memory"])
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
        + [spread_cell(row["summary"][arm]["excess_risk"], 4) for arm, _ in SCHEDULE_ARMS]
        for row in r["rows"]
    ]
    out += table(["members x ready steps", *(label for _, label in SCHEDULE_ARMS)], rows)
    out += [
        "",
        "Paired by seed, wins/ties/losses of the first arm (lower excess risk wins), and the median "
        "ratio of each arm's excess risk to the grid's:",
        "",
    ]
    rows = [
        [f"{row['members']} x every {row['ready']}"]
        + ["{wins}/{ties}/{losses}".format(**row["wins"][key]) for key, _ in SCHEDULE_PAIRS]
        + [" / ".join(fmt(row["summary"][arm]["ratio_to_grid"]["median"]) for arm in ("pbt", "pb2", "cosine"))]
        for row in r["rows"]
    ]
    out += table(
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
                fmt(s["pb2"]["decide_ms_per_ready_step"]["median"], 0),
            ]
        )
    out += table(["members x ready steps", "PBT", "PB2", "grid's best constant", "PB2 ms per ready step"], rows)
    return out


def _wlt(w: dict[str, int]) -> str:
    return "{wins}/{ties}/{losses}".format(**w)


def render_asynchronous_quality(results: dict[str, dict[str, Any]]) -> list[str]:
    """Asynchronous PBT against lockstep, paired by seed, on the quality tasks (absent from older results)."""
    quality, schedule = results.get("quality", {}), results.get("schedule", {})
    if "pbt_function" not in quality and not any("pbt_async" in row["summary"] for row in schedule.get("rows", [])):
        return []
    out = ["", "## Asynchronous PBT vs lockstep: search quality, paired by seed", "",
           "Equal speeds (`async`), and with stragglers (3x slower) at the wall time lockstep needs with them, "
           "which is lockstep's own result (it waits); `old rule`: the decision before the like-with-like rule. "
           "Wins/ties/losses of the first arm against lockstep.", ""]
    rows = []
    for row in quality.get("toy", []):
        if "vs_lockstep" not in row:
            continue
        for arm in ("async", "async_old_rule", "async_straggler", "async_straggler_old_rule"):
            rows.append([f"paper toy, {row['steps']} steps, best Q (higher is better)", arm.replace("_", " "),
                         fmt(row["pbt"]["median"], 4), fmt(row[f"pbt_{arm}"]["median"], 4),
                         _wlt(row["vs_lockstep"][f"pbt_{arm}"])])
    if "pbt_function" in quality:
        pf = quality["pbt_function"]
        s, w, target = pf["summary"], pf["wins"], pf["config"]["target"]
        for arm in ("async", "async_old_rule", "async_stragglers", "async_stragglers_old_rule"):
            rows.append([f"Ray pbt_function, best final accuracy; seeds > {target:g}", arm.replace("_", " "),
                         f"{fmt(s['lockstep']['final_best']['median'], 1)}; {s['lockstep']['reached_target_seeds']}",
                         f"{fmt(s[arm]['final_best']['median'], 1)}; {s[arm]['reached_target_seeds']}",
                         _wlt(w[f"{arm}_vs_lockstep"])])
    digits = quality.get("digits", {})
    if "pbt_async" in digits.get("summary", {}):
        s, w = digits["summary"], digits["wins"]
        rows.append(["digits, best member's test accuracy", "async", fmt(s["pbt"]["test_acc"]["median"], 3),
                     fmt(s["pbt_async"]["test_acc"]["median"], 3), _wlt(w["pbt_async_vs_pbt"])])
        from bench.quality import PBT_VARIANTS

        variants = {**PBT_VARIANTS, **quality.get("config", {}).get("digits", {}).get("pbt_variants", {})}
        snapshots, wait = variants["pbt_async_snapshots"], variants["pbt_async_wait"]
        for arm, name in (("pbt_async_snapshots", f"async, snapshots every {snapshots['snapshot_every']} steps"),
                          ("pbt_async_wait", f"async, wait_for_peers={wait['wait_for_peers']:g}"),
                          ("pbt_reseeded", "lockstep reseeded (the noise band)")):
            if arm in s:
                rows.append(["digits, best member's test accuracy", name, fmt(s["pbt"]["test_acc"]["median"], 3),
                             fmt(s[arm]["test_acc"]["median"], 3), _wlt(w[f"{arm}_vs_pbt"])])
    for row in schedule.get("rows", []):
        s = row["summary"]
        for arm in ("pbt_async", "pbt_async_old_rule", "pbt_async_stragglers", "pbt_async_stragglers_old_rule"):
            if arm in s:
                rows.append([f"schedule {row['members']} x every {row['ready']}, excess risk (lower is better)",
                             arm.removeprefix("pbt_").replace("_", " "), fmt(s["pbt"]["excess_risk"]["median"], 4),
                             fmt(s[arm]["excess_risk"]["median"], 4), _wlt(row["wins"][f"{arm}_vs_pbt"])])
    out += table(["task, measure", "arm", "lockstep (median)", "arm (median)", "arm vs lockstep"], rows)
    return out


def render_decisions(r: dict[str, Any]) -> list[str]:
    """The simulated tasks at many paired seeds, each arm against lockstep, with the reseeded lockstep as
    the noise band."""
    from bench.decisions import verdict

    config = r["config"]
    out = ["", f"## Asynchronous vs lockstep decisions, {config['seeds']} paired seeds (simulated)", "",
           "`lockstep reseeded`: lockstep again with the scheduler seeded differently, the noise band. "
           "W/T/L against lockstep, the two-sided sign test's p over the decided pairs, and the target at equal "
           "speeds (no worse in median, at least 40 % of the decided pairs won).", ""]
    rows = []
    for task, entry in r["tasks"].items():
        higher = entry["higher_is_better"]
        for arm, e in entry["arms"].items():
            reached = f"; {e['reached_target_seeds']} reached" if "reached_target_seeds" in e else ""
            exploits = fmt(e["exploits_per_run"]["median"], 1) if "exploits_per_run" in e else ""
            w = e.get("vs_lockstep")
            rows.append([f"{task} ({'higher' if higher else 'lower'} is better)", arm.replace("_", " "),
                         fmt(e["value"]["median"], 4) + reached, exploits, _wlt(w) if w else "",
                         fmt(e["sign_test_p"], 3) if w else "",
                         verdict(entry, arm) if w and "stragglers" not in arm else ""])
    out += table(["task", "arm", "median", "exploits per run", "vs lockstep W/T/L", "sign test p", "target"], rows)
    return out


def _sync_breakdown(rows: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    header = ["", "ready step", "all-gather", "of which waiting", "of which its own work", "decide + broadcast",
              "transfer (exploits)", "rest of the step", "waiting share of ready-step time",
              "lineage hand-over (training thread)", "lineage write + fsync (background)"]
    body = [[name, fmt(b.get("total_ms")), fmt(b.get("gather_ms")), fmt(b.get("gather_waiting_ms")),
             fmt(b.get("gather_own_ms")), fmt(b.get("decide_ms")), fmt(b.get("exploit_transfer_ms")),
             fmt(b.get("other_ms")),
             f"{100 * b['waiting_share']:.0f} %" if b.get("waiting_share") is not None else "n/a",
             fmt(b.get("lineage_submit_ms")), fmt(b.get("lineage_write_background_ms"))]
            for name, b in rows]
    return header, body


def _asynchronous_section(r: dict[str, Any]) -> list[str]:
    cfg = r["config"]
    out = ["", f"## 6. Asynchronous PBT, members of unequal speed ({cfg['members']} members x 1 rank, members "
           f"{cfg['slow_members']} {cfg['slow_factor']}x slower)", "",
           f"`{r['command']}`, {r['date']}. Every training step is padded with `time.sleep` to "
           f"{1e3 * cfg['base_step_s']:.0f} ms x the member's speed (an emulated slower device: the speed belongs "
           "to the member, an exploit never copies it); validation and ready steps are not padded. Each run has the "
           f"same wall-time budget ({cfg['budget_s']:g} s from a common start); member-steps/s = the sum over "
           "members of their own steps / seconds; quality = held-out test accuracy of the member with the best "
           f"validation accuracy at the end of the budget. {cfg['reps']} repetition(s) per arm, median [min, max].",
           ""]
    rows = []
    for arm, a in r["arms"].items():
        rows.append([arm, a["callback"] or "none", " ".join(str(x) for x in a["speeds"]),
                     spread_cell(a["member_steps_per_s"], 1), " / ".join(fmt(x, 0) for x in a["steps_per_member"]),
                     spread_cell(a["best_member_test_acc"]), spread_cell(a["mean_member_test_acc"])])
    out += table(["arm", "PBT", "speeds", "member-steps/s", "steps per member", "best member's test accuracy",
                   "mean member's test accuracy"], rows)
    ratios = r["ratios"]
    out += ["", f"Asynchronous / synchronous member-steps/s: **{fmt(ratios['async_over_sync_mixed'], 3)}** (ideal "
            f"{fmt(ratios['ideal_async_over_sync_mixed'])}); with / without the asynchronous callback at equal "
            f"speeds: **{fmt(ratios['async_callback_over_none_equal'], 3)}**. Paired by repetition: "
            f"{', '.join(fmt(x, 3) for x in ratios['async_over_sync_mixed_paired'])} and "
            f"{', '.join(fmt(x, 3) for x in ratios['async_callback_over_none_equal_paired'])}."]
    if "async_wait_over_sync_mixed" in ratios:
        out += ["", "What `wait_for_peers=1.0` costs with these stragglers, member-steps/s: "
                f"**{fmt(ratios['async_wait_over_sync_mixed'], 3)}x** lockstep's and "
                f"**{fmt(ratios['async_wait_over_async_mixed'], 3)}x** plain asynchronous's (paired by repetition: "
                f"{', '.join(fmt(x, 3) for x in ratios['async_wait_over_async_mixed_paired'])})."]
    work = [(f"{run['arm']} #{run['rep']}", m) for run in r["runs"] for m in run["members"]]
    busiest = max(work, key=lambda item: item[1]["busy_fraction"], default=None)
    if busiest is not None:
        out += ["", "The emulation holds while a step's real work fits in its padded time: the busiest member "
                f"({busiest[0]}, member {busiest[1]['member']}) worked {100 * busiest[1]['busy_fraction']:.0f} % of "
                f"its step time and overran it in {100 * busiest[1]['overran_fraction']:.0f} % of its steps."]
    sync = [(arm, a["ready_step_breakdown"]) for arm, a in r["arms"].items() if a["callback"] == "sync"]
    if sync:
        out += ["", "Synchronous ready steps, ms, mean per ready step and rank (the all-gather holds the fast "
                "members' waiting):", ""]
        out += table(*_sync_breakdown(sync))
    asynchronous = [(arm, a["ready_step_breakdown"]) for arm, a in r["arms"].items()
                    if a["callback"] in ("async", "async_wait")]
    if asynchronous:
        out += ["", "Asynchronous ready steps, ms, mean per ready step and rank (nobody waits; an exploit's "
                "transfer includes the donor's snapshot server noticing the request in the store):", ""]
        rows = [[arm, fmt(b.get("total_ms")), fmt(b.get("snapshot_ms")), fmt(b.get("decide_ms")),
                 fmt(b.get("exploit_transfer_ms")), fmt(b.get("other_ms")), fmt(b.get("lineage_write_background_ms")),
                 str(b.get("ready_steps"))] for arm, b in asynchronous]
        out += table(["", "ready step", "snapshot", "decide", "transfer (exploits)", "rest of the step",
                       "lineage write + fsync (drain thread)", "ready steps"], rows)
    return out


def render_turns(r: dict[str, Any]) -> list[str]:
    """Members that take turns: the same population as many processes or as few processes of many."""
    out = ["", "## Members that take turns (`members_per_process`)", "",
           "One job per layout (Lightning's launcher, a fresh interpreter per process), lockstep ready steps "
           "every epoch, the same model and data; the machine is shared with other engineers' jobs, so the "
           "times are noisy (memory is not).", ""]
    rows = [[name, str(x["members"]), fmt(x["wall_s"], 1), fmt(x["startup_s"], 1), fmt(x["fit_s"], 1),
             fmt(x["peak_rss_gb"], 2), fmt(x["member_steps_per_s"], 0), str(x["switches"]),
             fmt(x["switch_fraction"], 4)] for name, x in r["layouts"].items()]
    out += table(["processes x members each", "members", "wall s", "start-up s", "fit s", "summed peak RSS GB",
                   "member-steps/s", "turn switches", "switch time / fit time"], rows)
    for name, target in r.get("targets", {}).items():
        out.append(f"- {name}: {target['target']}, measured {fmt(target['value'], 3)}: {_met(target)}")
    return out


def write_report(folder: Path) -> Path:
    """``folder/RESULTS.md``, and the applications figures under ``folder/figures/`` (redrawn each time)."""
    results = load_results(folder)
    figures = None
    if "applications" in results:
        from bench.app_figures import write_figures

        figures = write_figures(results["applications"], folder)
    path = folder / "RESULTS.md"
    path.write_text(render(results, figures), encoding="utf-8")
    return path
