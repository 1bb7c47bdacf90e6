"""In-job restarts on the real local Slurm cluster (launch.recovery.rounds): a killed rank restarts the ranks inside the
allocation instead of requeueing. The job never leaves RUNNING (Slurm counts no restart), the attempts log names the
round, and the run finishes exactly as an uninterrupted one (bitwise losses and final weights)."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.recovery_latency import first_step_after
from gpt.resilience.timing import ROUND_SILENT_S
from launch.backends.slurm.commands import FINAL
from launch.run.identity import newest_step
from launch.backends.slurm.spare_exit import LINGER_S
from slurm_helpers import REPO, SLURM, cut_link, losses
from test_preemption import RUN as REQUEUE_RUN
from test_preemption import STEPS, Job, assert_same_run, attempts
from test_slurm_preemption import urgent_job

pytestmark = pytest.mark.slurm

RUN = [o for o in REQUEUE_RUN if not o.startswith("preemption.in_job_restarts")]  # the default: in-job restarts


@pytest.fixture
def reference(reference_run, data_overrides) -> Path:
    return reference_run(*RUN, *data_overrides)


def states_until_done(job: Job, timeout: float = 240) -> set[tuple[str, str]]:
    """Every (state, restart count) Slurm showed for the job until it ended."""
    seen, deadline = set(), time.monotonic() + timeout
    while job.alive() and time.monotonic() < deadline:
        info = job.cluster.job_info(job.id())
        if info:
            seen.add((info.get("JobState", "?"), info.get("Restarts", "0")))
        time.sleep(0.2)
    return seen


@pytest.mark.timeout(300)
# sbatch slurm/multi_node.sh here; the launcher's path is the spare test's below (one path each keeps CI in bounds)
@pytest.mark.parametrize("path", ["sbatch"])
def test_a_killed_rank_restarts_inside_the_allocation_and_finishes_exactly(slurm_cluster, tmp_path, data_overrides,
                                                                          reference, path):
    """cluster=slurm through the launcher (submitit), and sbatch slurm/multi_node.sh (cluster=srun)."""
    sbatch = path == "sbatch"
    # the standby rank, as GPU ranks have it (CPU ranks do not: preemption.standby_rank=auto)
    overrides = [*RUN, *data_overrides, "preemption.standby_rank=true"]
    overrides = overrides if sbatch else ["nodes=2", *SLURM, *overrides]
    job = Job(slurm_cluster, tmp_path, overrides, tmp_path / "run", sbatch=sbatch)
    job.training(0)
    job.kill_rank(1)
    killed = time.time()
    back = first_step_after(job.run_dir, killed)
    seen = states_until_done(job)
    assert job.wait() == 0, job.text()
    print(f"in-job restart: {back - killed:.1f} s from the kill of rank 1 to the next round's first step")
    assert {state for state, _ in seen} <= {"RUNNING", "COMPLETING", "COMPLETED"}, seen
    assert {restarts for _, restarts in seen} == {"0"}, seen  # Slurm never requeued it
    log = attempts(job.run_dir)
    assert [(a.get("round", 0), a.get("in_job_restart"), a.get("requeued")) for a in log] == [
        (0, 1, False), (1, None, None)], log
    assert log[0]["lost_rank"] == 1 and "killed by SIGKILL" in log[0]["ended"], log[0]
    assert log[0]["note"].startswith("restarting inside the allocation (in-job restart 1 of at most 3"), log[0]
    assert log[1]["ended"] == "finished" and log[1]["restart"] == 0, log[1]
    # the next round's rank was the standby, its imports done: against a fresh interpreter's on this machine now
    # (a fixed bound failed on a loaded machine: 0.61 s)
    fresh = time.monotonic()
    subprocess.run([sys.executable, "-c", "import launch.rank.worker, gpt.train.trainer"], check=True, cwd=REPO)
    fresh = time.monotonic() - fresh
    assert log[1]["startup"]["imports_s"] < fresh / 3, (log[1], fresh)
    if not sbatch:  # the login-node launcher says so in one line
        assert "attempt 0 ended (" in job.text() and ": restarting inside the allocation (in-job restart 1" in \
            job.text(), job.text()
    assert_same_run(job.run_dir, reference)


@pytest.mark.timeout(300)
# the launcher here; sbatch slurm/multi_node.sh is the killed rank's path above
@pytest.mark.parametrize("path", ["launcher"])
def test_a_node_set_down_is_replaced_by_the_spare_and_the_run_finishes_exactly(slurm_cluster, tmp_path,
                                                                              data_overrides, reference, path):
    """2 nodes and 1 spare (3 allocated): rank 1's node is set down; the spare takes its place in the next round.
    Through the launcher (cluster=slurm), and with
    `sbatch --nodes=3 --no-kill slurm/multi_node.sh cluster.spare_nodes=1`."""
    overrides = ["cluster.spare_nodes=1", *RUN, *data_overrides]
    job = Job(slurm_cluster, tmp_path, overrides if path == "sbatch" else ["nodes=2", *SLURM, *overrides],
              tmp_path / "run", sbatch=path == "sbatch", sbatch_flags=("--nodes=3", "--no-kill"))
    node = None
    try:
        job.training(0)
        hosts = slurm_cluster.hostnames(slurm_cluster.job_info(job.id())["NodeList"])
        assert len(hosts) == 3, hosts
        node = json.loads((job.run_dir / "environment" / "rank1.json").read_text())["host"]
        slurm_cluster.run("scontrol", "update", f"nodename={node}", "state=down", "reason=set down by a test")
        down = time.time()
        back = first_step_after(job.run_dir, down)
        seen = states_until_done(job)
        code = job.wait()
    finally:
        if node:
            slurm_cluster.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
    assert code == 0, job.text()
    # srun counts the lost node's killed tasks; the batch script's teardown (launch.backends.slurm.spare_exit) does not
    assert slurm_cluster.job_info(job.id())["JobState"] == "COMPLETED", slurm_cluster.job_info(job.id())
    print(f"spare: {back - down:.1f} s from the node set down to the next round's first step")
    assert {restarts for _, restarts in seen} == {"0"}, seen  # never requeued
    assert "PENDING" not in {state for state, _ in seen}, seen
    log = attempts(job.run_dir)
    spare = hosts[2]
    assert [(a.get("in_job_restart"), a.get("replaced")) for a in log] == [(1, {node: spare}), (None, None)], log
    # Slurm's word (rank 0 asks once its collective failed), not the watchdog's wait for a silent heartbeat
    assert log[0]["ended"].startswith(f"node failure: {node} down"), log[0]
    assert (log[0]["nodes"], log[1]["nodes"]) == ([hosts[0], node], [hosts[0], spare]), log
    assert json.loads((job.run_dir / "environment" / "rank1.json").read_text())["host"] == spare
    assert_same_run(job.run_dir, reference)


def round_asked(run_dir: Path, k: int, timeout: float = 60) -> None:
    """The next round (an in-job restart) has been asked for: its request is in the run folder."""
    deadline = time.monotonic() + timeout
    while not list((run_dir / "rounds").glob(f"*/round-{k}.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((run_dir / "rounds").glob(f"*/round-{k}.json")), f"round {k} was never asked for"


@pytest.mark.timeout(300)
# a real preemption (Slurm's signal to the steps, then its kill); a signal alone is the other preemption tests'
@pytest.mark.parametrize("preemption", ["urgent job"])
def test_a_preemption_during_an_in_job_restart_still_saves_and_requeues(slurm_cluster, tmp_path, data_overrides,
                                                                       reference, preemption):
    """A rank is killed, and while the wrappers stop round 0 and start round 1 the job is preempted: by the signal
    alone (scancel --signal USR2, as a time-limit warning comes), or by Slurm itself, a job of the urgent partition
    taking the nodes of the run's job in `low`. The new round saves, the job is requeued once, and it finishes. How
    far the new round gets inside the urgent job's grace time depends on the machine's load: it saves and says it
    was preempted, or Slurm kills it first (still starting) and requeues the job, and the next attempt records it."""
    partition = ["cluster.partition=low"] if preemption == "urgent job" else []
    job = Job(slurm_cluster, tmp_path, ["nodes=2", *SLURM, *RUN, *data_overrides, *partition], tmp_path / "run")
    job.training(0)
    job.kill_rank(1)
    round_asked(job.run_dir, 1)
    if preemption == "urgent job":
        urgent_job(slurm_cluster, tmp_path)
    else:
        job.interrupt("USR2")
    assert job.wait() == 0, job.text()
    log = attempts(job.run_dir)
    assert [(a["restart"], a.get("round", 0), a.get("in_job_restart")) for a in log] == [
        (0, 0, 1), (0, 1, None), (1, 0, None)], log
    preempted = log[1]
    if preemption == "signal":
        assert preempted["ended"] == "preempted:SIGUSR2" and preempted["requeued"], log
    elif preempted.get("recorded_by") == "the next attempt":  # killed while it started, before it could save
        assert preempted["ended"].startswith("requeued by Slurm: preempted by "), log
        assert "(accounting: PREEMPTED)" in preempted["ended"], log
    else:  # once the grace time is over Slurm requeues the job itself, and the rank can no longer tell by whom
        assert preempted["requeued"] and preempted["ended"].startswith(("preempted by ",
                                                                        "preempted:SIGTERM")), log
    assert log[2]["ended"] == "finished", log
    assert slurm_cluster.job_info(job.id())["Restarts"] == "1"
    assert_same_run(job.run_dir, reference)


@pytest.mark.timeout(300)
def test_a_hang_on_every_attempt_restarts_once_in_the_job_then_fails_clearly(slurm_cluster, tmp_path,
                                                                             data_overrides):
    """No second recovery without a newer checkpoint: one in-job restart, then the job fails naming the hang."""
    job = Job(slurm_cluster, tmp_path, ["nodes=2", *SLURM, *RUN, *data_overrides, "debug.hang_rank=1",
                                        "debug.hang_step=12", "debug.hang_every_attempt=true", "watchdog.step_s=5"],
              tmp_path / "run")
    assert job.wait() == 1, job.text()
    log = attempts(job.run_dir)
    assert [(a.get("round", 0), a["ended"], a.get("in_job_restart"), a.get("requeued")) for a in log] == [
        (0, "hang", 1, False), (1, "hang", None, False)], log
    assert log[1]["note"].startswith("not requeued: the attempt before hung too, and no checkpoint newer than step 10")
    assert "ended FAILED" in job.text() and "hanging at step 12" in job.text(), job.text()


@pytest.mark.timeout(600)  # 272 s on a CI machine twice as slow as this one
def test_a_cut_off_node_is_replaced_by_the_spare_within_the_watchdog_budget(slurm_cluster, tmp_path,
                                                                            data_overrides, reference):
    """Rank 1's node loses its network link, and it stays cut until the job has ended: the watchdog names it cut off
    within watchdog.step_s, and the spare takes its place in the next round, without a requeue. srun would wait for
    the cut node's task until Slurm declares the node down (SlurmdTimeout, 300 s): the batch script's watcher ends
    it once the run has finished (launch.backends.slurm.spare_exit), and the launcher says where the run finished."""
    step_s = 6
    job = Job(slurm_cluster, tmp_path, ["nodes=2", "cluster.spare_nodes=1", *SLURM, *RUN, *data_overrides,
                                        f"watchdog.step_s={step_s}"], tmp_path / "run")
    job.training(0)
    hosts = slurm_cluster.hostnames(slurm_cluster.job_info(job.id())["NodeList"])
    node = json.loads((job.run_dir / "environment" / "rank1.json").read_text())["host"]
    with cut_link(slurm_cluster, node) as cut:
        back = first_step_after(job.run_dir, cut)
        seen = states_until_done(job)
        code, ended = job.wait(), time.time()
    assert code == 0, job.text()
    finished = attempts(job.run_dir)[-1]["time"]
    print(f"cut link: {back - cut:.1f} s from the cut to the next round's first step on the spare "
          f"(watchdog.step_s={step_s}); the launcher ended {ended - finished:.1f} s after the run finished")
    assert ended - finished < LINGER_S + 30, (ended - finished, job.text())
    assert f"COMPLETED on {hosts[0]}, {hosts[2]}, train loss" in job.text(), job.text()
    assert back - cut < step_s + 30 + 30, back - cut  # the watchdog's budget and margin, then the restart
    assert slurm_cluster.wait_state(job.id(), {"COMPLETED"}) == "COMPLETED", slurm_cluster.job_info(job.id())
    assert {restarts for _, restarts in seen} == {"0"}, seen
    log = attempts(job.run_dir)
    assert [(a["ended"], a.get("in_job_restart"), a.get("replaced")) for a in log] == [
        ("hang", 1, {node: hosts[2]}), ("finished", None, None)], log
    assert f"rank 1 on {node} cannot reach the master over the network (cut off)" in log[0]["hang"], log[0]
    assert_same_run(job.run_dir, reference)


@pytest.mark.timeout(600)
def test_a_spare_whose_round_ends_without_a_word_ends_its_task_not_the_allocations_time(slurm_cluster, tmp_path,
                                                                                       data_overrides):
    """2 nodes and 1 spare: every process of the job on the two nodes that train (task wrappers and ranks) is killed
    at once, so nobody writes the attempt's line or asks for a next round. Under srun's --no-kill and
    --kill-on-bad-exit=0 only the spare's own deadline ends its task: the job ends within the round's silence
    threshold (round_agent.RoundLife, from the last beat of rank 0's lease), far inside its time limit, and the
    spare's task says why."""
    pg_timeout = 30.0
    job = Job(slurm_cluster, tmp_path, ["nodes=2", "cluster.spare_nodes=1", *SLURM, *RUN, *data_overrides,
                                        f"watchdog.collective_timeout_s={pg_timeout}"], tmp_path / "run")
    job.training(0)
    hosts = slurm_cluster.hostnames(slurm_cluster.job_info(job.id())["NodeList"])
    training = [json.loads((job.run_dir / "environment" / f"rank{r}.json").read_text())["host"] for r in (0, 1)]
    spare = next(h for h in hosts if h not in training)
    killed = kill_every_python_of(job.id(), training)
    assert killed >= 4, killed  # a task wrapper and a rank on each node
    gone = time.time()
    code = job.wait(timeout=pg_timeout + ROUND_SILENT_S + 120)
    ended = time.time() - gone
    print(f"spare deadline: the job ended {ended:.0f} s after its training nodes went silent "
          f"(threshold {pg_timeout + ROUND_SILENT_S:.0f} s)")
    assert code != 0 and ended < pg_timeout + ROUND_SILENT_S + 60, (ended, job.text())
    assert slurm_cluster.job_state(job.id()) in FINAL, slurm_cluster.job_info(job.id())
    assert f"{spare} waited as a spare in round 0 of job {job.id()}" in job.text(), job.text()
    assert "this task ends rather than hold its node to the time limit" in job.text(), job.text()


def kill_every_python_of(job_id: str, hosts: list[str]) -> int:
    """SIGKILL, at once, every Python process of Slurm job `job_id` on `hosts` (this machine runs every node's)."""
    procs = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        env, cmd = proc.info["environ"] or {}, proc.info["cmdline"] or []
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURMD_NODENAME") in hosts and "python" in " ".join(cmd[:1]):
            procs.append(proc)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(procs)


@pytest.mark.timeout(300)
def test_a_node_set_down_with_no_spare_left_goes_on_with_the_node_left_and_the_same_global_batch(
        slurm_cluster, tmp_path, data_overrides, reference):
    """2 nodes, no spare, preemption.shrink=auto: rank 1's node is set down; the next round runs 1 rank on the node
    left, accumulating 2 micro-batches where each of 2 ranks took one: the global batch, and so the schedule, are the
    same, and the losses equal the uninterrupted 2-rank run's up to the checkpoint it resumed from (bitwise) and
    after it to rounding (a sum over micro-steps instead of over ranks)."""
    job = Job(slurm_cluster, tmp_path, ["nodes=2", *SLURM, *RUN, *data_overrides, "preemption.shrink=auto"],
              tmp_path / "run")
    node = None
    try:
        job.training(0)
        deadline = time.monotonic() + 60
        while (newest_step(job.run_dir) or 0) < 5:  # a resume from a checkpoint, not from the start
            assert time.monotonic() < deadline and job.alive(), job.text()
            time.sleep(0.1)
        hosts = slurm_cluster.hostnames(slurm_cluster.job_info(job.id())["NodeList"])
        node = json.loads((job.run_dir / "environment" / "rank1.json").read_text())["host"]
        slurm_cluster.run("scontrol", "update", f"nodename={node}", "state=down", "reason=set down by a test")
        seen = states_until_done(job)
        code = job.wait()
    finally:
        if node:
            slurm_cluster.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
    assert code == 0, job.text()
    assert slurm_cluster.job_info(job.id())["JobState"] == "COMPLETED", slurm_cluster.job_info(job.id())
    assert {restarts for _, restarts in seen} == {"0"}, seen  # never requeued
    log = attempts(job.run_dir)
    assert [(a.get("in_job_restart"), a.get("shrunk")) for a in log] == [(1, {"from": 2, "to": 1}), (None, None)], log
    assert "accumulation 1 -> 2 at micro-batch 6, the same global batch 12" in log[0]["note"], log[0]
    assert log[1]["nodes"] == [hosts[0]] and log[1]["ended"] == "finished", log
    # from the newest checkpoint (every 5 steps), at or before the last step round 0 trained as its node went
    assert 5 <= log[1]["first_step"] <= log[0]["last_step"] and log[1]["first_step"] % 5 == 0, log
    assert "the same global batch 12" in job.text(), job.text()  # the launcher's one line
    resumed, got, want = log[1]["first_step"], losses(job.run_dir), losses(reference)
    assert len(got) == len(want) == STEPS and got[:resumed] == want[:resumed]
    assert got[resumed:] == pytest.approx(want[resumed:], rel=1e-4)
    print(f"shrunk at step {resumed}: {sum(a == b for a, b in zip(got, want))} of {STEPS} losses bitwise equal")
