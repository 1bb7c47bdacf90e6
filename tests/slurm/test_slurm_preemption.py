"""Preemption by Slurm itself: a job of the `urgent` partition (a higher PriorityTier) takes every node of a training
job in `low` (PreemptMode=REQUEUE, GraceTime) on the local cluster (slurm/local_cluster.sh); or, with the cluster
preempting by QOS, a job of QOS `urgent` takes those of a job of QOS `low`. Slurm signals the ranks, they save inside
the grace time, and the run resumes from that checkpoint, said to be preempted by another job."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_helpers import REPO, SLURM
from test_preemption import RUN, Job, assert_same_run, attempts

pytestmark = pytest.mark.slurm


def urgent_job(slurm_cluster, tmp_path, urgency: str = "--partition=urgent") -> str:
    """A 2 s job of the `urgent` partition (or QOS: --qos=urgent) that needs every node: Slurm preempts whatever runs
    in `low`."""
    return slurm_cluster.sbatch("#!/bin/bash\nsleep 2\n", urgency, "--nodes=4", "--exclusive", "--time=5",
                                "--output=/dev/null", f"--chdir={tmp_path}")


def grace_time(slurm_cluster) -> str:
    """The `low` partition's GraceTime, in seconds, as scontrol shows it."""
    return slurm_cluster.run("scontrol", "-o", "show", "partition", "low").stdout.split("GraceTime=")[1].split()[0]


@pytest.mark.timeout(300)
def test_a_higher_tier_job_preempts_the_run_which_saves_in_its_grace_time_and_resumes_once(
        slurm_cluster, tmp_path, data_overrides, reference_run):
    reference = reference_run(*RUN, *data_overrides)
    job = Job(slurm_cluster, tmp_path, ["nodes=2", *SLURM, *RUN, *data_overrides, "cluster.partition=low"],
              tmp_path / "run")
    job.training(0)
    urgent = urgent_job(slurm_cluster, tmp_path)
    signalled = time.time()
    assert job.wait() == 0, job.text()
    assert_same_run(job.run_dir, reference)

    first, last = attempts(job.run_dir)  # one requeue: Slurm's preemption and the job's own are one
    assert first["ended"].startswith(f"preempted by job {urgent} (partition urgent, user root) at "), first
    assert "the run's partition low: PreemptMode=REQUEUE" in first["ended"] and first["requeued"] is True, first
    assert last["ended"] == "finished" and last["restart"] == 1, last
    saved = first["goodput"]
    info = slurm_cluster.job_info(job.id())
    assert info["Restarts"] == "1", info
    grace = int(grace_time(slurm_cluster))
    stopped = first["time"] - signalled  # from the urgent job's submission to the attempt's line (saved, requeued)
    assert stopped < grace, (stopped, grace, saved)
    print(f"preempted: saved and requeued {stopped:.1f} s after the urgent job's submission (GraceTime={grace} s)")

    # sacct agrees: the urgent job ran, the run's job ended COMPLETED after one requeue
    def ended(rows: str) -> bool:
        return f"{urgent}|COMPLETED|0:0" in rows and f"{job.id()}|COMPLETED|0:0" in rows

    deadline = time.monotonic() + 60  # slurmdbd hears of a job's end a moment after the job has ended
    while not ended(rows := slurm_cluster.run("sacct", "-n", "-X", "-P", "-o", "JobID,State,ExitCode", "-j",
                                              f"{urgent},{job.id()}").stdout) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ended(rows), rows
    print(slurm_cluster.run("sacct", "-D", "-P", "-o", "JobID,JobName,Partition,State,ExitCode,Start,End", "-j",
                            f"{urgent},{job.id()}").stdout)
    # ... and in order: the run's first attempt ended before the urgent job started, its second began after it ended
    books = [r.split("|") for r in slurm_cluster.run("sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State,Start,End",
                                                      "-j", f"{urgent},{job.id()}").stdout.split()]
    [(_, _, urgent_start, urgent_end)] = [r for r in books if r[0] == urgent]
    runs = [r for r in books if r[0] == job.id()]
    assert len(runs) == 2 and runs[0][1] in ("PREEMPTED", "REQUEUED") and runs[1][1] == "COMPLETED", books
    assert runs[0][3] <= urgent_start and runs[1][2] >= urgent_end, books  # ISO times: ordered as strings
    said = job.text()
    assert "preempted by job " in said and "node failure" not in said, said
    status = subprocess.run([sys.executable, "-m", "launch.status", str(job.run_dir)], cwd=REPO,
                            env=slurm_cluster.env, capture_output=True, text=True, timeout=60)
    assert "1 restart(s) (last interrupted: preempted by job " in status.stdout, (
        status.stdout + status.stderr)
    log = (job.run_dir / "logs" / "rank0.log").read_text()  # the run's goodput line, as rank 0 ends it
    goodput = [line for line in log.splitlines() if "run finished: goodput" in line]
    assert goodput and "interruptions: preempted by job " in goodput[-1], log[-3000:]


@pytest.fixture
def qos_preemption(slurm_cluster):
    """The cluster preempts by QOS for one test (slurmctld restarted with PreemptType=preempt/qos), then by partition
    again."""
    slurm_cluster.script("preempt", "qos")
    try:
        yield
    finally:
        slurm_cluster.script("preempt", "partition_prio")


@pytest.mark.timeout(300)
def test_under_qos_preemption_a_job_of_the_urgent_qos_preempts_the_run_which_saves_and_resumes_once(
        slurm_cluster, qos_preemption, tmp_path, data_overrides, reference_run):
    """PreemptType=preempt/qos, the other way sites preempt: the run's job has QOS `low` (PreemptMode=requeue,
    GraceTime) in the default partition, whose own PreemptMode is OFF; a job of QOS `urgent` (Preempt=low) takes its
    nodes. The ranks save inside the QOS's grace time, Slurm requeues the job, and every line names the QOS."""
    reference = reference_run(*RUN, *data_overrides)
    job = Job(slurm_cluster, tmp_path, ["nodes=2", *SLURM, *RUN, *data_overrides, "cluster.qos=low"],
              tmp_path / "run")
    job.training(0)
    urgent = urgent_job(slurm_cluster, tmp_path, "--qos=urgent")
    assert job.wait() == 0, job.text()
    assert_same_run(job.run_dir, reference)
    first, last = attempts(job.run_dir)
    grace = slurm_cluster.run("sacctmgr", "-n", "-P", "show", "qos", "low", "format=GraceTime").stdout.strip()
    assert first["ended"].startswith(f"preempted by job {urgent} (partition debug, QOS urgent, user root) at "), first
    policy = f"the run's QOS low: PreemptMode=REQUEUE, GraceTime={int(grace.split(':')[-1])} s"
    assert policy in first["ended"], (first, grace)
    assert first["requeued"] is True and last["ended"] == "finished" and last["restart"] == 1, (first, last)
    assert slurm_cluster.job_info(job.id())["Restarts"] == "1"
    said = job.text()
    assert "preempted by job " in said and "node failure" not in said, said


# A task prolog that never lets the first attempt's tasks start: the urgent job's SIGTERM ends it, or the grace
# time's SIGKILL (a loaded machine once took a minute to submit and schedule that job, and a timed wait let the rank
# start); the requeued attempt's tasks go on at once.
FIRST_WAITS = '[ "${SLURM_RESTART_COUNT:-0}" = 0 ] && { sleep 600; exit 1; }\nexit 0\n'


@pytest.mark.timeout(300)
# cluster=slurm here; under sbatch a signal as the tasks start is test_run_lifecycle's (one path each)
@pytest.mark.parametrize("path", ["cluster=slurm"])
def test_a_higher_tier_job_that_comes_while_the_tasks_start_requeues_the_job_once_and_it_finishes(
        slurm_cluster, tmp_path, data_overrides, reference_run, path):
    """Slurm's SIGTERM reaches the tasks before they can ignore it, here in a site's task prolog (`srun
    --task-prolog`) that sleeps, so that the urgent job comes there every time (without one, the first milliseconds
    of every task: CI once saw it). The tasks die, srun fails, and no rank saw the preemption: the batch step (the
    script's teardown, or srun's launcher) records it and requeues the job (launch.backends.slurm.start_preempted).
    Nothing fails: the job is requeued once and the run ends with the uninterrupted run's losses."""
    reference = reference_run(*RUN, *data_overrides)
    prolog = tmp_path / "task_prolog.sh"
    prolog.write_text(f"#!/bin/bash\ntouch {tmp_path}/prolog.${{SLURM_RESTART_COUNT:-0}}.$SLURM_PROCID\n{FIRST_WAITS}")
    prolog.chmod(0o755)
    run = [*RUN, *data_overrides, f"cluster.srun_args=['--task-prolog={prolog}']"]
    if path == "cluster=slurm":
        job = Job(slurm_cluster, tmp_path, ["nodes=2", *SLURM, *run, "cluster.partition=low"], tmp_path / "run")
    else:
        job = Job(slurm_cluster, tmp_path, run, tmp_path / "run", sbatch=True,
                  sbatch_flags=("--nodes=2", "--partition=low"))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"prolog.0.{task}").exists() for task in (0, 1)):
        assert time.monotonic() < deadline and job.alive(), job.text()
        time.sleep(0.05)
    urgent_job(slurm_cluster, tmp_path)
    assert job.wait() == 0, job.text()
    assert_same_run(job.run_dir, reference)
    assert slurm_cluster.job_info(job.id())["Restarts"] == "1"
    first, last = attempts(job.run_dir)
    assert first["ended"].startswith("preempted by job ") and first["requeued"] is True, first
    assert last["ended"] == "finished" and last["restart"] == 1, last
    said = job.text() if job.proc else job.log.read_text()
    assert "preempted by job " in said and "node failure" not in said, said
    assert " failed" not in said.replace("--task-prolog failed", ""), said
    err = job.log.read_text() if job.proc is None else (job.run_dir / "slurm" / f"{job.id()}_0_log.err").read_text()
    assert "while the tasks started, before any rank could save; requeued job" in err, err[-3000:]


@pytest.mark.timeout(300)
def test_a_higher_tier_job_preempts_a_multi_node_sh_job_which_saves_and_resumes_once(
        slurm_cluster, tmp_path, data_overrides, reference_run):
    """The same preemption of a job submitted as `sbatch --partition=low slurm/multi_node.sh ...` (nothing waits for
    it): Slurm's SIGTERM reaches the ranks through the batch script's srun, they save inside the grace time, the job
    requeues once, says it was preempted by another job, and ends with the uninterrupted run's losses."""
    reference = reference_run(*RUN, *data_overrides)
    job = Job(slurm_cluster, tmp_path, [*RUN, *data_overrides], tmp_path / "run", sbatch=True,
              sbatch_flags=("--nodes=2", "--partition=low"))
    job.training(0)
    urgent = urgent_job(slurm_cluster, tmp_path)
    assert job.wait() == 0, job.log.read_text()[-5000:]
    assert_same_run(job.run_dir, reference)
    first, last = attempts(job.run_dir)
    assert first["ended"].startswith("preempted by job "), first
    assert "the run's partition low: PreemptMode=REQUEUE" in first["ended"] and first["requeued"] is True, first
    assert last["ended"] == "finished" and last["restart"] == 1, last
    assert slurm_cluster.job_info(job.id())["Restarts"] == "1"
    text = job.log.read_text()
    assert "preempted by job " in text and "node failure" not in text, text[-5000:]
    # rank 0's own line, the one such a job's output has, says by whom (not only "after SIGTERM")
    stopped = f"after SIGTERM, checkpoint saved: preempted by job {urgent} (partition urgent, user root) at "
    assert stopped in text, text[-5000:]


@pytest.mark.timeout(300)
# by partition; preemption by QOS is test_under_qos_preemption_...'s
@pytest.mark.parametrize("by", ["partition"])
def test_a_cancel_preemption_saves_and_ends_and_the_same_command_continues_the_run(
        slurm_cluster, tmp_path, data_overrides, reference_run, request, by):
    """PreemptMode=CANCEL (partition lowcancel, or QOS lowcancel under preempt/qos): the ranks save inside the grace
    time, the job is not requeued (the site's policy), every line says so, and submitting the same command again
    finishes the run as if uninterrupted."""
    reference = reference_run(*RUN, *data_overrides)
    if by == "QOS":
        request.getfixturevalue("qos_preemption")
    args = ["nodes=2", *SLURM, *RUN, *data_overrides, f"cluster.{by.lower()}=lowcancel"]
    job = Job(slurm_cluster, tmp_path, args, tmp_path / "run", name="first")
    job.training(0)
    urgent_job(slurm_cluster, tmp_path, f"--{by.lower()}=urgent")
    code = job.wait()
    said = job.text()
    (first,) = attempts(job.run_dir)
    assert first["ended"].startswith("preempted by job "), first
    assert f"the run's {by} lowcancel: PreemptMode=CANCEL" in first["ended"] and first["requeued"] is False, first
    assert f"not requeued: Slurm's preemption cancels job {job.id()}" in first["note"], first
    assert "the same command continues the run from its newest checkpoint" in first["note"], first
    assert code != 0 and "preempted by job " in said and "cancels job" in said, (code, said)
    assert slurm_cluster.job_info(job.id()).get("Restarts", "0") == "0"

    again = Job(slurm_cluster, tmp_path, args, tmp_path / "run", name="again")
    assert again.wait() == 0, again.text()
    assert_same_run(job.run_dir, reference)
    assert [a["ended"] for a in attempts(job.run_dir)][1:] == ["finished"]


def saving(job: Job, step: int) -> Path:
    """Wait until rank 0 is inside the save of `step` (debug.save_sleep_s holds it there); its log."""
    log = job.run_dir / "logs" / "rank0.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and f"inside the save of step {step}" in log.read_text()):
        assert time.monotonic() < deadline and job.alive(), job.text()
        time.sleep(0.1)
    return log


@pytest.mark.timeout(300)
def test_a_preemption_during_a_save_the_grace_time_covers_ends_after_it_and_resumes_from_it(
        slurm_cluster, tmp_path, data_overrides):
    """The urgent job comes while the save of step 10 runs (4 s, debug.save_sleep_s) and the grace time (20 s)
    covers it: the rank finishes that save, stops at its next step boundary with a save there (step 11 here), and
    the requeued attempt resumes from that one."""
    run = [o for o in RUN if not o.startswith(("train.max_steps", "checkpoint.interval_steps"))]
    job = Job(slurm_cluster, tmp_path, ["nodes=1", *SLURM, *run, *data_overrides, "cluster.partition=low",
                                        "train.max_steps=14", "checkpoint.interval_steps=5", "debug.save_sleep_s=4",
                                        "debug.save_sleep_step=10"], tmp_path / "run")
    log = saving(job, 10)
    urgent_job(slurm_cluster, tmp_path)
    assert job.wait() == 0, job.text()
    first, last = attempts(job.run_dir)
    assert first["ended"].startswith("preempted by job ") and first["requeued"] is True, first
    assert first["last_step"] > 10, first  # the stop's own save came after the one in progress
    assert last["first_step"] == first["last_step"] and last["ended"] == "finished", (first, last)
    assert log.read_text().count("inside the save of step 10") == 1, log.read_text()  # finished once, not redone


@pytest.mark.timeout(300)
def test_a_grace_time_too_short_for_the_save_keeps_the_previous_checkpoint_and_says_so(
        slurm_cluster, tmp_path, data_overrides):
    """GraceTime=2 s against a save of step 10 that takes 25 s (debug.save_sleep_s, before its commit): the urgent
    job comes while that save runs, and Slurm kills the ranks in the middle of it. The cut save is never taken for a
    checkpoint: the requeued attempt resumes from step 5's and finishes, and the attempts log says so."""
    original = grace_time(slurm_cluster)
    slurm_cluster.run("scontrol", "update", "PartitionName=low", "GraceTime=2")
    try:
        run = [o for o in RUN if not o.startswith(("train.max_steps", "checkpoint.interval_steps"))]
        job = Job(slurm_cluster, tmp_path, ["nodes=1", *SLURM, *run, *data_overrides, "cluster.partition=low",
                                            "train.max_steps=12", "checkpoint.interval_steps=5",
                                            "debug.save_sleep_s=25", "debug.save_sleep_step=10"], tmp_path / "run")
        log = saving(job, 10)
        urgent = urgent_job(slurm_cluster, tmp_path)
        code = job.wait()
    finally:
        slurm_cluster.run("scontrol", "update", "PartitionName=low", f"GraceTime={original}")
    assert code == 0, job.text()
    # planning saw it coming: the save (its 25 s sleep, at the default rate before any save) against the grace time
    launcher = Path(job.out.name).read_text() + Path(job.err.name).read_text()
    assert ("about 38 s with the step under way, longer than the 2 s a preemption leaves (partition low: "
            "PreemptMode=REQUEUE, GraceTime=2 s)") in launcher, launcher[:3000]
    first, last = attempts(job.run_dir)
    assert first["recorded_by"] == "the next attempt" and first["last_step"] == 5, first  # the cut save left nothing
    # accounting names the job that started on its nodes after it
    assert first["ended"].startswith(f"requeued by Slurm: preempted by job {urgent} (partition urgent, user root) at "), first
    assert ("(accounting: PREEMPTED); the run's partition low: PreemptMode=REQUEUE, GraceTime=2 s; killed when its "
            "grace time ran out" in first["ended"]), first
    assert last["first_step"] == 5 and last["ended"] == "finished", last  # resumed from step 5's checkpoint
    said = log.read_text()
    assert said.count("inside the save of step 10") == 2 and "resumed from " in said, said  # the save cut, then redone
