"""What the controller forgets and accounting keeps. slurmctld restarts (an upgrade, a crash, a configuration
change) while a run trains and after it ended: the run does not notice, and the launcher's waiting, `launch.list`
and `launch.status` say what accounting says. Jobs older than MinJobAge, which slurmctld no longer knows: the verbs
and the same command again say what accounting says."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from test_detached import verb
from test_preemption import RUN, Job, assert_same_run, attempts
from slurm_helpers import SLURM, TINY, launch_cmd

pytestmark = pytest.mark.slurm


def restart_controller(slurm_cluster) -> None:
    """slurmctld stopped and started again from its saved state, with the PreemptType it has."""
    slurm_cluster.script("preempt", "partition_prio")


def accounted(slurm_cluster, job_id: str) -> str:
    return slurm_cluster.run("sacct", "-n", "-X", "-P", "-o", "State,ExitCode", "-j", job_id).stdout.strip()


@pytest.mark.timeout(300)
def test_a_controller_restart_during_a_run_and_after_it_leaves_the_run_and_every_answer_as_accounting_has_them(
        slurm_cluster, tmp_path, data_overrides, reference_run):
    reference = reference_run(*RUN, *data_overrides)
    job = Job(slurm_cluster, tmp_path, ["nodes=2", *SLURM, *RUN, *data_overrides], tmp_path / "run")
    job.training(0)
    restart_controller(slurm_cluster)
    assert job.wait() == 0, job.text()
    assert_same_run(job.run_dir, reference)
    (only,) = attempts(job.run_dir)  # no requeue, no lost node: the restart is not an interruption
    assert only["ended"] == "finished", only
    job_id = job.id()
    answers = []
    for _ in range(2):  # as the job ended, and once more after another restart (its record from the saved state)
        assert accounted(slurm_cluster, job_id) == "COMPLETED|0:0"
        assert slurm_cluster.job_info(job_id)["JobState"] == "COMPLETED"
        listed = verb(slurm_cluster.env, "list", str(tmp_path))
        status = verb(slurm_cluster.env, "status", str(job.run_dir))
        answers.append((listed.stdout, status.stdout))
        assert f"job {job_id} COMPLETED" in listed.stdout and "finished" in listed.stdout, listed
        restart_controller(slurm_cluster)
    assert answers[0] == answers[1], answers


@pytest.mark.timeout(300)
def test_jobs_older_than_min_job_age_are_told_from_accounting_by_the_verbs_and_the_same_command(
        slurm_cluster, tmp_path, data_overrides):
    """MinJobAge=2 (Slurm's default is 300 s, this cluster's 3600): a finished run's job and a failed one's leave
    squeue and scontrol within seconds of ending."""
    runs = {"finished": ["nodes=1"], "failed": ["nodes=2", "debug.kill_rank=1", "debug.kill_step=3",
                                                "preemption.max_restarts=0", "preemption.in_job_restarts=0"]}
    commands = {name: launch_cmd(*SLURM, *TINY, *data_overrides, *extra, "hydra.launcher.detach=true",
                                 f"hydra.run.dir={tmp_path / name}") for name, extra in runs.items()}
    slurm_cluster.script("min-job-age", "2")
    try:
        for command in commands.values():
            assert subprocess.run(command, env=slurm_cluster.env, capture_output=True, timeout=120).returncode == 0
        jobs = {name: json.loads((tmp_path / name / "slurm_job.json").read_text())["job_id"] for name in runs}
        deadline = time.monotonic() + 150
        while any(slurm_cluster.job_info(job) for job in jobs.values()):  # ended, then forgotten by slurmctld
            assert time.monotonic() < deadline, {job: slurm_cluster.job_state(job) for job in jobs.values()}
            time.sleep(1)
    finally:
        slurm_cluster.script("min-job-age", "3600")
    assert accounted(slurm_cluster, jobs["finished"]) == "COMPLETED|0:0"
    assert accounted(slurm_cluster, jobs["failed"]).startswith("FAILED|"), accounted(slurm_cluster, jobs["failed"])
    listed = verb(slurm_cluster.env, "list", str(tmp_path)).stdout
    for name, job in jobs.items():
        state = accounted(slurm_cluster, job).split("|")[0]
        status = verb(slurm_cluster.env, "status", str(tmp_path / name))
        assert f"job {job} {state}" in status.stdout and f"job {job} {state}" in listed, (status.stdout, listed)
    again = subprocess.run(commands["finished"], env=slurm_cluster.env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "finished at step 6; nothing to do" in again.stdout + again.stderr, again
    assert json.loads((tmp_path / "finished" / "slurm_job.json").read_text())["job_id"] == jobs["finished"]
