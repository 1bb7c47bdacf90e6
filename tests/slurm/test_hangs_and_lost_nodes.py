"""Hangs on the real local Slurm cluster (2 nodes): the watchdog reports the hang within its budget plus a margin,
naming the rank, its host and the collective; the job requeues itself and finishes exactly as an uninterrupted
run (bitwise losses and final weights)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from control_counters import SlurmCalls
from slurm_helpers import REPO, SLURM, TINY, cut_link, output, run_launch
from test_preemption import assert_same_run, attempts
from test_run_lifecycle import trained

pytestmark = pytest.mark.slurm

STEPS = 80
STEP_S = 6
RUN = [o for o in TINY if not o.startswith(("train.max_steps", "checkpoint.interval_steps"))] + [
    f"train.max_steps={STEPS}", "checkpoint.interval_steps=20", "debug.delay_rank=0", "debug.delay_s=0.05",
    "preemption.in_job_restarts=0"]  # the requeue; tests/slurm/test_in_job_restart.py restarts inside the job


@pytest.fixture
def reference(reference_run, data_overrides) -> Path:
    return reference_run(*RUN, *data_overrides)


@pytest.mark.timeout(420)
def test_hang_at_step_50_is_reported_requeued_and_finishes_exactly(slurm_cluster, tmp_path, data_overrides,
                                                                   reference):
    run_dir = tmp_path / "run"
    calls = SlurmCalls(tmp_path / "shims", path=slurm_cluster.env["PATH"])  # who asks Slurm to requeue
    proc = run_launch(calls.env(slurm_cluster.env), *SLURM, "nodes=2", *RUN, *data_overrides, "debug.hang_rank=1",
                      "debug.hang_step=50", f"watchdog.step_s={STEP_S}", f"hydra.run.dir={run_dir}", timeout=400)
    assert proc.returncode == 0, output(proc)
    acting = {(c.host, c.pid) for c in calls.calls() if c.argv.startswith(("scontrol requeue", "scontrol update"))}
    assert len(acting) == 1, calls.calls()  # one process of the job talks to the scheduler, not every rank
    report = json.loads(first_report(run_dir, attempts(run_dir)[0]["job_id"]).read_text())
    hung = report["ranks"][1]
    detected_after = report["time"] - (hung["time"] - hung["idle_s"])
    print(f"hang at step 50 reported {detected_after:.1f} s after rank 1 stopped (watchdog.step_s={STEP_S})")
    assert STEP_S <= detected_after < STEP_S + 30, detected_after
    host0, host1 = report["ranks"][0]["host"], hung["host"]
    assert host0 != host1
    line = report["summary"]
    # the flight recorder's dumps are the evidence: rank 1 never entered the all_reduce rank 0 waits in
    assert line.startswith(f"watchdog: flight recorder: rank 1 on {host1} never entered gloo:all_reduce #"), line
    assert f"rank 0 on {host0} waits in it; rank 1 on {host1} was in debug.hang_rank: hanging at step 50" in line
    assert line in proc.stderr, output(proc)  # the launcher's one line
    log = attempts(run_dir)
    assert [(a["ended"], a.get("requeued")) for a in log] == [("hang", True), ("finished", None)], log
    assert log[0]["restart"] == 0 and log[1]["restart"] == 1  # Slurm counted the requeue as a restart
    assert log[1]["first_step"] == 40  # the newest checkpoint before the hang
    assert_same_run(run_dir, reference)


@pytest.mark.timeout(420)
def test_hang_before_the_first_step_names_the_missing_rank_and_requeues(slurm_cluster, tmp_path, data_overrides,
                                                                        reference):
    startup_s = 45  # a job's ranks import torch and join in about 10 s here, 3-4x that on a loaded machine
    run_dir = tmp_path / "run"
    proc = run_launch(slurm_cluster.env, *SLURM, "nodes=2", *RUN, *data_overrides, "debug.hang_rank=1",
                      f"watchdog.startup_s={startup_s}", f"hydra.run.dir={run_dir}", timeout=400)
    assert proc.returncode == 0, output(proc)
    report = json.loads(first_report(run_dir, attempts(run_dir)[0]["job_id"]).read_text())
    waiting = report["ranks"][0]
    detected_after = report["time"] - (waiting["time"] - waiting["idle_s"])  # since rank 0's last mark
    print(f"hang before the first step reported {detected_after:.1f} s after rank 0's last progress on Slurm, "
          f"{report['time'] - (waiting['time'] - waiting['up_s']):.1f} s after it started (watchdog.startup_s="
          f"{startup_s}, a budget for each phase of start-up)")
    assert startup_s <= detected_after < startup_s + 30, detected_after
    assert report["budget"] == "watchdog.startup_s" and report["never_arrived"] == [1], report["summary"]
    assert f"rank 1 on {report['ranks'][1]['host']} never arrived" in report["summary"]
    assert report["summary"] in proc.stderr, output(proc)
    log = attempts(run_dir)
    assert [(a["ended"], a.get("requeued")) for a in log] == [("hang", True), ("finished", None)], log
    assert_same_run(run_dir, reference)


def first_report(run_dir: Path, job: str) -> Path:
    """The hang report of the job's first attempt: named by the attempt's own id (its job and restart, then the
    launch that ran it: sbatch's script starts one)."""
    found = sorted(run_dir.glob(f"hang-job{job}-restart0-launch*.json"))
    assert len(found) <= 1, found
    return found[0] if found else run_dir / f"hang-job{job}-restart0.json"


def read_report(run_dir: Path, job: str, timeout: float) -> dict:
    """The hang report of the job's first attempt, once its writer has finished it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(first_report(run_dir, job).read_text())
        time.sleep(0.2)
    raise AssertionError(f"no hang report within {timeout} s")


def submit_exclusive(cluster, tmp_path: Path, run_dir: Path, overrides: list[str]) -> str:
    """sbatch slurm/multi_node.sh on 2 nodes that no other job shares (a cut link must not touch other jobs)."""
    proc = subprocess.run(["sbatch", "--parsable", "--exclusive", "--nodes=2", "--time=10",
                           f"--output={tmp_path / 'job.out'}", str(REPO / "slurm" / "multi_node.sh"), *overrides,
                           f"hydra.run.dir={run_dir}"], cwd=REPO, env=cluster.env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def node_of_rank(run_dir: Path, rank: int) -> str:
    return json.loads((run_dir / "environment" / f"rank{rank}.json").read_text())["host"]


@pytest.mark.timeout(480)
def test_cut_link_stops_the_run_within_the_watchdog_budget_and_it_resumes(slurm_cluster, tmp_path, data_overrides,
                                                                         reference):
    run_dir = tmp_path / "run"
    job = submit_exclusive(slurm_cluster, tmp_path, run_dir, [*RUN, *data_overrides, f"watchdog.step_s={STEP_S}",
                                                              "debug.delay_s=0.15"])
    try:
        trained(run_dir, 25)
        node = node_of_rank(run_dir, 1)
        with cut_link(slurm_cluster, node) as cut:
            report = read_report(run_dir, job, STEP_S + 60)
        state = slurm_cluster.wait_state(job, timeout=300)
    finally:
        slurm_cluster.run("scancel", job, check=False)
    assert state == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    print(f"cut link reported {report['time'] - cut:.1f} s after the cut (watchdog.step_s={STEP_S})")
    assert report["time"] - cut < STEP_S + 30, report["time"] - cut
    line = report["summary"]
    assert (report["cut"], report["surviving"]) == ([1], [0]), line
    assert f"rank 1 on {node} cannot reach the master over the network (cut off)" in line
    text = first_report(run_dir, job).with_suffix(".txt")
    assert line.endswith(f"surviving: rank 0 on {report['ranks'][0]['host']}; report: {text}")
    assert line in (tmp_path / "job.out").read_text()  # the one line, in the job's output
    assert [(a["ended"], a.get("requeued")) for a in attempts(run_dir)] == [("hang", True), ("finished", None)]
    assert_same_run(run_dir, reference)
    wait_idle(slurm_cluster, node)


def kill_node(cluster, node: str, job: str) -> None:
    """Play a lost host: SIGKILL its slurmd and every process of this job on it (slurmstepd, the ranks), by pid.
    The job has its nodes to itself (--exclusive): nothing else runs there."""
    run = cluster.conf.parent / "run"
    pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True,
                                           check=True).stdout.split()]
    mine = [p for p in pids if of_job(p, job)]
    assert mine, f"no process of job {job} on {node}"
    for pid in [int((run / f"slurmd-{node}.pid").read_text()), *mine]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def of_job(pid: int, job: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return cmdline.startswith(f"slurmstepd: [{job}.") or f"SLURM_JOB_ID={job}".encode() in environ


@pytest.mark.timeout(480)
def test_lost_node_stops_the_run_within_the_watchdog_budget_and_it_resumes(slurm_cluster, tmp_path, data_overrides,
                                                                          reference):
    """One node's slurmd and ranks are killed: Slurm would notice only after SlurmdTimeout; the surviving rank
    names the lost one and requeues the job."""
    run_dir = tmp_path / "run"
    job = submit_exclusive(slurm_cluster, tmp_path, run_dir, [*RUN, *data_overrides, f"watchdog.step_s={STEP_S}",
                                                              "debug.delay_s=0.15"])
    node = None
    try:
        trained(run_dir, 25)
        node = node_of_rank(run_dir, 1)
        kill_node(slurm_cluster, node, job)
        killed = time.time()
        try:
            report = read_report(run_dir, job, STEP_S + 60)
        finally:
            slurm_cluster.script("start-node", node, timeout=60)
        state = slurm_cluster.wait_state(job, timeout=300)
    finally:
        slurm_cluster.run("scancel", job, check=False)
        if node:
            slurm_cluster.script("start-node", node, check=False, timeout=60)
    assert state == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    print(f"lost node reported {report['time'] - killed:.1f} s after the kill (watchdog.step_s={STEP_S})")
    assert report["time"] - killed < STEP_S + 30, report["time"] - killed
    line = report["summary"]
    assert (report["lost"], report["surviving"]) == ([1], [0]), line
    assert f"rank 1 on {node} is gone (no heartbeat for " in line
    text = first_report(run_dir, job).with_suffix(".txt")
    assert line.endswith(f"surviving: rank 0 on {report['ranks'][0]['host']}; report: {text}")
    lost = f"node failure: {node} gone (no heartbeat from any of its ranks)"  # a lost node, not a hang
    assert [(a["ended"], a.get("requeued")) for a in attempts(run_dir)] == [(lost, True), ("finished", None)]
    assert_same_run(run_dir, reference)
    wait_idle(slurm_cluster, node)


def wait_idle(cluster, node: str, timeout: float = 120) -> None:
    """The node is back in service (idle, or running someone else's job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = " ".join(set(cluster.run("sinfo", "-h", "-n", node, "-o", "%T").stdout.split()))  # a row per partition
        if state in ("idle", "mixed", "allocated"):
            return
        time.sleep(1)
    raise AssertionError(f"{node} is {state}, not back in service after {timeout} s")
