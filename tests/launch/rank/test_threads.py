"""Each rank's CPU threads: decided per sweep point, passed in the rank's own environment, recorded."""
from __future__ import annotations

import json

import pytest

from helpers import launch
from launch.rank.threads import ThreadPlan, usable_cpus

QUICK = ["model=tiny", "strategy=ddp", "train.max_steps=4", "train.log_interval=2", "train.eval_interval=0",
         "checkpoint.interval_steps=0"]


def recorded(point) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((point / "environment").glob("rank*.json"))]


@pytest.mark.parametrize("order", ["1,2", "2,1"])
@pytest.mark.slow
def test_each_sweep_point_gets_its_own_thread_count(order, tmp_path, data_overrides, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    launch(f"nodes={order}", *QUICK, *data_overrides, run_dir=tmp_path, multirun=True)
    cpus = usable_cpus()
    one, two = recorded(tmp_path / "nodes=1"), recorded(tmp_path / "nodes=2")
    assert [r["threads"] for r in one] == [cpus]
    assert [r["threads"] for r in two] == [max(1, cpus // 2)] * 2
    for r in one + two:
        assert r["cpu_affinity"] and r["machine_id"] and r["threads_source"].endswith("rank(s)")
    assert "CPU thread(s) per rank" in (tmp_path / "nodes=2" / "logs" / "rank0.log").read_text()


@pytest.mark.slow
def test_the_users_omp_num_threads_is_respected_and_oversubscription_warned(tmp_path, data_overrides):
    cpus = usable_cpus()
    proc = launch("nodes=2", *QUICK, *data_overrides, run_dir=tmp_path, env={"OMP_NUM_THREADS": str(cpus)})
    ranks = recorded(tmp_path)
    assert [r["threads"] for r in ranks] == [cpus, cpus]
    assert all("(yours)" in r["threads_source"] for r in ranks)
    assert f"2 rank(s) x {cpus} thread(s)" in proc.stderr


def test_plan_rules():
    assert ThreadPlan.decide(2, environ={}, cpus=8).threads == 4
    assert ThreadPlan.decide(3, environ={}, cpus=2).threads == 1
    assert ThreadPlan.decide(4, cpus_per_task=6, environ={}, cpus=64).threads == 6
    assert ThreadPlan.decide(4, cpus_per_task=6, environ={"OMP_NUM_THREADS": "2"}).threads == 2
    assert ThreadPlan.decide(2, environ={"OMP_NUM_THREADS": "junk"}, cpus=8).threads == 4
    plan = ThreadPlan.decide(2, environ={}, cpus=8)
    assert ThreadPlan.from_env(plan.env()) == plan  # what the rank reads is what the launcher decided
    slurm = ThreadPlan.from_env({"SLURM_CPUS_PER_TASK": "3", "SLURM_TASKS_PER_NODE": "4(x2)"})
    assert (slurm.threads, slurm.ranks_on_host) == (3, 4)
    assert ThreadPlan(4, "x", 2).oversubscribed(cpus=8, environ={}) is None
    assert "2 rank(s) x 4 thread(s) = 8 threads on 4 CPU(s)" in ThreadPlan(4, "x", 2).oversubscribed(cpus=4, environ={})
    assert ThreadPlan(4, "x", 2).oversubscribed(cpus=4, environ={}).endswith("set it to 2")
    # one thread each already: fewer threads cannot help, fewer ranks can
    assert ThreadPlan(1, "x", 4).oversubscribed(cpus=2, environ={}).endswith(
        "run at most 2 rank(s) on it (cluster.tasks_per_node, or more nodes)")


def test_idle_openmp_threads_sleep_unless_the_user_said_otherwise():
    """libgomp's idle threads spin by default, burning the CPUs that the node's other ranks and threads need."""
    assert ThreadPlan.decide(2, environ={}, cpus=8).env()["OMP_WAIT_POLICY"] == "PASSIVE"
    assert ThreadPlan.decide(2, environ={"OMP_WAIT_POLICY": "ACTIVE"}, cpus=8).env()["OMP_WAIT_POLICY"] == "ACTIVE"
    slurm = ThreadPlan.from_env({"SLURM_CPUS_PER_TASK": "3", "SLURM_TASKS_PER_NODE": "4(x2)"})
    assert slurm.env()["OMP_WAIT_POLICY"] == "PASSIVE"
    assert ThreadPlan.from_env(ThreadPlan.decide(1, environ={"OMP_WAIT_POLICY": "ACTIVE"}).env()).wait_policy == "ACTIVE"


def test_a_task_slurm_bound_to_its_own_cpus_is_judged_on_them_alone():
    bound = {"SLURM_CPUS_ON_NODE": "16"}  # 8 tasks x -c 2 on this host; this task's affinity: its 2 CPUs
    assert ThreadPlan(2, "--cpus-per-task=2", 8).oversubscribed(cpus=2, environ=bound) is None
    assert "1 rank(s) x 4 thread(s) = 4 threads on 2 CPU(s)" in ThreadPlan(4, "x", 8).oversubscribed(cpus=2,
                                                                                                   environ=bound)
    # not bound (task/none): every rank of the host runs on the same 16 CPUs
    shared = ThreadPlan(4, "x", 8).oversubscribed(cpus=16, environ=bound)
    assert "8 rank(s) x 4 thread(s) = 32 threads on 16 CPU(s)" in shared


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "150000 100000"}, 2),  # cgroup v2: a container's --cpus=1.5
    ({"cpu.max": "max 100000"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({}, None)])
def test_a_cgroups_cpu_quota_caps_the_cpus_a_rank_plans_threads_for(tmp_path, files, quota):
    """A container limited to 1.5 CPUs on a many-core host still sees every core in its affinity mask: a thread per
    core there is throttled. The plan takes the quota, rounded up, where it is smaller."""
    from launch.rank.threads import cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert cpu_quota(tmp_path) == quota
    assert usable_cpus(tmp_path) == min(usable_cpus(tmp_path / "none"), quota or 1 << 20)


def test_inductors_compile_workers_follow_the_quota_unless_set(monkeypatch):
    import torch

    from launch.rank import threads

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    monkeypatch.delenv(threads.COMPILE_THREADS, raising=False)
    monkeypatch.setattr(threads, "cpu_quota", lambda *_: 3)
    threads.apply_threads(local_rank=1)
    assert threads.os.environ[threads.COMPILE_THREADS] == str(min(3, len(threads.os.sched_getaffinity(0))))
    monkeypatch.setenv(threads.COMPILE_THREADS, "7")
    threads.apply_threads(local_rank=1)
    assert threads.os.environ[threads.COMPILE_THREADS] == "7"
    assert torch.get_num_threads() == before
