"""hydra.launcher.pack without a cluster: the plan and its cost, the points it refuses, a point's deferred requeue, and
each point's outcome read from the packed job's one result (the Slurm test is tests/slurm/test_pack.py)."""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from gpt.errors import ConfigError
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
    [p] = pack.plan(points(tmp_path, 5), cpus=4)
    assert (p.slots, p.waves) == (2, 3)  # 2 CPUs each on a 4-CPU node: 2 at once, 3 waves
    assert (p.resources.nodes, p.resources.tasks_per_node, p.resources.cpus_per_task, p.resources.time_min) == (
        1, 1, 4, 30)
    assert p.line().endswith("2 at once, 3 wave(s) of 10 min; 0.50 node-hours against 0.83 for one job per point")
    assert p.budget_point().resources == p.resources  # the budget bills the allocation, not the points


def test_points_of_other_resources_get_their_own_allocation(tmp_path):
    wide = dataclasses.replace(ONE_RANK, tasks_per_node=4, cpus_per_task=1)
    packs = pack.plan([*points(tmp_path, 2), *points(tmp_path / "w", 2, wide)], cpus=8)
    assert [(len(p.points), p.slots, p.resources.cpus_per_task) for p in packs] == [(2, 2, 4), (2, 2, 8)]


@pytest.mark.parametrize("change, why", [({"nodes": 2}, "more than one node"), ({"gpus_per_node": 1}, "GPUs"),
                                         ({"cpus_per_task": 8}, "more than a node's 4")])
def test_a_point_that_does_not_fit_in_a_node_is_refused_in_one_line(tmp_path, change, why):
    with pytest.raises(ConfigError, match=f"hydra.launcher.pack.*{why}"):
        pack.plan(points(tmp_path, 2, dataclasses.replace(ONE_RANK, **change)), cpus=4)


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
