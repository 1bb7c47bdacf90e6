"""cluster=slurm: every sweep point is a Slurm job with its own resources, submitted from this machine (a login
node) through submitit, after every check that can be made against the cluster (sinfo) and the budget."""
from __future__ import annotations

from launch.backends import Backend
from launch.backends.slurm import partitions, submit, wait
from launch.backends.slurm.job import SlurmJob
from launch.backends.slurm.resources import SlurmResources


class SlurmBackend(Backend):
    name = "slurm"
    submits = True

    def check(self, run):
        partitions.require_slurm()
        resources = SlurmResources.from_run(run)
        part = partitions.check_against_cluster(resources, partitions.read_partitions())
        resources = partitions.resolve_cpus(resources, part)
        # the run's config records what was asked for (the ranks allow for the warning's lead)
        return run.with_cluster(cpus_per_task=resources.cpus_per_task,
                                signal_delay_s=resources.signal_delay_s), resources

    def job_state(self, job_id: str) -> str | None:
        return SlurmJob({}).job_state(job_id)

    def budget_gate(self, points, budget) -> None:
        submit.budget_gate(points, budget)

    def submit(self, points, folder) -> list:
        return submit.submit(points, folder)

    def wait(self, submitted, poll_s: float = 1.0, progress: bool = True) -> list:
        return wait.wait(submitted, poll_s, progress, on_done=wait.print_outcome)
