"""``python -m bench``: run the benchmarks, write ``<out>/<name>.json`` and ``<out>/RESULTS.md``.

    python -m bench                      # every benchmark but applications, at its documented size (~25-30 min)
    python -m bench --only transfer      # one or several of: transfer ready_step overhead quality schedule
                                         # asynchronous decisions pbt_function_plugin turns
    python -m bench --only applications  # the three example apps, PBT vs its alternatives at population 16
                                         # (many hours on 2 cores: 3 apps x 6 arms x 10 seeds)
    python -m bench --only applications --seeds 10 11 --population 16 --members-per-process 8 \
        --apps language_model --arms pbt random_search   # other seeds, a layout, some apps and arms
    python -m bench --only pbt_function_plugin --seeds 310 311  # Ray's pbt_function through the plugin, other seeds
    python -m bench --only trainer_memory  # every rank's RSS over 240 asynchronous ready steps (~15 min)
    python -m bench --smoke              # tiny sizes, results under bench/results/tmp/smoke
    python -m bench --report             # only re-render RESULTS.md from the JSON already there
    python -m bench --launcher torchrun  # ranks in fresh interpreters (torchrun) instead of forks

``make bench ARGS="--only overhead"`` passes its arguments through.
"""

from __future__ import annotations

import os

# Before numpy / torch are imported: one thread per rank (2 cores), and no thread pool in the process
# that forks the ranks.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("PYTHONUNBUFFERED", "1")

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from bench.common import LAUNCHERS, RESULTS, SMOKE_RESULTS, machine, set_launcher
from bench.report import DEFAULT, ORDER, write_report

# per launch, seconds
TIMEOUTS = {"transfer": 600, "ready_step": 600, "overhead": 300, "quality": 400, "schedule": 900, "asynchronous": 120,
            "decisions": 600, "pbt_function_plugin": 300, "turns": 900, "applications": 600, "trainer_memory": 1800}
SMOKE_TIMEOUTS = {"transfer": 90, "ready_step": 90, "overhead": 90, "quality": 90, "schedule": 90, "asynchronous": 60,
                  "decisions": 60, "pbt_function_plugin": 120, "turns": 120, "applications": 120, "trainer_memory": 120}

APPLICATION_OPTIONS = ("seeds", "population", "members_per_process", "apps", "arms", "overrides")
SEEDED = ("applications", "pbt_function_plugin")  # the benchmarks that take --seeds


def run_options(name: str, options: dict[str, object]) -> dict[str, object]:
    """The command line's options that benchmark ``name`` takes."""
    if name == "applications":
        return options
    return {"seeds": tuple(options["seeds"])} if name in SEEDED and "seeds" in options else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--only", nargs="+", choices=ORDER, metavar="NAME",
                        help=f"run only these benchmarks ({', '.join(ORDER)})")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {RESULTS.relative_to(RESULTS.parents[1])}, or "
                             f"{SMOKE_RESULTS.relative_to(RESULTS.parents[1])} with --smoke)")
    parser.add_argument("--report", action="store_true", help="only re-render RESULTS.md from the JSON files")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="fork",
                        help="fork: ranks are forks of this process (imports paid once; default); torchrun: "
                             "torchrun --standalone, fresh interpreters")
    from bench.applications import APPS, ARMS

    apps = parser.add_argument_group("applications", "options of --only applications (bench/applications.py)")
    apps.add_argument("--seeds", nargs="+", type=int, metavar="S", help="paired seeds (default: the table's 0-9)")
    apps.add_argument("--population", type=int, metavar="P", help="members per arm (default 16; smoke 4)")
    apps.add_argument("--members-per-process", type=int, metavar="K",
                      help="members taking turns in each process (default P / 2: two processes; 1 at P <= 4)")
    apps.add_argument("--apps", nargs="+", choices=list(APPS), metavar="APP", help=f"({', '.join(APPS)})")
    apps.add_argument("--arms", nargs="+", choices=list(ARMS), metavar="ARM", help=f"({', '.join(ARMS)})")
    apps.add_argument("--overrides", nargs="+", metavar="KEY=VALUE",
                      help="Hydra overrides after each app's own (pilots: e.g. trainer.max_epochs=30 with --apps)")
    args = parser.parse_args(argv)
    options = {name: getattr(args, name) for name in APPLICATION_OPTIONS if getattr(args, name) is not None}
    seeded = set(args.only or ()) & set(SEEDED)
    if options and "applications" not in seeded and not (set(options) == {"seeds"} and seeded):
        parser.error(f"--{', --'.join(n.replace('_', '-') for n in options)} only apply to --only applications"
                     f" (--seeds also to --only {' '.join(SEEDED[1:])})")
    if options and "applications" in seeded:
        from bench.applications import plan

        try:
            plan(args.smoke, **options)  # a bad combination fails here, before any other benchmark runs
        except ValueError as err:
            parser.error(str(err))
    set_launcher(args.launcher)
    out: Path = args.out or (SMOKE_RESULTS if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(write_report(out).read_text())
        return 0

    from bench.common import write_result

    info = machine()
    failed = []
    for name in args.only or DEFAULT:
        started = time.perf_counter()
        print(f"[bench] {name}{' (smoke)' if args.smoke else ''} ...", flush=True)
        module = importlib.import_module(f"bench.{name}")
        timeout = (SMOKE_TIMEOUTS if args.smoke else TIMEOUTS)[name]
        try:
            payload = module.run(smoke=args.smoke, timeout=timeout, **run_options(name, options))
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        merge = getattr(module, "merge_published", None)  # applications: a table built over several runs
        if merge is not None and not args.smoke:
            published = out / f"{name}.json"
            payload = merge(payload, json.loads(published.read_text()) if published.exists() else None)
        path = write_result(out, name, payload, smoke=args.smoke, started=started, machine_info=info)
        print(f"[bench] {name}: {time.perf_counter() - started:.0f} s -> {path}", flush=True)
    report = write_report(out)
    print(report.read_text())
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
