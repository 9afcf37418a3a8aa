"""Creating and taking down a launch's process groups: each member's group becomes the default group
(so that Lightning and torch inside a member see a world of ``member_size`` ranks) and the population gets
its own, explicitly named :class:`~lightning_pbt.distributed.collectives.PopulationGroup`. The strategy
calls these once per process; they know nothing of Lightning beyond the address its environment gives.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_pbt.algorithm.topology import PopulationTopology
from lightning_pbt.distributed.collectives import ESTABLISHED, PopulationGroup, open_store_client

__all__ = ["create_groups", "shutdown_population"]


def create_groups(
    topology: PopulationTopology, backend: str, root_device: torch.device, env: Any, timeout: timedelta
) -> tuple[PopulationGroup, str]:
    """Create this member's process group (the default group) and the population group.

    Args:
        topology: this rank's place in the population.
        backend: the members' backend (``"nccl"`` or ``"gloo"``); the population's follows the topology.
        root_device: this rank's device.
        env: Lightning's cluster environment (its ``main_address`` and ``main_port``).
        timeout: for the rendezvous and every collective.

    Returns:
        The population group and the run's store prefix.
    """
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)
    url = f"env://?rank={topology.world_rank}&world_size={topology.world_size}"
    store, _, _ = next(dist.rendezvous(url, timeout=timeout))
    # A torchrun restart reuses the agent's store: keys of an earlier attempt must not leak in.
    prefix = f"lightning_pbt/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    run_store = dist.PrefixStore(prefix, store)
    kwargs: dict[str, Any] = {}
    if root_device.type == "cuda":
        torch.cuda.set_device(root_device)
        kwargs["device_id"] = root_device
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"member_{topology.member_id}/", run_store),
        rank=topology.member_rank,
        world_size=topology.member_size,
        timeout=timeout,
        **kwargs,
    )
    # NCCL across the population only when no two of its ranks share a GPU; else gloo via host memory.
    population_backend = topology.population_backend if backend == "nccl" else "gloo"
    device = root_device if population_backend == "nccl" else torch.device("cpu")
    address, port = env.main_address, env.main_port

    def connect_store() -> dist.Store:
        return dist.PrefixStore(prefix, open_store_client(address, port, timeout))

    population = PopulationGroup.create(
        run_store, topology.world_rank, topology.world_size, population_backend, device, timeout, connect_store
    )
    return population, prefix


def shutdown_population() -> None:
    """Take the process groups down while the interpreter is still whole.

    Left to interpreter teardown, a gloo backend can be destroyed after the threads it relies on, which
    aborts the process ("terminate called without an active exception") after a successful run.
    """
    population = ESTABLISHED.pop("population", None)
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()
    if population is not None:
        population.shutdown()  # the host group of the asynchronous mode too
        del population
