"""Start a test script's ranks from a fork server that imported torch and Lightning once.

Importing torch + Lightning costs 7-9 s of CPU per process on a 2-core machine; a 4-rank run launched as
``python script.py`` (Lightning's launcher) or by torchrun pays it four or five times, and those imports
were most of the suite's time. Here the ranks are forks of a ``forkserver`` that only imported (importing
starts no torch thread: the intra-op pool starts at the first parallel operation), so no rank is forked
from a process that ran torch code, and none pays the imports again.

Each rank gets torchrun's environment and runs the script as ``python script.py`` would (``__main__``,
its ``sys.argv``, its folder first on ``sys.path``); the rendezvous store is hosted by the test's process
on a port the OS picks (torchrun's agent hosts it the same way), so no port is fixed and none can race.
Lightning sees an externally launched job (as under torchrun) and starts no process of its own.

What this launcher does not show, the tests that launch with ``launcher="lightning"`` (Lightning's own
subprocess launcher) or torchrun do: a killed rank 0 taking the store with it, signals, console output.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing
import os
import runpy
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

# Imported once by the fork server; a rank imports what else its script needs itself.
PRELOAD = (
    "torch",
    "torch.distributed",
    "torchmetrics",
    "pytorch_lightning",
    "lightning.pytorch",
    "lightning_pbt",
    "lightning_pbt.plugin.callback",
    "lightning_pbt.lightning",
)


@functools.cache
def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*PRELOAD, __name__])
    return context


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun --standalone gives each rank of a one-node job."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(world_size),
        "ROLE_NAME": "default",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": f"tests-{port}",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
    }


def run_preloaded(
    script: str, argv: list[str], nproc: int, env: dict[str, str], timeout: float, cwd: Path, logs: Path
) -> subprocess.CompletedProcess:
    """Run ``script argv`` on ``nproc`` ranks; wait for every rank (none is killed when another fails, so
    the run ends the way the plugin ends it), or kill them all at ``timeout``.

    The result is a ``CompletedProcess`` as ``run_job`` returns: ``returncode`` is the first non-zero exit
    code of a rank (0 when all succeeded), ``stdout`` every rank's output in rank order. Raises
    ``TimeoutError`` (with that output) when a rank outlived ``timeout``.
    """
    import torch.distributed as dist

    logs.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
    context = _context()
    paths = [logs / f"rank{rank}.log" for rank in range(nproc)]
    procs = [
        context.Process(
            target=_rank_main,
            args=(script, argv, {**env, **torchrun_env(rank, nproc, store.port)}, str(cwd), str(paths[rank])),
            name=f"test-rank-{rank}",
        )
        for rank in range(nproc)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                timed_out = True
                break
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        del store
    output = "".join(f"--- rank {rank} ---\n{path.read_text(errors='replace')}" for rank, path in enumerate(paths))
    if timed_out:
        raise TimeoutError(output)
    codes = [proc.exitcode for proc in procs]
    return subprocess.CompletedProcess([script, *argv], next((c for c in codes if c), 0), output, None)


def _as_a_fresh_process(rank: int, warning_options: str) -> None:
    """What a fresh interpreter of this rank would hold that a fork of the server does not: numpy's own random
    state (Python's ``random`` reseeds itself at a fork), the warning filters of ``PYTHONWARNINGS`` (read at
    start-up), and Lightning's rank-zero filter, which Lightning computes from ``RANK`` when it is imported."""
    import warnings

    import numpy as np

    for option in filter(None, warning_options.split(",")):
        warnings._setoption(option)  # what the interpreter does with each PYTHONWARNINGS entry at start-up
    np.random.seed()
    for name in ("lightning_fabric.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        module = sys.modules.get(name)
        if module is not None:
            module.rank_zero_only.rank = rank


def _rank_main(script: str, argv: list[str], env: dict[str, str], cwd: str, log: str) -> None:
    """One rank: ``python script argv`` in a fork of the server, its output in ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(write_through=True)  # type: ignore[union-attr]
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [script, *argv]
    # as a fresh `python script.py` would have it: the script's folder, then PYTHONPATH, first on the path
    entries = [os.path.dirname(os.path.abspath(script)), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    sys.path[:0] = entries
    _as_a_fresh_process(int(env["RANK"]), env.get("PYTHONWARNINGS", ""))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if isinstance(exit_.code, int):
            code = exit_.code
        elif exit_.code is not None:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # as a real interpreter would at exit (multiprocessing skips them)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
