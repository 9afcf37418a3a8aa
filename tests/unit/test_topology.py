"""PopulationTopology: the split of a world into members, validated before any process group."""

from __future__ import annotations

import pytest

from lightning_pbt.topology import PopulationTopology


@pytest.mark.parametrize(("world", "member_size", "members"), [(4, 1, 4), (4, 2, 2), (8, 4, 2), (6, 3, 2), (1, 1, 1)])
def test_members_are_consecutive_ranks(world, member_size, members):
    for rank in range(world):
        topology = PopulationTopology(world_size=world, world_rank=rank, member_size=member_size)
        assert topology.num_members == members
        assert topology.member_id == rank // member_size
        assert topology.member_rank == rank % member_size
        assert rank in topology.member_ranks(topology.member_id)
        assert topology.world_rank_of(topology.member_id, topology.member_rank) == rank


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 3, "world_rank": 0, "member_size": 2}, "not a multiple of member_size"),
        ({"world_size": 4, "world_rank": 0, "member_size": 0}, "member_size must be an integer >= 1"),
        ({"world_size": 4, "world_rank": 0, "member_size": -2}, "member_size must be an integer >= 1"),
        ({"world_size": 4, "world_rank": 0, "member_size": 1.5}, "member_size must be an integer >= 1"),
        ({"world_size": 4, "world_rank": 4, "member_size": 1}, "outside the world"),
        ({"world_size": 12, "world_rank": 0, "member_size": 3, "processes_per_node": 4}, "span nodes unevenly"),
        ({"world_size": 12, "world_rank": 0, "member_size": 6, "processes_per_node": 4}, "span nodes unevenly"),
    ],
)
def test_invalid_topologies_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PopulationTopology(**kwargs)


@pytest.mark.parametrize(("member_size", "per_node"), [(2, 4), (4, 4), (8, 4), (1, 3)])
def test_members_that_divide_or_span_whole_nodes_are_fine(member_size, per_node):
    PopulationTopology(world_size=8 * per_node, world_rank=0, member_size=member_size, processes_per_node=per_node)


def test_member_ranks_rejects_unknown_member():
    with pytest.raises(ValueError, match="member 2 is outside"):
        PopulationTopology(world_size=4, world_rank=0, member_size=2).member_ranks(2)
