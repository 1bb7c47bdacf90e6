"""A rank process that vanished without a word while its host lives (killed by a signal: `kill -9`, the OOM
killer, a segfault): its task, which started it, requeues the job, as a lost host's peers do, so that a failure
a restart fixes does not end the allocation.

Not twice in a row without progress: when the attempt before also lost a rank and this one has saved no newer
checkpoint than the one it resumed from, a crash that repeats (running out of memory at the same step) would
repeat on every restart. The job then fails with the rank named, and the same command continues the run.

The task records the attempt's line itself, then marks the rank's heartbeat ended, so that its peers (whose
collectives failed) leave the attempt to it instead of reporting a hang or a failure of their own.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from gpt.goodput import read_attempts
from gpt.hang_report import end_heartbeat
from launch.attempts import end_attempt, log_killed, max_restarts, read_mark
from launch.job_env import job_environment
from launch.run_identity import newest_step


def requeue_for_lost_rank(run_dir: Path, rank: int, line: str, started: float) -> tuple[bool, str]:
    """`line` says which rank died how; `started` is when this attempt's task began. Returns (requeued, how)."""
    job = job_environment()
    newest = newest_step(run_dir)
    mark = read_mark(run_dir)
    ours = mark is not None and (mark.get("job_id"), mark.get("restart")) == (job.job_id, job.restart)
    if not ours:  # lost during start-up: nothing was saved since the newest checkpoint (a mark there is older)
        mark = {"job_id": job.job_id, "restart": job.restart, "started": started, "first_step": newest}
    began = mark.get("first_step")
    earlier = read_attempts(run_dir)
    if earlier and earlier[-1].get("lost_rank") is not None and newest == began:
        requeued, how = False, (f"not requeued: the attempt before lost a rank too, and no checkpoint newer than "
                                f"step {newest} was saved since (a crash that repeats, such as running out of "
                                f"memory, would repeat on every restart)")
    else:
        requeued, how = job.requeue(max_restarts(OmegaConf.load(run_dir / "config.yaml")))
    if not requeued:
        how += f"; the same command continues the run from {_step(newest)}"
    log_killed(run_dir, mark, newest or 0, {"ended": line, "lost_rank": rank, "requeued": requeued, "note": how})
    if ours:
        end_attempt(run_dir)
    end_heartbeat(run_dir, rank, f"vanished: {line}")
    return requeued, how


def _step(step: int | None) -> str:
    return f"its newest checkpoint (step {step})" if step is not None else "the start (no checkpoint yet)"
