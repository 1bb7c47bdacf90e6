"""A job Slurm accepted for a point (`Submitted`): what the waiter, the packer and a detached launch read of it,
and the record its run folder keeps (slurm_job.json), written the same way for a job of its own and a packed one.
Submitting is launch.backends.slurm.submit."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gpt.run_folder import RunFolder, write_json
from launch.backends import Point

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Submitted:
    point: Point
    job_id: str
    folder: Path
    links: tuple[str, ...] = ()  # a chain's jobs, oldest first (cluster.chain); job_id is the last one
    packed: bool = False  # a step of a packed allocation (hydra.launcher.pack), whose one task reports every point

    @property
    def job_ids(self) -> tuple[str, ...]:
        return self.links or (self.job_id,)

    def paths(self, task: int = 0):
        from submitit.core.utils import JobPaths

        return JobPaths(self.folder, job_id=self.job_id, task_id=task)

    @property
    def num_tasks(self) -> int:
        """The tasks srun starts, each with its result file: a spare node's too (it may be the one that says why
        the job ended)."""
        r = self.point.resources
        return 1 if self.packed else r.allocated_nodes * r.tasks_per_node

    def record(self, res) -> None:
        """The run folder's slurm_job.json: the job (a chain's links, packed or not), its logs, and what it asked
        for (`res`: the point's, or its packed allocation's)."""
        paths = self.paths(0)
        chained = {"chain": list(self.links)} if self.links else {}
        packed = {"packed": True} if self.packed else {}
        write_json(RunFolder(self.point.run_dir).slurm_job, {
            "job_id": self.job_id, **chained, **packed, "stdout": str(paths.stdout), "stderr": str(paths.stderr),
            "submission": str(paths.submission_file), "resources": res.describe(),
            "inherited": inherited_rank_variables(dict(res.step.env))}, indent=1)


def inherited_rank_variables(site_env: dict[str, str]) -> dict[str, str]:
    """torchrun-style variables of this (submitting) shell: sbatch passes them into the job, where Slurm's own
    must decide instead (launch.backends.slurm.task drops them). Not those the site sets (cluster.env: a
    MASTER_ADDR or MASTER_PORT the site needs)."""
    return {k: os.environ[k] for k in RANK_VARIABLES if k in os.environ and k not in site_env}


def show_path(path: Path) -> str:
    """A path as the user typed it: relative to where they are when that is shorter."""
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else str(path)
    except ValueError:
        return str(path)
