"""The job a run's ranks run in, as its job environment sees it, recorded in the run folder (RUN_DIR/job.json) on
every path that starts one: a submitted job, `sbatch slurm/multi_node.sh`, a stock Hydra launcher's task, srun
inside `salloc`. launch.status, list and cancel ask the scheduler about it beside the jobs a submission recorded.

And the other way: the jobs launch.cancel is stopping (RUN_DIR/cancel.json), so that their ranks, saving at its
signal, stop as cancelled by the user instead of requeueing the job as a preemption would."""
from __future__ import annotations

import json
import time
from pathlib import Path

from gpt.resilience.lease import fence
from gpt.run_folder import CANCELLED, RunFolder, write_json
from launch.rank.job_env import JobEnvironment


def record_job(run_dir: Path, job: JobEnvironment) -> None:
    """This process's job, when it runs in one (cluster=local runs in none)."""
    if job.job_id is None:
        return
    fence()
    path = RunFolder(run_dir).job
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"job_id": job.job_id, "scheduler": job.scheduler, "time": time.time()})


def recorded_job(run_dir: Path) -> tuple[str | None, float]:
    """The job recorded from inside, and when (None, 0.0 when none is)."""
    try:
        record = json.loads(RunFolder(run_dir).job.read_text())
        return str(record["job_id"]), float(record.get("time", 0.0))
    except (OSError, ValueError, KeyError, TypeError):
        return None, 0.0




def request_cancel(run_dir: Path, job_ids: list[str]) -> None:
    """Before launch.cancel signals those jobs."""
    write_json(RunFolder(run_dir).cancel_request, {"job_ids": job_ids, "time": time.time()})


def withdraw_cancel(run_dir: Path, job_id: str) -> None:
    """Take back the request for that job (launch.cancel could not signal it)."""
    if cancel_requested(run_dir, job_id):
        RunFolder(run_dir).cancel_request.unlink(missing_ok=True)


def cancel_requested(run_dir: Path, job_id: str | None) -> bool:
    """Whether launch.cancel is stopping that job (a job id names one job for good: a cancelled job is not run
    again, so an old request never stops a later job)."""
    try:
        return job_id is not None and job_id in json.loads(RunFolder(run_dir).cancel_request.read_text())["job_ids"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cancelled_by_user(run_dir: Path, job_id: str | None = None) -> bool:
    """Whether the run's newest attempt (of that job, when named) ended cancelled by the user, by its line."""
    try:
        lines = [a for a in RunFolder(run_dir).attempts.read() if job_id is None or a.job_id == job_id]
    except OSError:
        return False
    return bool(lines) and lines[-1].ended == CANCELLED
