"""slurmctld restarts (an upgrade, a crash, a configuration change) while a run trains and after it ended: the run
does not notice, and the launcher's waiting, `launch.list` and `launch.status` say what accounting says."""
from __future__ import annotations

import pytest

from test_detached import verb
from test_preemption import RUN, Job, assert_same_run, attempts
from slurm_helpers import SLURM

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
