"""Where a ready step's time goes in real training (issue 12 item 6), recorded on every rank.

``ReadyStepRecorder`` instruments one ``PopulationBasedTraining`` instance (instance attributes only;
the package is untouched): for each of this rank's ready steps it keeps the protocol's own ``timing``
(synchronous: ``gather``, ``decide``, ``transfer``; asynchronous: ``snapshot``, ``decide``,
``transfer``) and the whole ``on_validation_end`` as the training thread sees it; on population rank
0 it also times the lineage: handing lines to the background writer on the training thread
(``lineage_submit``) and the write with its fsync on the writer's own thread (``lineage_write``).

``summarise`` turns the records of every rank into one breakdown. The synchronous all-gather holds
both the collective's own work and waiting for the member that arrives last; at each ready step the
rank with the shortest gather arrived last and waited (almost) not at all, so its gather time is
taken as the collective's own cost and every other rank's excess over it as waiting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

SYNC_PHASES = ("gather", "decide", "transfer")
ASYNC_PHASES = ("snapshot", "decide", "transfer")


class ReadyStepRecorder:
    """Records this rank's ready steps of ``pbt`` (see the module docstring)."""

    def __init__(self, pbt: Any) -> None:
        self.steps: list[dict[str, float]] = []
        self.lineage_submit: list[float] = []
        self.lineage_write: list[float] = []
        on_train_start, on_validation_end, log_status = pbt.on_train_start, pbt.on_validation_end, pbt._log_status

        def record_timing(trainer: Any, result: Any, last: bool) -> None:
            self.steps.append({"step": float(result.step), "event": result.plan.event, **result.timing})
            log_status(trainer, result, last)

        def timed_ready_step(trainer: Any, pl_module: Any) -> None:
            before, started = pbt.ready_count, time.perf_counter()
            on_validation_end(trainer, pl_module)
            if pbt.ready_count != before:
                self.steps[-1]["total"] = time.perf_counter() - started

        def instrument_lineage(trainer: Any, pl_module: Any) -> None:
            on_train_start(trainer, pl_module)
            writer = getattr(pbt._protocol, "lineage", None)
            if writer is not None:
                self._time_writer(writer)

        pbt._log_status = record_timing
        pbt.on_validation_end = timed_ready_step
        pbt.on_train_start = instrument_lineage

    def _time_writer(self, writer: Any) -> None:
        write, write_in_background = writer.write, writer.write_in_background

        def timed_write(records: Any) -> None:
            started = time.perf_counter()
            write(records)
            self.lineage_write.append(time.perf_counter() - started)

        def timed_submit(records: Any) -> None:
            started = time.perf_counter()
            write_in_background(records)
            self.lineage_submit.append(time.perf_counter() - started)

        writer.write = timed_write
        writer.write_in_background = timed_submit

    def save(self, path: Path, rank: int) -> None:
        path.write_text(json.dumps({"rank": rank, "steps": self.steps, "lineage_submit": self.lineage_submit,
                                    "lineage_write": self.lineage_write}))


def load(folder: Path, pattern: str = "ready_rank*.json") -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(pattern))]


def summarise(runs: list[list[dict[str, Any]]], synchronous: bool) -> dict[str, Any]:
    """One breakdown, in ms, from the records of several runs (``load`` of each run's folder).

    Means per ready step and rank, so that the parts add up to ``total_ms`` (medians would not, and
    waiting is bimodal: the fast members wait, the slowest does not); ``exploit_transfer_ms`` is the
    mean over the losers' exploits alone, the lineage times per write.
    """
    recorded = [{**s, "at": (i, s["step"])} for i, ranks in enumerate(runs) for r in ranks for s in r["steps"]
                if "total" in s]
    # A synchronous ready step that a member joined from ``finish`` (it had already stopped) is not recorded
    # on that member's ranks; such end-of-run steps are left out (their waiting is the stopped member's
    # polling, not training).
    ranks_at = {s["at"]: 0 for s in recorded}
    for s in recorded:
        ranks_at[s["at"]] += 1
    steps = [s for s in recorded if not synchronous or ranks_at[s["at"]] == len(runs[s["at"][0]])]
    phases = SYNC_PHASES if synchronous else ASYNC_PHASES
    if not steps:
        return {"ready_steps": 0, "left_out_rank_ready_steps": len(recorded)}

    def mean_ms(values: list[float]) -> float | None:
        return 1e3 * sum(values) / len(values) if values else None

    out: dict[str, Any] = {"ready_steps": len({s["at"] for s in steps}), "rank_ready_steps": len(steps),
                           "left_out_rank_ready_steps": len(recorded) - len(steps),
                           "statistic": "mean per ready step and rank"}
    out["total_ms"] = mean_ms([s["total"] for s in steps])
    for phase in phases:
        out[f"{phase}_ms"] = mean_ms([s[phase] for s in steps])
    out["other_ms"] = mean_ms([s["total"] - sum(s[p] for p in phases) for s in steps])
    if synchronous:
        fastest: dict[tuple[int, float], float] = {}
        for s in steps:
            fastest[s["at"]] = min(fastest.get(s["at"], float("inf")), s["gather"])
        out["gather_waiting_ms"] = mean_ms([s["gather"] - fastest[s["at"]] for s in steps])
        out["gather_own_ms"] = mean_ms([fastest[s["at"]] for s in steps])
        out["waiting_share"] = out["gather_waiting_ms"] / out["total_ms"] if out["total_ms"] else None
    out["exploit_transfer_ms"] = mean_ms([s["transfer"] for s in steps if s["event"] == "exploit"])
    out["lineage_submit_ms"] = mean_ms([t for ranks in runs for r in ranks for t in r["lineage_submit"]])
    out["lineage_write_background_ms"] = mean_ms([t for ranks in runs for r in ranks for t in r["lineage_write"]])
    return out
