"""cluster=slurm: every sweep point is a Slurm job with its own resources, submitted from this machine (a login
node) through submitit, after every check that can be made against the cluster (sinfo) and the budget."""
from __future__ import annotations

from launch.backends import Backend
from launch.backends.slurm import partitions, submit
from launch.backends.slurm.job import SlurmJob
from launch.backends.slurm.resources import SlurmResources


class SlurmBackend(Backend):
    name = "slurm"
    submits = True

    def check(self, cfg):
        partitions.require_slurm()
        resources = SlurmResources.from_config(cfg)
        part = partitions.check_against_cluster(resources, partitions.read_partitions())
        resources = partitions.resolve_cpus(resources, part)
        if cfg.cluster.cpus_per_task != resources.cpus_per_task:  # the run's config records what was asked for
            cfg = cfg.copy()
            cfg.cluster.cpus_per_task = resources.cpus_per_task
        return cfg, resources

    def job_running(self, job_id: str) -> bool | None:
        return SlurmJob({}).job_running(job_id)

    def submit(self, points, folder, budget) -> list:
        submit.budget_gate(points, budget)
        return submit.submit(points, folder)

    def wait(self, submitted, poll_s: float = 1.0, progress: bool = True) -> list:
        return submit.wait(submitted, poll_s, progress, on_done=submit.print_outcome)
