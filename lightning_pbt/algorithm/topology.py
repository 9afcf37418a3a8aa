"""How a world of ranks splits into population members, and which device and backend each rank gets.

Pure and validated up front (like torchtitan's ``ParallelDims``): every rank builds the same
``PopulationTopology`` from its launch environment and raises the same clear error on bad input,
before any process group exists, so a mistake can never turn into a hang.

Devices: a node runs ``processes_per_node`` ranks on ``devices_per_node`` GPUs (``None`` on CPU). When
there are more ranks than GPUs, several members share a GPU: local rank ``i`` uses GPU
``i % devices_per_node``, so the consecutive ranks of one member land on distinct GPUs (NCCL refuses
two ranks of one communicator on one device). A member's own group is NCCL on GPUs; the population
group is NCCL only when no two ranks share a GPU, and gloo through host memory otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

__all__ = ["ParkingPlace", "PopulationTopology", "expand_devices", "parking_place"]

T = TypeVar("T")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def expand_devices(devices: Sequence[T], processes_per_device: int) -> list[T]:
    """The device of each local rank when every device hosts ``processes_per_device`` ranks.

    Round-robin (local rank ``i`` -> ``devices[i % len(devices)]``), the same rule as
    :attr:`PopulationTopology.device_index`.

    Args:
        devices: the devices Lightning chose for this node, one per GPU.
        processes_per_device: ranks per device (``PopulationStrategy(processes_per_device=...)``).

    Returns:
        ``len(devices) * processes_per_device`` entries, the device of local rank ``i`` at index ``i``.

    Raises:
        ValueError: ``processes_per_device`` is not an integer ``>= 1``.

    Examples:
        >>> expand_devices(["cuda:0", "cuda:1"], 2)
        ['cuda:0', 'cuda:1', 'cuda:0', 'cuda:1']
    """
    if not _positive_int(processes_per_device):
        raise ValueError(
            f"PopulationStrategy: processes_per_device must be an integer >= 1, got {processes_per_device!r}"
        )
    return [devices[i % len(devices)] for i in range(len(devices) * processes_per_device)]


@dataclass(frozen=True)
class ParkingPlace:
    """Where the tensors of a member that waits for its turn live (members that take turns).

    Attributes:
        device: the device they move to while the member is parked (``None``: they stay where they are).
        pin_memory: whether host copies are page-locked (fast, asynchronous-capable copies back to a GPU).
    """

    device: str | None = None
    pin_memory: bool = False


def parking_place(device_type: str, keep_on_device: bool = False) -> ParkingPlace:
    """Where a parked member's weights, gradients and optimizer state wait, given the device it trains on.

    On a GPU they leave the device for page-locked host memory, so that K members of a process need not
    fit on the GPU together (``keep_on_device=True`` keeps them there, for members that fit: no copies);
    on the CPU nothing moves.

    Args:
        device_type: the type of the device the member trains on (``"cpu"``, ``"cuda"``).
        keep_on_device: ``PopulationStrategy(keep_parked_on_device=...)``.

    Examples:
        >>> parking_place("cuda")
        ParkingPlace(device='cpu', pin_memory=True)
        >>> parking_place("cuda", keep_on_device=True), parking_place("cpu")
        (ParkingPlace(device=None, pin_memory=False), ParkingPlace(device=None, pin_memory=False))
    """
    if device_type == "cpu" or keep_on_device:
        return ParkingPlace()
    return ParkingPlace(device="cpu", pin_memory=True)


@dataclass(frozen=True)
class PopulationTopology:
    """A world of ``world_size`` ranks as ``world_size // member_size`` slots of consecutive ranks, each
    slot hosting ``members_per_process`` members that take turns (one member per slot by default).

    ``processes_per_node`` is the number of ranks per node; a member either fits inside one node or
    spans whole nodes, so that a member's DDP traffic stays on fast links and no node is shared
    unevenly. ``devices_per_node`` is the number of GPUs those ranks use (``None``: CPU ranks).

    Args:
        world_size: ranks in the launch, all nodes together.
        world_rank: this rank, in ``[0, world_size)``.
        member_size: ranks per member; must divide ``world_size``.
        processes_per_node: ranks per node (``None``: unknown, no node checks); ``member_size`` must
            divide it or be a multiple of it.
        devices_per_node: GPUs per node (``None``: CPU ranks); needs ``processes_per_node``, which must
            be a multiple of it, and a member's ranks on one node must not outnumber it.
        members_per_process: members each slot hosts, taking turns (``PopulationStrategy(members_per_process=K)``).
        lane: which of them this view describes (``0 <= lane < members_per_process``).

    Raises:
        ValueError: any of the conditions above, with a message that says what to change. Every rank
            raises the same one, before any process group exists.

    Examples:
        Two nodes of 8 GPUs with 2 ranks per GPU, members of 2 ranks:

        >>> t = PopulationTopology(world_size=32, world_rank=21, member_size=2, processes_per_node=16,
        ...                        devices_per_node=8)
        >>> t.num_members, t.member_id, t.member_rank, t.local_rank, t.device_index
        (16, 10, 1, 5, 5)
        >>> t.member_backend, t.population_backend
        ('nccl', 'gloo')
    """

    world_size: int
    world_rank: int
    member_size: int = 1
    processes_per_node: int | None = None
    devices_per_node: int | None = None
    members_per_process: int = 1
    lane: int = 0

    def __post_init__(self) -> None:
        for name in ("world_size", "member_size", "members_per_process"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"PopulationStrategy: {name} must be an integer >= 1, got {value!r}")
        lane = self.lane
        if isinstance(lane, bool) or not isinstance(lane, int) or not 0 <= lane < self.members_per_process:
            raise ValueError(f"lane {self.lane!r} is outside 0..{self.members_per_process - 1}")
        if not 0 <= self.world_rank < self.world_size:
            raise ValueError(
                f"PopulationStrategy: world rank {self.world_rank} is outside the world of {self.world_size} ranks"
            )
        if self.world_size % self.member_size:
            raise ValueError(
                f"PopulationStrategy: the world size ({self.world_size} ranks) is not a multiple of member_size "
                f"({self.member_size}); launch a multiple of {self.member_size} ranks or change member_size"
            )
        per_node = self.processes_per_node
        if per_node is not None and per_node >= 1 and per_node % self.member_size and self.member_size % per_node:
            raise ValueError(
                f"PopulationStrategy: member_size={self.member_size} does not divide the {per_node} ranks per node "
                f"and is not a multiple of it, so a member would span nodes unevenly; use a member_size that "
                f"divides {per_node} or is a multiple of it"
            )
        if self.devices_per_node is not None:
            self._check_devices()

    def _check_devices(self) -> None:
        devices, per_node = self.devices_per_node, self.processes_per_node
        if not _positive_int(devices):
            raise ValueError(f"PopulationStrategy: devices_per_node must be an integer >= 1, got {devices!r}")
        if not _positive_int(per_node):
            raise ValueError("PopulationStrategy: devices_per_node needs processes_per_node")
        assert devices is not None and per_node is not None
        if per_node % devices:
            raise ValueError(
                f"PopulationStrategy: {per_node} ranks per node cannot share {devices} GPUs evenly; launch a multiple "
                f"of {devices} ranks per node (processes_per_device x GPUs)"
            )
        ranks_on_a_node = min(self.member_size, per_node)
        if ranks_on_a_node > devices:
            raise ValueError(
                f"PopulationStrategy: member_size={self.member_size} would put two ranks of one member on the same "
                f"GPU ({per_node} ranks share {devices} GPUs per node, and NCCL refuses two ranks of one group on one "
                f"device); use member_size <= {devices}, or fewer processes per GPU"
            )

    @property
    def num_members(self) -> int:
        return self.world_size // self.member_size * self.members_per_process

    @property
    def slot(self) -> int:
        """This rank's process slot: the ``member_size`` consecutive ranks that host the same members."""
        return self.world_rank // self.member_size

    @property
    def member_id(self) -> int:
        """Slot x ``members_per_process`` + lane: a member's id does not depend on the layout's K
        (member ``m`` is lane ``m % K`` of slot ``m // K``)."""
        return self.slot * self.members_per_process + self.lane

    def lane_of(self, member: int) -> int:
        """The lane that hosts ``member`` in its processes."""
        return member % self.members_per_process

    def lanes(self) -> list[PopulationTopology]:
        """This process's view as each of its lanes (lane ``k`` hosts member ``slot x K + k``)."""
        return [replace(self, lane=lane) for lane in range(self.members_per_process)]

    @property
    def member_rank(self) -> int:
        """This rank's index inside its member (its DDP rank)."""
        return self.world_rank % self.member_size

    @property
    def local_rank(self) -> int:
        """This rank's index on its node (ranks are numbered node by node)."""
        return self.world_rank % self.processes_per_node if self.processes_per_node else self.world_rank

    @property
    def processes_per_device(self) -> int:
        """How many ranks share each GPU (1 on CPU)."""
        if self.devices_per_node is None or self.processes_per_node is None:
            return 1
        return self.processes_per_node // self.devices_per_node

    @property
    def device_index(self) -> int | None:
        """The GPU this rank uses on its node (``None`` on CPU)."""
        return None if self.devices_per_node is None else self.local_rank % self.devices_per_node

    @property
    def member_backend(self) -> str:
        """The backend of each member's own (DDP) group."""
        return "gloo" if self.devices_per_node is None else "nccl"

    @property
    def population_backend(self) -> str:
        """The backend of the population group: NCCL needs every population rank on its own GPU."""
        return "nccl" if self.devices_per_node is not None and self.processes_per_device == 1 else "gloo"

    def member_ranks(self, member: int) -> range:
        """World ranks of ``member``, in member-rank order."""
        if not 0 <= member < self.num_members:
            raise ValueError(f"member {member} is outside 0..{self.num_members - 1}")
        slot = member // self.members_per_process
        return range(slot * self.member_size, (slot + 1) * self.member_size)

    def world_rank_of(self, member: int, member_rank: int) -> int:
        return self.member_ranks(member)[member_rank]
