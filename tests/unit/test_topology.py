"""PopulationTopology: the split of a world into members, validated before any process group."""

from __future__ import annotations

import pytest

from lightning_pbt.algorithm.topology import PopulationTopology, expand_devices


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


# -- devices: which GPU each rank uses, which backend each group gets ---------------------------------
def layout(world: int, member_size: int, per_node: int, gpus: int) -> list[PopulationTopology]:
    return [
        PopulationTopology(world, rank, member_size, processes_per_node=per_node, devices_per_node=gpus)
        for rank in range(world)
    ]


@pytest.mark.parametrize(
    ("world", "member_size", "per_node", "gpus", "population_backend"),
    [
        (4, 1, 4, 1, "gloo"),  # 4 members on 1 GPU
        (2, 1, 2, 1, "gloo"),  # 2 members on 1 GPU
        (16, 1, 16, 8, "gloo"),  # 16 members on an 8-GPU node
        (16, 2, 16, 8, "gloo"),  # 8 members of 2 GPUs on an 8-GPU node
        (32, 1, 16, 8, "gloo"),  # 2 nodes x 8 GPUs x 2 ranks per GPU
        (32, 2, 16, 8, "gloo"),
        (32, 8, 16, 8, "gloo"),
        (16, 2, 8, 8, "nccl"),  # one rank per GPU: the population group can be NCCL
        (16, 16, 8, 8, "nccl"),  # members spanning two whole nodes
    ],
)
def test_shared_gpus_hold_distinct_ranks_of_each_member(world, member_size, per_node, gpus, population_backend):
    ranks = layout(world, member_size, per_node, gpus)
    per_gpu: dict[tuple[int, int], list[int]] = {}
    for t in ranks:
        node = t.world_rank // per_node
        per_gpu.setdefault((node, t.device_index), []).append(t.world_rank)
        assert t.member_backend == "nccl"
        assert t.population_backend == population_backend
    # Every GPU of every node hosts the same number of ranks, and never two ranks of one member.
    assert {len(hosted) for hosted in per_gpu.values()} == {per_node // gpus}
    assert len(per_gpu) == gpus * (world // per_node)
    for hosted in per_gpu.values():
        members = [rank // member_size for rank in hosted]
        assert len(set(members)) == len(members), hosted
    # Lightning's launcher gets the same assignment from expand_devices (local rank -> device).
    devices = expand_devices(list(range(gpus)), per_node // gpus)
    assert [devices[t.local_rank] for t in ranks] == [t.device_index for t in ranks]


def test_cpu_ranks_have_no_device_and_use_gloo():
    t = PopulationTopology(world_size=4, world_rank=3, member_size=2, processes_per_node=4)
    assert (t.device_index, t.member_backend, t.population_backend, t.processes_per_device) == (None, "gloo", "gloo", 1)


@pytest.mark.parametrize(
    ("world", "member_size", "per_node", "gpus", "message"),
    [
        (4, 2, 4, 1, "two ranks of one member on the same GPU"),  # 2 members x 2 ranks on 1 GPU
        (16, 4, 16, 2, "two ranks of one member on the same GPU"),
        (32, 16, 16, 8, "two ranks of one member on the same GPU"),  # a member spanning 2 shared nodes
        (6, 1, 6, 4, "cannot share 4 GPUs evenly"),
        (4, 1, 4, 0, "devices_per_node must be an integer >= 1"),
    ],
)
def test_layouts_that_break_nccl_are_refused(world, member_size, per_node, gpus, message):
    with pytest.raises(ValueError, match=message):
        PopulationTopology(world, 0, member_size, processes_per_node=per_node, devices_per_node=gpus)


def test_expand_devices_refuses_a_bad_count():
    with pytest.raises(ValueError, match="processes_per_device must be an integer >= 1"):
        expand_devices(["cuda:0"], 0)
    assert expand_devices(["cuda:0", "cuda:1"], 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
