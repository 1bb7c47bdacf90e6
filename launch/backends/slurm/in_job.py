"""Inside a job that hydra-submitit-launcher submitted (`-m hydra/launcher=submitit_slurm`): every task of the
job runs the Hydra app, and each one becomes one rank, through the same task wrapper and per-rank entry point as
cluster=slurm. The job's shape is the allocation's (hydra.launcher.nodes, tasks_per_node); a site profile's cluster keys
became hydra.launcher.* keys at submission (launch.backends.slurm.stock_profile).

Preemption works as under our launcher: the wrapper passes Slurm's signals on to the rank instead of letting
submitit requeue without a checkpoint; the ranks save, rank 0 requeues, and submitit reruns the same call,
which resumes from the run folder.
"""
from __future__ import annotations

import os
import time

from gpt.errors import UserError
from gpt.resilience.timing import REQUEUE_WAIT_S
from launch.run.attempts import requeued
from launch.backends import Backend, RunFailed
from launch.rank.job_env import JobEnvironment, job_environment

STOCK_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


class InJobBackend(Backend):
    name = "submitit_slurm"

    @classmethod
    def detect(cls, hydra_cfg) -> bool:
        """True in a task of a job the stock plugin submitted (never on the login node: it runs no task there)."""
        return hydra_cfg.launcher["_target_"] == STOCK_LAUNCHER and "SLURM_JOB_ID" in os.environ

    def check(self, run):
        from launch.backends.slurm.job import first_int

        env = os.environ
        nodes = first_int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1
        tasks = first_int(env, "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE") or 1
        if run.cluster.name not in ("local", "slurm"):  # slurm: a site profile's, made hydra.launcher.* keys at
            # submission (launch.backends.slurm.stock_profile)
            raise UserError(f"hydra/launcher=submitit_slurm submits the jobs itself: leave cluster=local (not "
                            f"cluster={run.cluster.name}), and set the job's shape with hydra.launcher.nodes "
                            "and hydra.launcher.tasks_per_node")
        return run.with_cluster(nodes=nodes, tasks_per_node=tasks), None

    def run(self, plan) -> JobEnvironment:
        from launch.backends.slurm.task import RankFailed, RankTask

        try:
            RankTask(str(plan.run_dir))()
        except RankFailed as e:
            raise RunFailed(str(e)) from None
        job = job_environment()  # the task ran its ranks in this process's job (its round set by the wrapper)
        if requeued(plan.run_dir, job):
            # Returning now would let submitit record this attempt's result, and the stock launcher would take the
            # job for done while Slurm runs it again: wait for Slurm to stop this attempt instead.
            time.sleep(REQUEUE_WAIT_S)
            raise RunFailed(f"the job requeued itself but was not stopped within {REQUEUE_WAIT_S:.0f} s")
        return job

