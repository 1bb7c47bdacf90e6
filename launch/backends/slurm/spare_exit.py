"""The batch script's side of cluster.spare_nodes: srun's end, and its exit code.

srun waits for every task, a lost node's too. A node set down or dead is over at once: Slurm tells srun. A node that
lives but cannot be reached (a cut link) is not: srun waits until Slurm declares it down (SlurmdTimeout, 300 s by
default), and the job holds every node meanwhile, its run finished on a spare. `Linger` says when srun has outlived
the run; the batch script's watcher (cluster=slurm) and srun's launcher (cluster=srun) then end srun.

srun then exits non-zero, as it does when a lost node's tasks were killed with it. The script would pass that on,
and Slurm would call the job FAILED (an `afterok` dependency would then never start). Its teardown asks this module
instead: exit 0 when this job finished its run on spares, 1 otherwise (the script then keeps srun's code).

    python -m launch.backends.slurm.spare_exit SUBMITIT_FOLDER              # in the batch script, after srun
    python -m launch.backends.slurm.spare_exit SUBMITIT_FOLDER --watch PID  # beside srun, PID: the batch shell
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from launch.rank.job_env import job_environment
from launch.recovery.rounds import finished_on_spares

LINGER_S = 30.0  # the run's last tasks end within seconds of its last line; past this srun waits for a lost node
LOOK_S = 5.0  # a look at the attempts log, on the shared file system


class Linger:
    """Whether srun has outlived the run: job `job_id` finished it on spares LINGER_S ago, and srun still runs."""

    def __init__(self, run_dir: Path, job_id: str | None):
        self.run_dir, self.job_id = run_dir, job_id
        self.finished: float | None = None
        self.looked = float("-inf")

    def over(self) -> bool:
        now = time.monotonic()
        if self.finished is None and self.job_id and now - self.looked >= LOOK_S:
            self.looked = now
            if finished_on_spares(self.run_dir, self.job_id):
                self.finished = now
        return self.finished is not None and now - self.finished >= LINGER_S


def run_dir_of(folder: Path, job_id: str) -> Path:
    """The run folder of the task submitit submitted as `job_id` (launch.backends.slurm.task.RankTask)."""
    from submitit.core.utils import DelayedSubmission, JobPaths

    return Path(DelayedSubmission.load(JobPaths(folder, job_id).submitted_pickle).function.run_dir)


def watch(folder: Path, shell_pid: int) -> None:
    """Beside srun in the batch script (cluster=slurm): end srun once it outlived the run; return with the shell."""
    import psutil

    job_id = job_environment().job_id
    linger, shell = Linger(run_dir_of(folder, job_id), job_id), psutil.Process(shell_pid)
    while shell.is_running():
        if linger.over():
            for child in shell.children():
                with contextlib.suppress(psutil.Error):
                    if child.name() == "srun":
                        print(f"the run finished on spares {LINGER_S:.0f} s ago and srun still waits for the tasks "
                              "of a node the run no longer uses (Slurm cannot reach it): ending srun",
                              file=sys.stderr, flush=True)
                        child.kill()
            return
        time.sleep(1.0)


def main() -> None:
    folder = Path(sys.argv[1])
    if sys.argv[2:3] == ["--watch"]:
        watch(folder, int(sys.argv[3]))
        return
    job_id = job_environment().job_id
    sys.exit(0 if job_id and finished_on_spares(run_dir_of(folder, job_id), job_id) else 1)


if __name__ == "__main__":
    main()
