"""hydra.launcher.pack on the real local Slurm cluster: a sweep's single-rank points as steps of one allocation."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from helpers import wait_until
from slurm_helpers import REPO, SLURM, TINY, environments, launch_cmd, losses, run_launch
from test_slurm_preemption import FIRST_WAITS, urgent_job

pytestmark = pytest.mark.slurm

# 30 steps of 0.1 s each, a checkpoint every 5: long enough to be preempted mid-run
RUN = [o for o in TINY if not o.startswith(("train.max_steps", "checkpoint.interval_steps"))] + [
    "strategy=single", "train.max_steps=30", "checkpoint.interval_steps=5", "debug.delay_rank=0", "debug.delay_s=0.1",
    "preemption.in_job_restarts=0"]
SEEDS = (1, 2, 3)


def training(run_dir) -> bool:
    metrics = run_dir / "metrics" / "rank0.jsonl"
    return metrics.exists() and '"kind": "train"' in metrics.read_text()


# the points' shape, their seeds, and what the plan says of them: 3 one-node points of half a node in one node; 2
# two-node points of a node's memory (8000 MB nodes) in 4 nodes, each point on 2 of its own
SHAPES = {"one-node": (["cluster.cpus_per_task=2"], SEEDS, "1 node x 4 CPU(s): 2 at once, 2 wave(s)"),
          "two-node": (["nodes=2", "strategy=ddp", "cluster.cpus_per_task=2", "cluster.mem=5000M",
                        "hydra.launcher.pack_nodes=4"], SEEDS[:2],
                       "4 nodes x 2 CPU(s): 2 at once (each on 2 node(s) of its own), 1 wave(s)")}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_sweep_is_one_job_that_survives_a_preemption(slurm_cluster, tmp_path, data_overrides, shape):
    """Points in one allocation, as `srun --exact` steps 2 at once: 3 single-rank points of 2 CPUs in one node of 4
    CPUs, or 2 two-node points in 4 nodes, each point's step on 2 nodes of its own. The plan is printed before the one
    job is submitted. USR2 to the allocation while the first wave trains saves both its points, and the packer
    requeues the allocation once; the requeued allocation resumes them and runs the point not started. Each finishes;
    a one-node seed=1 with the losses of its unpacked run."""
    sweep, alone = tmp_path / "sweep", tmp_path / "alone"
    asked, seeds, planned = SHAPES[shape]
    proc = subprocess.Popen(launch_cmd("-m", f"seed={','.join(map(str, seeds))}", "hydra.launcher.pack=true", *SLURM, *RUN, *asked,
                                       *data_overrides, f"hydra.sweep.dir={sweep}"), cwd=REPO, env=slurm_cluster.env,
                            stdout=(tmp_path / "out").open("w"), stderr=(tmp_path / "err").open("w"))
    runs = [sweep / f"seed={s}" for s in seeds]
    deadline = time.monotonic() + 200
    while not all(training(r) for r in runs[:2]):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-4000:]
        time.sleep(0.2)
    job_ids = {json.loads((r / "slurm_job.json").read_text())["job_id"] for r in runs}
    assert len(job_ids) == 1, job_ids
    job = job_ids.pop()
    if shape == "two-node":  # the first wave's points side by side, each on 2 nodes of its own, its master its first
        met = [json.loads((r / "environment" / "rendezvous.json").read_text()) for r in runs[:2]]
        assert [len(set(m["hosts"])) for m in met] == [2, 2] and not set(met[0]["hosts"]) & set(met[1]["hosts"]), met
        assert all(m["master"].split(":")[0] == m["hosts"][0] for m in met), met
    slurm_cluster.run("scancel", "--signal=USR2", job)
    # seed=1 unpacked, on this machine meanwhile (its data is prepared by now), with the packed point's 2 threads
    # (another count sums in another order)
    reference = None if shape != "one-node" else subprocess.Popen(
        launch_cmd("cluster=local", "seed=1", *RUN, *data_overrides, f"hydra.run.dir={alone}"), cwd=REPO,
        env={**slurm_cluster.env, "OMP_NUM_THREADS": "2"}, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "alone.err").open("w"))
    assert proc.wait(timeout=300) == 0, (tmp_path / "out").read_text()[-3000:] + (tmp_path / "err").read_text()[-6000:]
    out = (tmp_path / "out").read_text()
    assert f"hydra.launcher.pack: {len(seeds)} point(s) in 1 allocation(s)" in out and planned in out, out
    assert out.count("submitted job") == 1 and f"for {len(seeds)} packed point(s)" in out, out

    for run, first in zip(runs, ("preempted:SIGUSR2", "preempted:SIGUSR2", None)):
        ends = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
        assert [a["ended"] for a in ends] == [first, "finished"][not first:], ends  # the third started after
        assert {a["job_id"] for a in ends} == {job} and ends[-1]["restart"] == 1, ends
        assert len(losses(run)) == 30
    if reference is not None:
        assert reference.wait(timeout=200) == 0, (tmp_path / "alone.err").read_text()[-4000:]
        assert losses(runs[0]) == losses(alone)


# a point with one GPU (of the local cluster's 4 per node, device files) and one CPU, training on CPU
GPU_POINT = ["cluster.gpus_per_node=1", "cluster.tasks_per_node=1", "cluster.cpus_per_task=1", "train.device=cpu"]
LONGER = [o for o in RUN if not o.startswith("train.max_steps")] + ["train.max_steps=60"]  # time to be preempted


def gpus_seen(runs) -> list[str]:
    """The GPU each point's rank drives (CUDA_VISIBLE_DEVICES as Slurm set it for its step), in its newest attempt."""
    return [e["gpu_plan"]["visible"] for run in runs for e in environments(run)]


def no_job_left(cluster) -> None:
    """No job left on this worker's cluster before its daemons change plugins (a test before, or a failed one, may
    still be ending its job): the daemons are restarted under the new settings."""
    cluster.run("scancel", "--me")
    wait_until(lambda: not cluster.run("squeue", "--me", "-h").stdout.strip(), 90, "no job running")


@pytest.fixture
def proctrack_cgroup(slurm_cluster):
    """The cluster under proctrack/cgroup (a freezer cgroup a step), which kills a step's every process when the step
    ends, where the cluster's own proctrack/linuxproc, which every other packed scenario runs under, follows parent
    ids: the stricter of the two plugins sites use."""
    no_job_left(slurm_cluster)
    slurm_cluster.script("proctrack", "cgroup")
    yield
    no_job_left(slurm_cluster)
    slurm_cluster.script("proctrack", "linuxproc")


@pytest.mark.timeout(300)
def test_one_gpu_points_packed_on_a_four_gpu_node_each_drive_their_own_gpu_through_a_preemption(
        slurm_cluster, proctrack_cgroup, tmp_path, data_overrides):
    """Under proctrack/cgroup: 4 one-GPU points of `low` in one allocation of one 4-GPU node, as 4 steps at once, each with a GPU of its own.
    A job of `urgent` that needs every node preempts the allocation while they train: each point saves in the grace
    time, the allocation is requeued once, and each point resumes on a GPU of its own to its end; seed=1 with the
    losses of its unpacked run."""
    sweep, alone, seeds = tmp_path / "sweep", tmp_path / "alone", (1, 2, 3, 4)
    proc = subprocess.Popen(launch_cmd("-m", "seed=1,2,3,4", "hydra.launcher.pack=true", "cluster.partition=low", *GPU_POINT,
                                       *SLURM, *LONGER, *data_overrides, f"hydra.sweep.dir={sweep}"), cwd=REPO,
                            env=slurm_cluster.env, stdout=(tmp_path / "out").open("w"),
                            stderr=(tmp_path / "err").open("w"))
    runs = [sweep / f"seed={s}" for s in seeds]
    wait_until(lambda: proc.poll() is None and all(training(r) for r in runs), 200, "4 points training")
    assert sorted(gpus_seen(runs)) == ["0", "1", "2", "3"]
    urgent_job(slurm_cluster, tmp_path)
    reference = subprocess.Popen(launch_cmd("cluster=local", "seed=1", *LONGER, *data_overrides,
                                            f"hydra.run.dir={alone}"), cwd=REPO,
                                 env={**slurm_cluster.env, "OMP_NUM_THREADS": "1"},  # the packed point's 1 CPU
                                 stdout=subprocess.DEVNULL, stderr=(tmp_path / "alone.err").open("w"))
    assert proc.wait(timeout=240) == 0, (tmp_path / "out").read_text()[-3000:] + (tmp_path / "err").read_text()[-6000:]
    out = (tmp_path / "out").read_text()
    assert "launcher.pack: 4 point(s) in 1 allocation(s)" in out, out
    assert "1 node x 4 CPU(s), 4 GPU(s): 4 at once, 1 wave(s)" in out and out.count("submitted job") == 1, out
    job = json.loads((runs[0] / "slurm_job.json").read_text())["job_id"]
    for run in runs:
        first, last = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
        assert first["ended"].startswith("preempted by job ") and first["requeued"], first
        assert (last["ended"], last["restart"], {first["job_id"], last["job_id"]}) == ("finished", 1, {job}), last
        assert len(losses(run)) == 60
    assert sorted(gpus_seen(runs)) == ["0", "1", "2", "3"]  # the requeued attempt's steps too
    assert reference.wait(timeout=200) == 0, (tmp_path / "alone.err").read_text()[-4000:]
    assert losses(runs[0]) == losses(alone)


@pytest.mark.timeout(300)
def test_a_higher_tier_job_that_comes_while_the_points_start_requeues_the_allocation_once(
        slurm_cluster, tmp_path, data_overrides):
    """Both points' steps are killed by Slurm's SIGTERM in a site's task prolog (`srun --task-prolog`, here sleeping
    so that the urgent job comes there every time), before their ranks start: neither recorded the attempt. The
    packer (in the batch step, which the preemption does not signal) finds each step failed in a preemption with no
    attempt recorded, starts nothing more, and requeues the allocation once, as a job of its own would be
    (launch.backends.slurm.start_preempted); the requeued allocation runs each point to its end."""
    prolog = tmp_path / "task_prolog.sh"
    prolog.write_text(f"#!/bin/bash\ntouch {tmp_path}/prolog.${{SLURM_RESTART_COUNT:-0}}.${{SLURM_STEP_ID:-$SLURM_STEPID}}"
                      f"\n{FIRST_WAITS}")
    prolog.chmod(0o755)
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(launch_cmd("-m", "seed=1,2", "hydra.launcher.pack=true", "cluster.cpus_per_task=2",
                                       "cluster.partition=low", f"cluster.srun_args=['--task-prolog={prolog}']",
                                       *SLURM, *RUN, *data_overrides, f"hydra.sweep.dir={sweep}"),
                            cwd=REPO, env=slurm_cluster.env,
                            stdout=(tmp_path / "out").open("w"), stderr=(tmp_path / "err").open("w"))
    deadline = time.monotonic() + 120
    # both points' steps in their prolog: a step that comes there after the urgent job gets no SIGTERM and sleeps
    # through the grace time, and Slurm, not the packer, requeues the allocation
    while not all((tmp_path / f"prolog.0.{step}").exists() for step in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-4000:]
        time.sleep(0.05)
    urgent_job(slurm_cluster, tmp_path)
    assert proc.wait(timeout=240) == 0, (tmp_path / "out").read_text()[-3000:] + (tmp_path / "err").read_text()[-6000:]
    runs = [sweep / f"seed={s}" for s in (1, 2)]
    record = json.loads((runs[0] / "slurm_job.json").read_text())
    assert slurm_cluster.job_info(record["job_id"])["Restarts"] == "1"
    for run in runs:
        ends = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
        assert [(a["ended"], a["restart"]) for a in ends] == [("finished", 1)], ends  # the first attempt ran no point
        assert len(losses(run)) == 30
    err = open(record["stderr"]).read()
    assert "packed job: preempted by job " in err and "; requeued job" in err, err[-3000:]
    assert "task_prolog did not exit normally" in err, err[-3000:]


@pytest.mark.timeout(300)
def test_launch_cancel_of_a_packed_sweep_cancels_every_point_after_it_saved_and_requeues_nothing(
        slurm_cluster, tmp_path, data_overrides):
    """launch.cancel on a packed sweep whose job runs 2 points at once, a third waiting: one decision for the whole
    allocation (launch.recovery.packed). Each running point saves and records the user's cancel (not a preemption),
    the packer requeues nothing and starts no other point, and the job ends with no restart."""
    sweep = tmp_path / "sweep"
    slow = [o for o in RUN if not o.startswith("train.max_steps")] + ["train.max_steps=600"]  # a minute: time to act
    proc = run_launch(slurm_cluster.env, "-m", "seed=1,2,3", "hydra.launcher.pack=true", "hydra.launcher.detach=true",
                      "cluster.cpus_per_task=2", *SLURM, *slow, *data_overrides, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    runs = [sweep / f"seed={s}" for s in SEEDS]
    wait_until(lambda: all(len(losses(r)) >= 10 if training(r) else False for r in runs[:2]), 200, "2 points training")
    job = json.loads((runs[0] / "slurm_job.json").read_text())["job_id"]
    cancel = subprocess.run([sys.executable, "-m", "launch.cancel", str(sweep)], cwd=REPO, env=slurm_cluster.env,
                            capture_output=True, text=True, timeout=200)
    assert cancel.returncode == 0 and "sent the preemption signal" in cancel.stdout, cancel.stdout + cancel.stderr
    assert slurm_cluster.wait_state(job) in ("CANCELLED", "COMPLETED")
    assert slurm_cluster.job_info(job)["Restarts"] == "0"
    for run in runs[:2]:
        [attempt] = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
        assert attempt["ended"] == "cancelled by the user" and not attempt["requeued"], attempt
        assert 10 <= attempt["last_step"] < 600 and (run / "checkpoints").is_dir(), attempt
    assert not (runs[2] / "attempts.jsonl").exists() and not training(runs[2])  # never started


STEADY = [o for o in RUN if not o.startswith("train.max_steps")] + ["train.max_steps=100"]  # 10 s: its steps are seen


@pytest.fixture
def memory_consumable(slurm_cluster):
    """The cluster with memory a consumable resource (CR_Core_Memory, as most sites count it) for one test."""
    no_job_left(slurm_cluster)
    slurm_cluster.script("memory", "consumable")
    yield
    no_job_left(slurm_cluster)
    slurm_cluster.script("memory", "cap")


@pytest.mark.timeout(300)
def test_points_that_set_no_memory_each_get_their_share_where_memory_is_consumable(
        slurm_cluster, memory_consumable, tmp_path, data_overrides):
    """2 points of 2 CPUs that set no cluster.mem, in one allocation of 4 CPUs that asked for no memory: Slurm gives
    it the node's 8000 MB, and each point's step asks for its half (a step without --mem would be given all 8000 MB
    as its limit). Both train at once and finish."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(launch_cmd("-m", "seed=1,2", "hydra.launcher.pack=true", "cluster.cpus_per_task=2", *SLURM,
                                       *STEADY, *data_overrides, f"hydra.sweep.dir={sweep}"), cwd=REPO,
                            env=slurm_cluster.env, stdout=(tmp_path / "out").open("w"),
                            stderr=(tmp_path / "err").open("w"))
    runs = [sweep / f"seed={s}" for s in (1, 2)]
    wait_until(lambda: proc.poll() is None and all(training(r) for r in runs), 200, "2 points training at once")
    job = json.loads((runs[0] / "slurm_job.json").read_text())["job_id"]
    steps = slurm_cluster.run("scontrol", "-o", "show", "step", job).stdout
    mems = re.findall(rf"StepId={job}\.\d+ .*?TRES=\S*?mem=(\w+)", steps)
    assert mems == ["4000M", "4000M"], steps  # the steps' own (a step without --mem: the allocation's 8000M)
    assert "mem=8000M" in slurm_cluster.job_info(job)["TRES"]  # the node's RealMemory, as nothing asked for less
    assert proc.wait(timeout=200) == 0, (tmp_path / "out").read_text()[-3000:] + (tmp_path / "err").read_text()[-6000:]
    assert "2 at once, 1 wave(s)" in (tmp_path / "out").read_text()
    for run in runs:
        assert len(losses(run)) == 100
