"""hydra.launcher.pack without a cluster: the plan and its cost, the points it refuses, a point's deferred requeue, and
each point's outcome read from the packed job's one result (the Slurm test is tests/slurm/test_pack.py)."""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from gpt.errors import ConfigError, UserError
from launch.backends import Point
from launch.backends.slurm import pack
from launch.backends.slurm.job import PACKED_VAR, SlurmJob
from launch.backends.slurm.resources import SlurmResources
from launch.backends.slurm.submitted import Submitted
from launch.backends.slurm.wait import collect

ONE_RANK = SlurmResources(nodes=1, tasks_per_node=1, cpus_per_task=2, time_min=10)


def points(tmp_path: Path, n: int, resources: SlurmResources = ONE_RANK) -> list[Point]:
    return [Point(f"seed={i}", tmp_path / f"seed={i}", "tiny", resources) for i in range(n)]


def test_plan_fills_the_node_and_counts_waves_and_node_hours(tmp_path):
    [p] = pack.plan(points(tmp_path, 5), pack.Node(cpus=4))
    assert (p.slots, p.waves) == (2, 3)  # 2 CPUs each on a 4-CPU node: 2 at once, 3 waves
    assert (p.resources.nodes, p.resources.tasks_per_node, p.resources.cpus_per_task, p.resources.time_min) == (
        1, 1, 4, 30)
    assert p.line().endswith("2 at once, 3 wave(s) of 10 min (a node's CPUs hold no more at once); 0.50 node-hours "
                             "against 0.83 for one job per point")
    assert p.budget_point().resources == p.resources  # the budget bills the allocation, not the points


def test_points_of_other_resources_get_their_own_allocation(tmp_path):
    wide = dataclasses.replace(ONE_RANK, tasks_per_node=4, cpus_per_task=1)
    packs = pack.plan([*points(tmp_path, 2), *points(tmp_path / "w", 2, wide)], pack.Node(cpus=8))
    assert [(len(p.points), p.slots, p.resources.cpus_per_task) for p in packs] == [(2, 2, 4), (2, 2, 8)]


@pytest.mark.parametrize("change, why", [({"nodes": 2}, "_nodes=1 is not valid: at least 2 for point seed=0, which asks "
                                                       "for nodes=2"),
                                         ({"cpus_per_task": 8}, "more than a node's 4"),
                                         ({"gpus_per_node": 1}, "its 1 GPUs are more than a node's 0"),
                                         ({"mem": "9G"}, "its 9216 MB memory are more than a node's 8000 MB"),
                                         ({"mem": "0"}, r"a node's whole memory \(cluster.mem=0\)")])
def test_a_point_that_does_not_fit_in_a_node_is_refused_in_one_line(tmp_path, change, why):
    with pytest.raises(ConfigError, match=f"hydra.launcher.pack.*{why}"):
        pack.plan(points(tmp_path, 2, dataclasses.replace(ONE_RANK, **change)), pack.Node(cpus=4, mem_mb=8000))


@pytest.mark.parametrize("each, points, slots, line", [
    # 2-node points of a node's CPUs each, in 4 nodes: 2 at once, each on 2 nodes of its own
    ({"nodes": 2, "cpus_per_task": 4}, 3, (2, 1, 4), "one allocation of 4 nodes x 4 CPU(s): 2 at once (each on 2 "
     "node(s) of its own), 2 wave(s) of 10 min (its 4 nodes hold no more at once: a node's CPUs hold 1 point(s)); "
     "1.33 node-hours against 1.00 for one job per point"),
    # 2-node points of half a node: 2 on each 2 nodes, 4 at once in 4 nodes
    ({"nodes": 2}, 4, (4, 2, 4), "4 nodes x 4 CPU(s): 4 at once (each on 2 node(s) of its own), 1 wave(s)"),
    # one-node points of half a node spread over 3 nodes: 6 at once, and a 4th node would stay idle
    ({}, 6, (6, 2, 3), "3 nodes x 4 CPU(s): 6 at once, 1 wave(s) of 10 min; 0.50 node-hours against 1.00"),
    # 2 points of 2 nodes need 2 of 4: no idle node is asked for
    ({"nodes": 2, "cpus_per_task": 4}, 2, (2, 1, 4), "4 nodes x 4 CPU(s): 2 at once (each on 2 node(s) of its own), "
     "1 wave(s)")])
def test_points_of_several_nodes_each_get_nodes_of_their_own_in_an_allocation_of_several(tmp_path, each, points,
                                                                                       slots, line):
    """hydra.launcher.pack_nodes=4: slots counted per node, in groups of a point's nodes; the allocation asks on each
    node for what the points there hold at once, and for no node they would leave idle."""
    [p] = pack.plan(globals()["points"](tmp_path, points, dataclasses.replace(ONE_RANK, **each)), pack.Node(cpus=4),
                    nodes=4)
    assert (p.slots, p.per_group, p.resources.nodes) == slots
    assert line in p.line()


def test_a_point_of_more_nodes_than_the_allocation_is_refused_before_anything_is_submitted(tmp_path):
    wide = dataclasses.replace(ONE_RANK, nodes=8)
    with pytest.raises(ConfigError) as e:
        pack.plan([*points(tmp_path, 2), *points(tmp_path / "w", 1, wide)], pack.Node(cpus=4), nodes=4)
    assert str(e.value) == ("hydra.launcher.pack_nodes=4 is not valid: at least 8 for point seed=0, which asks for "
                            "nodes=8: each packed point runs on nodes of its own in the allocation")
    with pytest.raises(UserError, match="point seed=0 asks for nodes=4, more than its partition's 3 node"):
        pack.plan(points(tmp_path, 1, dataclasses.replace(ONE_RANK, nodes=4)), pack.Node(cpus=4, of=3), nodes=8)
    [p] = pack.plan(points(tmp_path, 8), pack.Node(cpus=2, of=3), nodes=16)  # no more than the partition's 3
    assert (p.resources.nodes, p.slots, p.waves) == (3, 3, 3)


def test_the_packer_names_each_point_its_own_nodes_and_a_step_is_its_points_job(monkeypatch, tmp_path):
    """The allocation's nodes in groups of a point's nodes, in turn; a packed point's ranks see their step's nodes as
    their job's (Slurm names the allocation's there), a rank of a job of its own keeps the job's."""
    from launch.backends.slurm import commands
    from launch.backends.slurm.job import packed_step_as_job
    from launch.backends.slurm.pack_task import node_groups

    monkeypatch.setattr(commands, "hostnames", lambda nodelist: {"n[1-5]": [f"n{i}" for i in range(1, 6)]}[nodelist])
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-5]")
    assert node_groups(2, 2) == [["n1", "n2"], ["n3", "n4"], ["n1", "n2"], ["n3", "n4"]]
    assert node_groups(1, 1) == [["n1"], ["n2"], ["n3"], ["n4"], ["n5"]]
    step = {"SLURM_JOB_NODELIST": "n[1-4]", "SLURM_JOB_NUM_NODES": "4", "SLURM_NNODES": "2",
            "SLURM_STEP_NODELIST": "n[3-4]", "SLURM_STEP_NUM_NODES": "2"}
    assert packed_step_as_job({**step, PACKED_VAR: "1"}) == {
        "SLURM_JOB_NODELIST": "n[3-4]", "SLURM_NODELIST": "n[3-4]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2"}
    assert packed_step_as_job(step) == {}


ONE_GPU = dataclasses.replace(ONE_RANK, gpus_per_node=1, cpus_per_task=1, mem="1G")


@pytest.mark.parametrize("node, slots, by", [(pack.Node(cpus=96, gpus=8, mem_mb=64000), 8, "GPUs"),
                                             (pack.Node(cpus=4, gpus=8), 4, "CPUs"),
                                             (pack.Node(cpus=96, gpus=8, mem_mb=3000), 2, "memory")])
def test_gpu_points_are_counted_by_the_gpus_cpus_and_memory_of_a_node(tmp_path, node, slots, by):
    """One-GPU points on 8-GPU nodes: as many at once as the scarcest of a node's resources holds; the allocation
    asks for every slot's GPUs and memory (memory unknown to sinfo does not count)."""
    [p] = pack.plan(points(tmp_path, 10, ONE_GPU), node)
    assert (p.slots, p.by, p.waves) == (slots, by, -(-10 // slots))
    res = p.resources
    assert (res.tasks_per_node, res.cpus_per_task, res.gpus_per_node, res.mem) == (1, slots, slots, f"{slots * 1024}M")
    assert f"1 node x {slots} CPU(s), {slots} GPU(s): {slots} at once" in p.line()
    assert f"(a node's {by} hold no more at once)" in p.line()


@pytest.mark.parametrize("form, asked", [({"gpus_per_task": 1}, {"gpus_per_node": 4}),
                                         ({"gres": "gpu:a100:1"}, {"gres": "gpu:a100:4"}),
                                         ({"sbatch": (("gpu-bind", "closest"), ("gres", "gpu"))},
                                          {"gres": "gpu:4", "sbatch": (("gpu-bind", "closest"),)})])
def test_the_allocation_asks_for_the_gpus_in_the_points_form_and_each_step_for_its_own(tmp_path, form, asked):
    """A site that takes only --gres gets --gres (its type kept); --gpus-per-task, which the allocation's one task
    cannot carry, becomes --gpus-per-node. Each point's step asks for its own GPU in its own form."""
    from launch.backends.slurm.pack_task import own_share

    each = dataclasses.replace(ONE_RANK, cpus_per_task=1, **form)
    [p] = pack.plan(points(tmp_path, 4, each), pack.Node(cpus=4, gpus=4))
    got = {k: getattr(p.resources, k) for k in asked}
    assert got == asked and p.resources.node_gpus == 4
    gres = each.gres or dict(each.sbatch).get("gres")
    assert own_share(each) == ([f"--gres={gres}"] if gres else ["--gpus-per-task=1"])


def test_a_packed_rank_leaves_the_requeue_to_its_allocation(monkeypatch):
    """scontrol requeue from one point would end the other points' steps mid-save."""
    asked = []
    monkeypatch.setattr("launch.backends.slurm.commands.requeue", asked.append)
    job = SlurmJob({"SLURM_JOB_ID": "7", PACKED_VAR: "1"})
    assert job.requeue(max_restarts=3) == (True, "job 7 (packed) requeues once every running point of it has saved")
    assert asked == []
    assert SlurmJob({"SLURM_JOB_ID": "7", PACKED_VAR: "1", "SLURM_RESTART_COUNT": "3"}).requeue(3)[0] is False


def test_each_point_reads_its_own_entry_of_the_packed_result(tmp_path):
    a, b = points(tmp_path, 2)
    jobs = [Submitted(p, "9", tmp_path, packed=True) for p in (a, b)]
    summary = {"final_loss": 3.2}
    result = {str(a.run_dir): {"results": [{"rank": 0, "host": "n1", "summary": summary}]},
              str(b.run_dir): {"error": "rank 0 diverged (its log: x)"}}
    jobs[0].paths(0).result_pickle.write_bytes(pickle.dumps(("success", result)))
    ok, failed = (collect(s, "COMPLETED", grace_s=0) for s in jobs)
    assert ok.ok and ok.result["summary"] == summary and ok.result["hosts"] == ["n1"]
    assert failed.state == "FAILED" and failed.errors == ["rank 0 diverged (its log: x)"]


def test_a_point_that_sets_no_memory_gets_its_slots_share_of_the_allocations(monkeypatch):
    """Where memory is a consumable, a step without --mem is given the allocation's whole memory: each point's step
    asks for the allocation's memory over its slots instead (Slurm's variables, else the job's TRES); one that sets
    its own keeps it, and where Slurm holds none for the job no flag is added."""
    from launch.backends.slurm import commands
    from launch.backends.slurm.pack_task import own_share, slot_mem_mb

    assert slot_mem_mb({"SLURM_MEM_PER_NODE": "8000"}, 4) == 2000
    assert slot_mem_mb({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "4"}, 2) == 2000
    info = commands.JobInfo("7", "RUNNING", fields=(("TRES", "cpu=4,mem=7.5G,node=1,billing=4"),))
    monkeypatch.setattr(commands, "scontrol_job", {"7": info}.get)
    assert slot_mem_mb({"SLURM_JOB_ID": "7"}, 3) == 2560
    assert slot_mem_mb({"SLURM_JOB_ID": "8"}, 3) is None
    assert slot_mem_mb({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "3"}, 1) == 2560  # the TRES is every node's
    each = dataclasses.replace(ONE_RANK, cpus_per_task=1)
    assert own_share(each, 2000) == ["--mem=2000M"] and own_share(each) == []
    assert own_share(dataclasses.replace(each, mem="1G"), 2000) == ["--mem=1G"]


def test_packed_points_side_by_side_rendezvous_on_ports_of_their_own():
    """Points of one allocation share its job id, from which a job's port follows: each point's step is given the
    port moved by its index, and its ranks' rounds move it by one each, never onto another point's."""
    from launch.backends.slurm.placement import master_port, point_port
    from launch.rank.job_env import ROUND_VAR

    job = {"SLURM_JOB_ID": "4242"}
    ports = [point_port(job, p) for p in range(4)]
    assert ports[0] == master_port(job) and len(set(ports)) == 4
    met = {master_port({**job, "MASTER_PORT": str(port), ROUND_VAR: str(r)}) for port in ports for r in range(3)}
    assert len(met) == 12
    assert point_port({**job, ROUND_VAR: "2"}, 1) == ports[1]  # the packer's own round does not move it
