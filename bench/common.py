"""What every benchmark shares: the machine record, launching ranks, statistics, and writing results.

Benchmarks run their multi-process parts with ``torchrun --standalone`` (a free port every time) in
a subprocess that gets its own session, a hard timeout, and is killed with its whole process group
when it ends, so that no rank can outlive its benchmark.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SMOKE_RESULTS = RESULTS / "tmp" / "smoke"
SCRATCH = RESULTS / "tmp"

_LAUNCH_ENV_DROP = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                    "MASTER_PORT", "NODE_RANK", "PL_GLOBAL_SEED", "TORCHELASTIC_RUN_ID", "LIGHTNING_PBT_BASE_SEED")


class LaunchError(RuntimeError):
    """A benchmark's ranks failed or ran past their timeout."""


# -- the record of where and how a result was measured ---------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "gpu": gpus[0] if gpus else None,
        "gpus": gpus,
        "platform": platform.platform(),
        "load_average_at_start": load,
    }


def versions() -> dict[str, str]:
    """Installed versions, read from the package metadata (importing Lightning here would cost seconds)."""
    return {"python": platform.python_version(), "torch": _version_of("torch"),
            "pytorch_lightning": _version_of("pytorch-lightning"), "lightning_pbt": _version_of("lightning-pbt"),
            "numpy": _version_of("numpy"), "scikit_learn": _version_of("scikit-learn")}


def _version_of(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def command_line() -> str:
    return " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]])


# -- statistics -----------------------------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else math.nan


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, and the interquartile range of ``values``."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "q1": math.nan, "q3": math.nan, "n": 0}
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "q1": q1, "q3": q3,
            "n": len(ordered)}


# -- launching ranks ------------------------------------------------------------------------------
def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in _LAUNCH_ENV_DROP:
        env.pop(name, None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


def run_subprocess(args: list[str], timeout: float, log_path: Path, env: dict[str, str] | None = None) -> str:
    """Run ``args`` in its own session; on timeout or exit, kill every process it started."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=env or child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            raise LaunchError(f"{' '.join(args[:8])} ... ran past {timeout:.0f} s; log: {log_path}\n"
                              f"{_tail(log_path)}") from None
        finally:
            _kill_group(proc.pid)
    if code != 0:
        raise LaunchError(f"{' '.join(args[:8])} ... exited with {code} after "
                          f"{time.perf_counter() - started:.1f} s; log: {log_path}\n{_tail(log_path)}")
    return log_path.read_text(encoding="utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


LAUNCHERS = ("fork", "torchrun")
_PRELOAD = ("torch", "torch.distributed", "pytorch_lightning", "lightning_pbt", "lightning_pbt.plugin.callback",
            "lightning_pbt.plugin.strategy", "lightning_pbt.algorithm.lineage")
_launcher = os.environ.get("BENCH_LAUNCHER", "fork")


def set_launcher(name: str) -> None:
    global _launcher
    if name not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {name!r}")
    _launcher = name


def launch(module: str, nproc: int, cfg: dict[str, Any], timeout: float, log_path: Path) -> None:
    """Run ``module.worker(cfg)`` on ``nproc`` ranks, with the launcher chosen by ``--launcher``."""
    if _launcher == "torchrun":
        torchrun(module, nproc, cfg, timeout, log_path)
    else:
        fork_launch(module, nproc, cfg, timeout, log_path)


def torchrun(module: str, nproc: int, cfg: dict[str, Any], timeout: float, log_path: Path) -> str:
    """``torchrun --standalone --nproc_per_node=nproc -m module '<cfg as JSON>'`` (fresh interpreters)."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--max-restarts=0", "--monitor-interval=0.1", "-m", module, json.dumps(cfg)]
    return run_subprocess(args, timeout, log_path)


def fork_launch(module: str, nproc: int, cfg: dict[str, Any], timeout: float, log_path: Path) -> None:
    """Like torchrun, without paying the imports in every rank: fork ``nproc`` ranks of this process.

    Importing torch + Lightning costs ~6 s of CPU per process here, which would dominate the small
    benchmarks. This process imports once; each rank is a fresh fork (its own process, its own gloo
    state) with torchrun's environment, and the rendezvous store is hosted here, as torchrun's agent
    hosts it, on a port the OS picks (port 0), so no port is fixed and no port can race. Ranks are
    forked before the store's thread exists, with this process's objects frozen out of their garbage
    collector (``gc.freeze``). A rank that fails or outlives ``timeout`` ends the launch:
    every rank is killed.
    """
    import importlib
    import multiprocessing as mp
    from datetime import timedelta

    import torch.distributed as dist

    for name in (*_PRELOAD, module, *getattr(importlib.import_module(module), "PRELOAD", ())):
        importlib.import_module(name)  # imported before the fork, so no rank pays for it
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")
    port = ctx.Value("i", 0)
    ready = ctx.Event()
    logs = [log_path.with_name(f"{log_path.stem}.rank{rank}.log") for rank in range(nproc)]
    procs = [ctx.Process(target=_fork_rank, args=(module, rank, nproc, port, ready, cfg, str(logs[rank]), timeout),
                         name=f"bench-rank-{rank}") for rank in range(nproc)]
    # Without this, each rank's first full garbage collection walks every object the imports made here
    # (0.5-1.2 s per rank on this machine, at a random moment of the measurement).
    gc.collect()
    gc.freeze()
    try:
        for proc in procs:
            proc.start()
    finally:
        gc.unfreeze()
    store = None
    failure = None
    try:
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout))
        port.value = store.port
        ready.set()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs):
            bad = [p for p in procs if p.exitcode not in (None, 0)]
            if bad:
                failure = f"rank {procs.index(bad[0])} exited with {bad[0].exitcode}"
                break
            if time.monotonic() > deadline:
                failure = f"ran past {timeout:.0f} s"
                break
            time.sleep(0.05)
        if failure is None:
            bad = [p for p in procs if p.exitcode != 0]
            if bad:
                failure = f"rank {procs.index(bad[0])} exited with {bad[0].exitcode}"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        del store
    if failure is not None:
        tails = "\n".join(f"--- rank {i} ---\n{_tail(path, 3000)}" for i, path in enumerate(logs))
        raise LaunchError(f"{module} on {nproc} ranks: {failure}; logs: {logs[0].parent}\n{tails}")


def _fork_rank(module: str, rank: int, nproc: int, port: Any, ready: Any, cfg: dict[str, Any], log: str,
               timeout: float) -> None:
    import importlib

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if not ready.wait(timeout):
        raise SystemExit("the launcher's store did not start")
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
        ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc), ROLE_NAME="default", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port.value), TORCHELASTIC_RUN_ID=f"bench-{port.value}", TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
    )
    for name in ("PL_GLOBAL_SEED", "LIGHTNING_PBT_BASE_SEED", "PL_SEED_WORKERS"):
        os.environ.pop(name, None)
    importlib.import_module(module).worker(cfg)
    sys.stdout.flush()
    sys.stderr.flush()


def worker_config(cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON config of a benchmark's worker: given (fork launcher) or argv[1] (torchrun)."""
    return cfg if cfg is not None else json.loads(sys.argv[1])


# -- results --------------------------------------------------------------------------------------
def finite_positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def write_result(out_dir: Path, name: str, payload: dict[str, Any], *, smoke: bool, started: float,
                 machine_info: dict[str, Any]) -> Path:
    record = {
        "benchmark": name,
        "smoke": smoke,
        "command": command_line(),
        "date": now(),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine_info,
        "versions": versions(),
        **payload,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False, allow_nan=False, default=_json_default) + "\n",
                   encoding="utf-8")
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def clean_floats(value: Any, digits: int = 6) -> Any:
    """Round floats and turn non-finite ones into None (strict JSON)."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_floats(v, digits) for v in value]
    return value
