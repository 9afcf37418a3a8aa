"""How a world of ranks splits into population members.

Pure and validated up front (like torchtitan's ``ParallelDims``): every rank builds the same
``PopulationTopology`` from its launch environment and raises the same clear error on bad input,
before any process group exists, so a mistake can never turn into a hang.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PopulationTopology"]


@dataclass(frozen=True)
class PopulationTopology:
    """A world of ``world_size`` ranks as ``world_size // member_size`` members of consecutive ranks.

    ``processes_per_node`` is the number of ranks per node; a member either fits inside one node or
    spans whole nodes, so that a member's DDP traffic stays on fast links and no node is shared
    unevenly.
    """

    world_size: int
    world_rank: int
    member_size: int = 1
    processes_per_node: int | None = None

    def __post_init__(self) -> None:
        for name in ("world_size", "member_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PopulationStrategy: {name} must be an integer >= 1, got {value!r}")
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

    @property
    def num_members(self) -> int:
        return self.world_size // self.member_size

    @property
    def member_id(self) -> int:
        return self.world_rank // self.member_size

    @property
    def member_rank(self) -> int:
        """This rank's index inside its member (its DDP rank)."""
        return self.world_rank % self.member_size

    def member_ranks(self, member: int) -> range:
        """World ranks of ``member``, in member-rank order."""
        if not 0 <= member < self.num_members:
            raise ValueError(f"member {member} is outside 0..{self.num_members - 1}")
        return range(member * self.member_size, (member + 1) * self.member_size)

    def world_rank_of(self, member: int, member_rank: int) -> int:
        return self.member_ranks(member)[member_rank]
