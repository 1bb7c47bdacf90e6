"""The groups a rank makes beside the default one (its own, and a strategy's DeviceMesh): every one takes the job's collective timeout
(watchdog.collective_timeout_s), not torch's default (30 min on gloo, past every watchdog budget); gloo connects a
pair of ranks when they first talk; and a partition into subgroups (the health check's node groups, the pipeline's
tie groups) costs a rank one step, not one world-wide step per group."""
from __future__ import annotations

import datetime
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from gpt.collectives import process_group
from gpt.collectives.process_group import (GLOO_LAZY_INIT, DistEnv, all_reduce_values, from_rank0_object,
                                           init_process_group, leave, side_group, subgroups)
from gpt.parallel.mesh import build_mesh
from helpers import spawn_ranks

TIMEOUT_S = 123.0


def _timeout_s(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def _rank(rank: int, world: int, port: int, out) -> None:
    os.environ.pop(GLOO_LAZY_INIT, None)
    torch.set_num_threads(1)
    env = DistEnv(rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port, hostname=f"h{rank}")
    init_process_group(env, torch.device("cpu"), timeout_s=TIMEOUT_S)
    flags = side_group("step_flags")
    pair = subgroups([[2, 0], [1]], "pairs")  # a partition: every rank in one group
    only = subgroups([[0, 2]], "one pair")  # rank 1 in none: it takes no part
    mesh = build_mesh(torch.device("cpu"), one=1, three=3)  # a group of each rank alone, and the world
    out[rank] = {
        "lazy": os.environ.get(GLOO_LAZY_INIT),
        "timeouts": [_timeout_s(g) for g in (dist.group.WORLD, flags, pair, *([only] if only else []),
                                             mesh.get_group("one"), mesh.get_group("three"))],
        "pair": dist.get_process_group_ranks(pair), "only": only and dist.get_process_group_ranks(only),
        "pair sum": all_reduce_values([1.0], group=pair)[0],
        "rank 0's": from_rank0_object(f"from rank {rank}")}
    leave()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_groups_take_the_jobs_timeout_connect_lazily_and_partition_by_members():
    world = 3
    got = spawn_ranks(_rank, world)
    assert {r["lazy"] for r in got.values()} == {"1"}
    assert {t for r in got.values() for t in r["timeouts"]} == {TIMEOUT_S}
    assert [got[r]["pair"] for r in range(world)] == [[0, 2], [1], [0, 2]]
    assert [got[r]["pair sum"] for r in range(world)] == [2.0, 1.0, 2.0]
    assert [got[r]["only"] for r in range(world)] == [[0, 2], None, [0, 2]]
    assert {r["rank 0's"] for r in got.values()} == {"from rank 0"}


def test_a_world_bound_to_its_gpus_makes_every_subgroup_in_one_split(monkeypatch):
    """Under NCCL with the default group bound to the rank's GPU (device_id), torch's new_group splits the world's
    communicator once per group, every rank taking part; split_group makes them all in one."""
    splits = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "group", SimpleNamespace(WORLD=SimpleNamespace(bound_device_id=torch.device("cuda", 0))))
    monkeypatch.setattr(dist, "split_group", lambda **kwargs: splits.append(kwargs) or "mine")
    monkeypatch.setattr(dist, "new_group", lambda *a, **k: pytest.fail("a world-wide new_group per subgroup"))
    monkeypatch.setattr(process_group, "_GROUP_TIMEOUT", datetime.timedelta(seconds=TIMEOUT_S))
    nodes = [[r + 8 * n for r in range(8)] for n in range(128)]
    assert subgroups(nodes, "health_intra_node") == "mine"
    assert splits == [{"split_ranks": nodes, "timeout": datetime.timedelta(seconds=TIMEOUT_S),
                       "group_desc": "health_intra_node"}]
