"""What a detached launch (hydra.launcher.detach=true) leaves behind once Slurm accepted its jobs: the commands that
follow them, and for a sweep the dependency job that builds its report when every job has ended (afterany), so
that nothing has to stay up on the login node. Torch-free."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from gpt.run_folder import write_json
from launch.backends.job_state import JobState
from launch.backends.slurm import commands, partitions
from launch.backends.slurm.submitted import show_path
from launch.run_status import REPORT_JOB, SEARCH_JOB, sweep_job
from launch.snapshot import Snapshot

REPORT_TIME_MIN = 10


def submit_report_job(sweep_dir: Path, job_ids: list[str], resources, snapshot: Snapshot | None) -> str:
    """`python -m launch.report SWEEP_DIR` as a one-task job after every job of the sweep, on the sweep's partition
    and account; it runs the sweep's code snapshot when there is one. One at a time (two would write one report): a
    live one that already waits for these jobs is kept (the same command again), one that waits for fewer is
    cancelled while it waits (the new one waits for them all)."""
    earlier = _live_report_job(sweep_dir)
    if earlier is not None:
        job_id, after, state = earlier
        if set(job_ids) <= set(after):
            return job_id
        if state is JobState.PENDING:
            commands.cancel([job_id])
    job_id = _job_after(job_ids, resources, snapshot, f"launch.report {shlex.quote(str(sweep_dir))}",
                        f"{sweep_dir.name}-report", REPORT_TIME_MIN, sweep_dir / "slurm" / "report-%j.out")
    write_json(sweep_dir / REPORT_JOB, {"job_id": job_id, "after": job_ids})
    return job_id


def _live_report_job(sweep_dir: Path) -> tuple[str, list[str], JobState] | None:
    """The sweep's report job while it waits or runs: its id, the jobs it waits for, its state."""
    try:
        record = json.loads((sweep_dir / REPORT_JOB).read_text())
        job_id, after = str(record["job_id"]), [str(j) for j in record["after"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    info = commands.job_infos([job_id]).get(job_id)
    state = commands.standing(info).state if info is not None else None
    return (job_id, after, state) if state is not None and state.live else None


def submit_search_job(sweep_dir: Path, job_ids: list[str], resources, snapshot: Snapshot | None, args: list[str],
                      batches: int) -> str:
    """`python -m launch ARGS` (a search that goes on from its study, hydra/sweeper=optuna) as a one-task job after
    the batch just submitted, long enough to wait for `batches` more, as the partition allows: it runs the rest of the
    search, and builds the report after each batch. One such job at a time: a live one is kept."""
    earlier = sweep_job(sweep_dir, SEARCH_JOB)
    if earlier and any(commands.standing(i).state.live for i in commands.job_infos([earlier]).values()):
        return earlier
    limit = next((p.max_time_min for p in partitions.read_partitions().values()
                  if p.name == resources.partition or (resources.partition is None and p.default)), None)
    time_min = min(x for x in (resources.time_min * resources.chain * batches + REPORT_TIME_MIN, limit) if x)
    job_id = _job_after(job_ids, resources, snapshot, "launch " + " ".join(map(shlex.quote, args)),
                        f"{sweep_dir.name}-search", time_min, sweep_dir / "slurm" / "search-%j.out")
    write_json(sweep_dir / SEARCH_JOB, {"job_id": job_id, "after": job_ids, "time_min": time_min})
    return job_id


def _job_after(job_ids: list[str], resources, snapshot: Snapshot | None, module: str, name: str, time_min: int,
               output: Path) -> str:
    """`python -m MODULE` as a one-task job once those jobs have ended (afterany), from this folder, on their
    partition, account and qos, with their code snapshot when they have one."""
    env = " ".join(snapshot.setup_lines()) + "; " if snapshot else ""
    command = f"{env}cd {shlex.quote(os.getcwd())} && {shlex.quote(sys.executable)} -m {module}"
    flags = [f"--dependency=afterany:{':'.join(job_ids)}", f"--job-name={name}", "--nodes=1", "--ntasks=1",
             f"--time={time_min}", f"--output={output}"]
    for flag in ("partition", "account", "qos"):
        value = getattr(resources, flag, None)
        if value:
            flags.append(f"--{flag}={value}")
    return commands.run("sbatch", "--parsable", *flags, "--wrap", command).strip().split(";")[0]


def print_follow_up(target: Path, job_ids: list[str], report_job: str | None = None, out=sys.stdout) -> None:
    where = shlex.quote(show_path(target))
    report = f"; report job {report_job} builds {show_path(target / 'report')} when they have ended" if report_job \
        else ""
    print(f"detached: job(s) {' '.join(job_ids)} accepted{report}. Follow them with:\n"
          f"  python -m launch.status {where}\n"
          f"  python -m launch.logs RUN_DIR [--rank R] -f\n"
          f"  python -m launch.cancel {where} [--now]", file=out, flush=True)
