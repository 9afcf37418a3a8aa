"""``python -m lightning_pbt``: read a finished run folder.

    python -m lightning_pbt best RUN_DIR [--json]     # best member, score, values, checkpoint to load
    python -m lightning_pbt report RUN_DIR [...]      # = python -m lightning_pbt.report RUN_DIR [...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: no results or a bad folder)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        from lightning_pbt.tools.report import main as report_main

        return report_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m lightning_pbt", description="Read a finished PBT run folder.")
    commands = parser.add_subparsers(dest="command", required=True)
    best = commands.add_parser("best", help="the best member: score, hyperparameters and the checkpoint to load")
    best.add_argument("run_dir", help="the run directory (with pbt/results.json), its pbt/ folder or results.json")
    best.add_argument("--json", action="store_true", help="print the whole results.json instead")
    commands.add_parser("report", help="plots, summary.md and schedule.json (python -m lightning_pbt.report -h)")
    args = parser.parse_args(argv)
    from lightning_pbt.algorithm.results import best_checkpoint, load_results, summary_text

    try:
        results = load_results(args.run_dir)
        if args.json:
            print(json.dumps(results.to_dict(), indent=2, sort_keys=True))
            return 0
        print(summary_text(results))
        path = best_checkpoint(args.run_dir)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nLoad it with: YourModule.load_from_checkpoint({path!r})")
    print(f"         or: lightning_pbt.results.load_best_model({args.run_dir!r}, YourModule)")
    return 0

