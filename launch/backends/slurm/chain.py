"""cluster.chain=N: a run longer than a partition's time limit as N jobs, one after another. Every link has the same
job name and `--dependency=singleton` (Megatron's habit), so Slurm starts a link only once the one before has
ended; each continues the run from the checkpoint the one before saved at its time-limit warning.

A link with a later link still queued must end after that save instead of requeueing itself: a requeued link
would run again ahead of the next one, for as many restarts as it may take. Only the last link requeues itself.
The run's slurm_job.json lists the links (`chain`, oldest first); `job_id` is the last one, the one a waiting
launcher reports. Torch-free.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gpt.run_folder import RunFolder
from launch.backends.slurm import commands
from launch.backends.slurm.commands import PENDING, SlurmUnavailable


def job_name(name: str, run_dir: Path) -> str:
    """The links' one job name: the run's name and its folder's, so that singleton never orders two runs."""
    return f"{name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"


def submit_links(executor, task, links: int) -> list:
    """`links` jobs of the same task (the executor asks for --dependency=singleton); none if Slurm refuses one."""
    jobs: list = []
    try:
        for _ in range(links):
            jobs.append(executor.submit(task))
    except BaseException:
        commands.cancel([job.job_id for job in jobs])
        raise
    return jobs


def next_link(run_dir: Path, job_id: str | None) -> str | None:
    """The chain's next link after job_id that Slurm still holds pending (it continues the run once this job ends),
    or None: this is no chain, the last link, or the later links were cancelled. When Slurm does not answer, the
    run folder's record is trusted."""
    try:
        links = json.loads(RunFolder(run_dir).slurm_job.read_text()).get("chain") or []
    except (OSError, ValueError):
        return None
    later = links[links.index(job_id) + 1:] if job_id in links else []
    if not later:
        return None
    try:
        infos = commands.job_infos(later)
    except SlurmUnavailable:
        return later[0]
    return next((j for j in later if j in infos and infos[j].state in PENDING), None)
