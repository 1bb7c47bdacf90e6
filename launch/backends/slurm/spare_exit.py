"""The batch script's last word under cluster.spare_nodes (cluster=slurm): srun exits non-zero once a lost node's
tasks were killed with it, even when a spare took its place and the run finished. The script would pass that on, and
Slurm would call the job FAILED (an `afterok` dependency would then never start). Its teardown asks this module
instead: exit 0 when this job finished its run on spares, 1 otherwise (the script then keeps srun's code).

    python -m launch.backends.slurm.spare_exit SUBMITIT_FOLDER      # in the batch script, after srun
"""
from __future__ import annotations

import sys
from pathlib import Path

from launch.rank.job_env import job_environment
from launch.run.rounds import finished_on_spares


def run_dir_of(folder: Path, job_id: str) -> Path:
    """The run folder of the task submitit submitted as `job_id` (launch.backends.slurm.task.RankTask)."""
    from submitit.core.utils import DelayedSubmission, JobPaths

    return Path(DelayedSubmission.load(JobPaths(folder, job_id).submitted_pickle).function.run_dir)


def main() -> None:
    job_id = job_environment().job_id
    sys.exit(0 if job_id and finished_on_spares(run_dir_of(Path(sys.argv[1]), job_id), job_id) else 1)


if __name__ == "__main__":
    main()
