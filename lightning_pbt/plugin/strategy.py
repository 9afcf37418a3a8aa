"""``PopulationStrategy``: one Lightning job, many members, each member its own DDP world.

The world of N ranks is split into ``N // member_size`` members of consecutive ranks. Lightning and
torch reach for the default process group and the global rank in many places (broadcasts, barriers,
the per-batch SIGTERM broadcast, module-state syncs, torchmetrics, loggers, checkpoints). Rather than
patching each of them, the strategy makes each member's process group *the* default group: inside a
member, ``torch.distributed`` and Lightning see a world of ``member_size`` ranks. Everything member-
scoped therefore stays member-scoped by construction, and the population gets its own, explicitly
named group (``population``) that nothing else can reach by accident.

What a user sees:

- ``trainer.global_rank`` / ``world_size`` / ``is_global_zero``: the rank inside the member, the member
  size, and whether this is the member's rank 0. ``local_rank`` and ``node_rank`` keep their launch
  meaning (the device index on the node, the node index).
- ``strategy.world_rank``, ``member_id``, ``num_members``, ``member_size``, ``member_group`` and
  ``population`` (a :class:`~lightning_pbt.distributed.collectives.PopulationGroup`) give the real identity.
- Each member is seeded with ``base_seed + member_id`` (``base_seed`` is ``PL_GLOBAL_SEED`` from
  ``seed_everything``, else 0) before ``configure_model`` runs, and its sampler shuffles with the same
  seed, so members differ in data order and in any weights built in ``configure_model``. Models built
  before ``Trainer.fit`` can call :func:`member_id_from_env` to seed themselves.
- Loggers and checkpoints go to ``member_<id>/`` under the run directory, which population rank 0
  chooses for everyone (so differing working directories, e.g. Hydra's, cannot split a run).
- Only population rank 0 shows the progress bar and Lightning's (and our) info messages and warnings.
  An uncaught error is printed labelled with its member (``[member 2, rank 2]``), once when every rank
  raises the same one (see :mod:`lightning_pbt.plugin.console`).

Without the PBT callback the members train independently: a parallel random search.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from typing_extensions import override

from lightning_pbt.algorithm.topology import PopulationTopology, expand_devices
from lightning_pbt.distributed.collectives import ESTABLISHED as _ESTABLISHED
from lightning_pbt.distributed.collectives import (
    PopulationGroup,
    PopulationWatchdog,
    start_watchdog,
    stop_watchdog,
)
from lightning_pbt.distributed.groups import create_groups, shutdown_population
from lightning_pbt.distributed.resume import agree_on_resume_of_lanes, fit_checkpoint
from lightning_pbt.plugin.console import install_error_hook, quiet_console, remember_excepthook
from lightning_pbt.plugin.turns import MemberLane, run_member_lanes

from ._lightning import DDPStrategy, fabric_rank_zero_only, rank_zero_only, seed_everything
from .outputs import agree_on_run_dir, scope_outputs

__all__ = ["PopulationStrategy", "check_supported", "member_id_from_env"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=10)


def member_id_from_env(member_size: int = 1, devices_per_node: int | None = None) -> int:
    """This process's member id, read from the launcher's environment before the Trainer starts.

    Works under torchrun and SLURM (``RANK`` / ``SLURM_PROCID``) and Lightning's own launcher
    (``NODE_RANK`` and ``LOCAL_RANK``; pass ``devices_per_node`` for several nodes). Use it to seed
    weight initialisation per member when the model is built before ``Trainer.fit``.

    Args:
        member_size: ranks per member, as given to :class:`PopulationStrategy`.
        devices_per_node: ranks per node, needed only under Lightning's launcher on several nodes.

    Returns:
        The member id (0 in a process that was not launched as part of a population).

    Raises:
        ValueError: ``NODE_RANK`` is set without ``RANK`` and ``devices_per_node`` was not given.

    Examples:
        ```python
        pl.seed_everything(seed + member_id_from_env(member_size=2))
        model = Net()  # different initial weights in every member
        ```
    """
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]) // member_size
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    node_rank = int(os.environ.get("NODE_RANK", 0))
    if node_rank and not devices_per_node:
        raise ValueError("member_id_from_env: pass devices_per_node on a multi-node launch without RANK")
    return (node_rank * (devices_per_node or 0) + local_rank) // member_size


_UNSUPPORTED_PRECISION = (
    "FSDPPrecision",
    "DeepSpeedPrecision",
    "XLAPrecision",
    "TransformerEnginePrecision",
    "BitsandbytesPrecision",
)


def check_supported(accelerator: Any, precision_plugin: Any) -> None:
    """Refuse, before any process group exists, what the population cannot move or run on.

    Args:
        accelerator: the Trainer's accelerator (CPU and CUDA are supported; ``None`` is not checked).
        precision_plugin: the Trainer's precision plugin; sharded and quantised ones are refused.

    Raises:
        ValueError: an unsupported accelerator or precision plugin, naming the supported ones.
    """
    kind = type(accelerator).__name__ if accelerator is not None else None
    if kind not in (None, "CPUAccelerator", "CUDAAccelerator"):
        raise ValueError(f"PopulationStrategy supports accelerator='cpu' (gloo) and 'gpu'/'cuda' (NCCL), not {kind}")
    names = {cls.__name__ for cls in type(precision_plugin).__mro__}
    unsupported = names.intersection(_UNSUPPORTED_PRECISION)
    if unsupported:
        raise ValueError(
            f"PopulationStrategy does not support the precision plugin {type(precision_plugin).__name__} "
            "(sharded or quantised state cannot be copied between members); use precision='32-true', "
            "'16-mixed', 'bf16-mixed', '64-true', '16-true' or 'bf16-true'"
        )


class _MemberScopingLauncher:
    """Lightning's launcher, plus per-member output folders in every process before fit starts."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        return self.inner.launch(_call_scoped, function, *args, trainer=trainer, **kwargs)


def _call_scoped(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs in each launched process: ``function`` is a bound method of the Trainer (``_fit_impl``...)."""
    trainer = getattr(function, "__self__", None)
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, PopulationStrategy) and strategy.members_per_process > 1:
        _base_seed()  # the user's seed, before the first member re-seeds the process
        return run_member_lanes(function, args, kwargs, _prepare_call)
    args, kwargs = _prepare_call(function, args, kwargs)
    return function(*args, **kwargs)


def _prepare_call(function: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """Per member, before fit: its output folders, and the checkpoint it resumes from."""
    trainer = getattr(function, "__self__", None)
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, PopulationStrategy):
        strategy.scope_outputs(trainer)
        if getattr(function, "__name__", "") == "_fit_impl":
            # Resolve ckpt_path="last" against the member's own folders, and remember what this rank
            # will resume from so that the members can agree on it once the groups exist.
            args, kwargs, strategy._resume_path, strategy._resume_weights_only = fit_checkpoint(trainer, args, kwargs)
            if strategy.lane.turns is not None:  # lane 0 agrees for every lane of the process (_agree_on_resume)
                resume = (strategy._resume_path, strategy._resume_weights_only)
                strategy.lane.turns.checkpoints[strategy.lane.index] = resume
    return args, kwargs


def _check_counts(member_size: Any, processes_per_device: Any, members_per_process: Any) -> None:
    counts = {"member_size": member_size, "processes_per_device": processes_per_device}
    for name, value in {**counts, "members_per_process": members_per_process}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"PopulationStrategy: {name} must be an integer >= 1, got {value!r}")


def _create_groups(
    topology: PopulationTopology, backend: str, device: torch.device, env: Any, timeout: timedelta | None
) -> tuple[PopulationGroup, str]:
    """:func:`~lightning_pbt.distributed.groups.create_groups`, with the excepthook remembered first."""
    remember_excepthook()  # init_process_group wraps it with "[rank<member rank>]", the same in every member
    return create_groups(topology, backend, device, env, timeout or DEFAULT_TIMEOUT)


def _label_errors(topology: PopulationTopology, population: PopulationGroup | None) -> None:
    """An uncaught error is printed labelled with its member, once (see :mod:`lightning_pbt.plugin.console`)."""
    if population is not None:
        lane_members = [lane.member_id for lane in topology.lanes()]  # members that take turns: the one that failed
        install_error_hook(topology.member_id, topology.world_rank, population.abort_reason, lane_members)


def _base_seed() -> int:
    """The user's ``seed_everything`` seed (or 0), remembered before members re-seed themselves."""
    if "LIGHTNING_PBT_BASE_SEED" not in os.environ:
        os.environ["LIGHTNING_PBT_BASE_SEED"] = os.environ.get("PL_GLOBAL_SEED", "0")
    return int(os.environ["LIGHTNING_PBT_BASE_SEED"])


class PopulationStrategy(DDPStrategy):
    """DDP inside each member, a separate population group across members.

    Args:
        member_size: ranks per member (DDP inside the member). The world size must be a multiple of it,
            and it must divide (or be a multiple of) the ranks per node.
        processes_per_device: ranks that share each device, for a population larger than the GPU count
            (e.g. ``Trainer(devices=1)`` with 4 here: 4 members on one GPU). Lightning's launcher starts
            ``devices x processes_per_device`` processes per node; under torchrun, launch that many with
            ``--nproc_per_node``. Ranks of one member always sit on distinct GPUs.
        timeout: collective timeout for the member and population groups. A dead peer normally ends
            the run within seconds (launcher, abort flag, closed sockets); this bounds what is left.
        members_per_process: members each process (group of ``member_size`` processes) hosts, taking turns:
            (world size / ``member_size``) x K members; lockstep and ``fit`` only (``docs/concepts/turns.md``).
        keep_parked_on_device: on GPUs, members waiting for their turn keep their tensors there (else: pinned host).
        **ddp_kwargs: anything ``DDPStrategy`` takes (``find_unused_parameters``, ``start_method``, ...).

    Raises:
        ValueError: a count (``member_size``, ``processes_per_device``, ``members_per_process``) not an integer
            ``>= 1``, or a timeout that is not positive. Layouts that cannot work (a world size not a multiple of
            ``member_size``, two ranks of one member on one GPU, an unsupported accelerator or precision)
            are refused at setup, on every rank, before any process group exists
            (:class:`~lightning_pbt.algorithm.topology.PopulationTopology`, :func:`check_supported`).

    Examples:
        ```python
        trainer = pl.Trainer(
            accelerator="gpu", devices=8,
            strategy=PopulationStrategy(member_size=2),        # 4 members of 2 GPUs each
            callbacks=[PopulationBasedTraining(...)],
        )
        ```
    """

    strategy_name = "population"

    def __init__(
        self,
        member_size: int = 1,
        processes_per_device: int = 1,
        timeout: timedelta | float | None = DEFAULT_TIMEOUT,
        members_per_process: int = 1,
        keep_parked_on_device: bool = False,
        **ddp_kwargs: Any,
    ):
        _check_counts(member_size, processes_per_device, members_per_process)
        self.processes_per_device, self.members_per_process = processes_per_device, members_per_process
        self.keep_parked_on_device = bool(keep_parked_on_device)  # the choice: algorithm.topology.parking_place
        self.lane = MemberLane()  # set per lane before fit when members take turns
        timeout = timedelta(seconds=timeout) if isinstance(timeout, int | float) else timeout
        if timeout is None or timeout.total_seconds() <= 0:
            raise ValueError(f"PopulationStrategy: timeout must be positive, got {timeout!r}")
        super().__init__(timeout=timeout, **ddp_kwargs)
        self.member_size = member_size
        self.topology: PopulationTopology | None = None
        self.population: PopulationGroup | None = None
        self.run_dir: str | None = None
        self._watchdog: PopulationWatchdog | None = None
        self._failed, self._watchdog_prefix, self._resume_agreed = False, "", False
        self._scoped_root: str | None = None
        self._resume_path: str | None = None  # given to fit, the one to load instead, and how to read it
        self._resume_override: str | None = None
        self._resume_weights_only: bool | None = None
        self._before_finishing: list[Callable[[], None]] = []

    # -- devices ---------------------------------------------------------------------------------
    @property
    def parallel_devices(self) -> list[torch.device] | None:
        """The device of each local rank: every device Lightning chose, ``processes_per_device`` times."""
        devices = getattr(self, "_launch_devices", None)
        return None if devices is None else expand_devices(devices, getattr(self, "processes_per_device", 1))

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        self._launch_devices = list(devices) if devices is not None else None

    def _topology_from_launch(self) -> PopulationTopology:
        """This rank's place in the population, from the launch environment alone (no group needed)."""
        assert self.cluster_environment is not None
        self.set_world_ranks()
        devices = getattr(self, "_launch_devices", None) or []
        gpus = len({str(d) for d in devices}) if any(torch.device(d).type == "cuda" for d in devices) else None
        return PopulationTopology(
            world_size=self.cluster_environment.world_size(),
            world_rank=self.cluster_environment.global_rank(),
            member_size=self.member_size,
            processes_per_node=self.num_processes,
            devices_per_node=gpus,
            members_per_process=self.members_per_process,
            lane=self.lane.index,
        )

    # -- identity --------------------------------------------------------------------------------
    def _require_topology(self) -> PopulationTopology:
        if self.topology is None:
            raise RuntimeError("PopulationStrategy: the population is not set up yet (call Trainer.fit first)")
        return self.topology

    @property
    def world_rank(self) -> int:
        """The rank in the whole launch (all members)."""
        return self._require_topology().world_rank

    @property
    def member_id(self) -> int:
        return self._require_topology().member_id

    @property
    def num_members(self) -> int:
        return self._require_topology().num_members

    @property
    def member_group(self) -> dist.ProcessGroup:
        """This member's process group (also the default group inside Lightning)."""
        return dist.group.WORLD

    @property
    @override
    def global_rank(self) -> int:
        if self.topology is None:
            return super().global_rank
        return self.topology.member_rank

    @property
    @override
    def world_size(self) -> int:
        if self.topology is None:
            return super().world_size
        return self.member_size

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        topology = self._require_topology()
        return {"num_replicas": self.member_size, "rank": topology.member_rank, "seed": self.member_seed}

    @property
    def member_seed(self) -> int:
        return _base_seed() + self.member_id

    # -- set-up ----------------------------------------------------------------------------------
    @override
    def setup_environment(self) -> None:
        super().setup_environment()  # -> setup_distributed
        if self._watchdog is None and self.lane.index == 0:  # one watchdog per process, whatever its lanes
            self._start_watchdog()
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None:
            if trainer.state.fn == "fit" and self.lane.index == 0:  # the lanes of a process run one fit
                _ESTABLISHED["fits"] = self.fit_generation + 1
            self._agree_on_run_dir(trainer)
            self._agree_on_resume()
            quiet_console(trainer, self.world_rank, self.lane.index)

    @override
    def setup_distributed(self) -> None:
        if self.topology is not None:  # a second fit/validate/test with the same Trainer
            return
        assert self.cluster_environment is not None
        check_supported(self.accelerator, self.precision_plugin)
        env = self.cluster_environment
        topology = self._topology_from_launch()
        backend = self._get_process_group_backend()
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"PopulationStrategy supports the 'gloo' and 'nccl' backends, not {backend!r}")
        if dist.is_initialized():
            self._adopt_established(topology, backend)
            return
        self.population, prefix = _create_groups(topology, backend, self.root_device, env, self._timeout)
        _ESTABLISHED.update(topology=topology, population=self.population, prefix=prefix, backend=backend)
        atexit.register(shutdown_population)
        self._watchdog_prefix = prefix
        self._become_member(topology, backend)
        log.debug(
            "member %d/%d, rank %d/%d", topology.member_id, topology.num_members, topology.member_rank, self.member_size
        )

    def _adopt_established(self, topology: PopulationTopology, backend: str) -> None:
        """A later Trainer in the same process (e.g. ``test`` after ``fit``) reuses the population."""
        established = _ESTABLISHED.get("topology")
        if established != replace(topology, lane=0) or _ESTABLISHED.get("backend") != backend:
            raise RuntimeError(
                "PopulationStrategy: torch.distributed is already initialised in this process "
                + (
                    f"for another population ({established}); every PopulationStrategy of one process must use "
                    "the same member_size and devices"
                    if established is not None
                    else "by something else; let PopulationStrategy create the process groups"
                )
            )
        self.population = _ESTABLISHED["population"]
        self._watchdog_prefix = _ESTABLISHED["prefix"]
        self._become_member(topology, backend)

    def _become_member(self, topology: PopulationTopology, backend: str) -> None:
        """Lightning's view from here on: a world of this member's ranks, seeded per member."""
        self.topology = topology
        self._process_group_backend = backend
        _label_errors(topology, self.population)
        rank_zero_only.rank = utils_rank_zero_only.rank = fabric_rank_zero_only.rank = topology.member_rank
        self._seed_member()

    @property
    def fit_generation(self) -> int:
        """Fits started in this process so far, by any PopulationStrategy; identical on every rank."""
        return int(_ESTABLISHED.get("fits", 0))

    def _seed_member(self) -> None:
        seed_everything(self.member_seed, workers=os.environ.get("PL_SEED_WORKERS") == "1", verbose=False)

    def _start_watchdog(self) -> None:
        self._watchdog = start_watchdog(self._watchdog_prefix, self.world_rank, self._timeout or DEFAULT_TIMEOUT)

    # -- per-member outputs ----------------------------------------------------------------------
    def scope_outputs(self, trainer: Any) -> None:
        """Point loggers and checkpoint callbacks at ``member_<id>/`` folders; runs in every process.

        Called by the launcher wrapper before ``Trainer.fit`` resolves ``ckpt_path="last"``, so that each
        member resumes from its own last checkpoint (member id from the launch environment: no groups yet).
        """
        if self._scoped_root is not None:
            return
        self._scoped_root = scope_outputs(trainer, self._topology_from_launch().member_id)

    def _agree_on_run_dir(self, trainer: Any) -> None:
        """Population rank 0's ``default_root_dir`` becomes everyone's run directory (once)."""
        assert self.population is not None
        if self.run_dir is None:
            self.scope_outputs(trainer)  # returns at once where the launcher already did
            assert self._scoped_root is not None
            self.run_dir = agree_on_run_dir(trainer, self.population, self.world_rank, self._scoped_root)

    def _agree_on_resume(self) -> None:
        """Resume from checkpoints of the same ready step as the ranks this one must be in step with
        (:func:`~lightning_pbt.distributed.resume.agree_on_resume_of_lanes`); once per strategy."""
        assert self.population is not None and self.topology is not None
        if self._resume_agreed:
            return
        self._resume_agreed = True
        agree = functools.partial(agree_on_resume_of_lanes, self.population, self.topology)
        own, turns = [(self._resume_path, self._resume_weights_only)], self.lane.turns
        self._resume_override = agree(own)[0] if turns is None else turns.resume_override(self.lane.index, agree)

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        self._launcher = _MemberScopingLauncher(self._launcher)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Only plain data is unpickled unless the user explicitly asks for more. The rollback agreed on
        # at resume replaces only the checkpoint it was agreed for, once (not a later validate/test's).
        if self._resume_override is not None and str(checkpoint_path) == self._resume_path:
            checkpoint_path, self._resume_override = self._resume_override, None
        return super().load_checkpoint(checkpoint_path, weights_only=True if weights_only is None else weights_only)

    # -- failure and teardown --------------------------------------------------------------------
    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self._failed = True
        if type(exception).__name__ == "SIGTERMException":
            return  # a preemption reaches every rank by itself; each one checkpoints and exits
        self._stop_watchdog()  # else it could end this very rank on its own abort flag, losing the traceback
        if self.population is not None and self.topology is not None:
            self.population.signal_abort(
                f"member {self.topology.member_id} (world rank {self.topology.world_rank}) raised "
                f"{type(exception).__name__}: {exception}"
            )

    def before_finishing(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` at the end of this fit, before waiting for the population (not after a failure)."""
        self._before_finishing.append(hook)

    def finish_population(self) -> None:
        """Wait until every rank of the population has finished, then stop the watchdog: called once at the
        end of a successful fit, so that no rank leaves (taking the store with it) while others need it."""
        hooks, self._before_finishing = self._before_finishing, []
        if self.population is None or self._failed:
            return
        for hook in hooks:
            hook()
        # Counted per process (any Trainer's strategy), so that every rank waits on the same key.
        _ESTABLISHED["finishes"] = _ESTABLISHED.get("finishes", 0) + 1
        self.population.wait_for_everyone(f"finished/{_ESTABLISHED['finishes']}")
        self._stop_watchdog()

    def _stop_watchdog(self) -> None:
        stop_watchdog(self._watchdog)
        self._watchdog = None

    @override
    def teardown(self) -> None:
        self.finish_population()
        self._stop_watchdog()
        super().teardown()
