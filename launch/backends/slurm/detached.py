"""What a detached launch (hydra.launcher.detach=true) leaves behind once Slurm accepted its jobs: the commands that
follow them, and for a sweep the dependency job that builds its report when every job has ended (afterany), so
that nothing has to stay up on the login node. Torch-free."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from gpt.run_folder import write_json
from launch.backends.slurm import commands
from launch.backends.slurm.submitted import show_path
from launch.run_status import REPORT_JOB
from launch.snapshot import Snapshot

REPORT_TIME_MIN = 10


def submit_report_job(sweep_dir: Path, job_ids: list[str], resources, snapshot: Snapshot | None) -> str:
    """`python -m launch.report SWEEP_DIR` as a one-task job after every job of the sweep, on the sweep's partition
    and account; it runs the sweep's code snapshot when there is one."""
    env = " ".join(snapshot.setup_lines()) + "; " if snapshot else ""
    command = f"{env}cd {shlex.quote(os.getcwd())} && {shlex.quote(sys.executable)} -m launch.report " \
              f"{shlex.quote(str(sweep_dir))}"
    flags = [f"--dependency=afterany:{':'.join(job_ids)}", f"--job-name={sweep_dir.name}-report", "--nodes=1",
             "--ntasks=1", f"--time={REPORT_TIME_MIN}", f"--output={sweep_dir / 'slurm' / 'report-%j.out'}"]
    for flag in ("partition", "account", "qos"):
        value = getattr(resources, flag, None)
        if value:
            flags.append(f"--{flag}={value}")
    job_id = commands.run("sbatch", "--parsable", *flags, "--wrap", command).strip().split(";")[0]
    write_json(sweep_dir / REPORT_JOB, {"job_id": job_id, "after": job_ids})
    return job_id


def print_follow_up(target: Path, job_ids: list[str], report_job: str | None = None, out=sys.stdout) -> None:
    where = shlex.quote(show_path(target))
    report = f"; report job {report_job} builds {show_path(target / 'report')} when they have ended" if report_job \
        else ""
    print(f"detached: job(s) {' '.join(job_ids)} accepted{report}. Follow them with:\n"
          f"  python -m launch.status {where}\n"
          f"  python -m launch.logs RUN_DIR [--rank R] -f\n"
          f"  python -m launch.cancel {where} [--now]", file=out, flush=True)
