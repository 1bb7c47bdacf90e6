"""One writer per run folder: rank 0 of an attempt takes the folder's lease (gpt.resilience.lease) before it trains
and beats it from a thread; a second run in the same folder is refused, naming the holder.

A lease is taken over only when its holder has ended: its last beat says so, the scheduler says its job ended, a
process of this host and pid namespace is gone, or its sequence number did not change for LEASE_STALE_S of this
process's clock. A fresh beat always vetoes a take-over, whoever holds it (a second launch in one allocation has the
holder's job id); a holder whose job is suspended or waits in the queue keeps the folder. A displaced holder that
wakes up finds the later generation and stops (the fence).
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

from gpt.errors import UserError
from gpt.resilience.lease import Beat, Lease, LeaseLost, generation, observe, read_beat
from gpt.resilience.timing import LEASE_STALE_S
from launch.backends.job_state import JobStanding, JobState

log = logging.getLogger(__name__)

AskJob = Callable[[str], "JobStanding | None"]  # where a job stands; None: the scheduler cannot tell


def _alive(pid: int) -> bool:
    """A process that runs. A zombie does not: a rank killed after its launcher died waits as one until pid 1 reaps
    it, and its lease must not outlive it (the same command must continue the run at once)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): a signal that arrived means a process
    return state not in ("Z", "X")


def _refuse(run_dir: Path, beat: Beat, why: str, ask: AskJob | None) -> UserError:
    job = ask(beat.job_id) if ask is not None and beat.job_id else None  # the scheduler's command to stop it
    stop = f"wait for it to end or stop it ({job.cancel})" if job and job.cancel else "wait for it to end or stop it"
    return UserError(f"the run folder {run_dir} is in use by another run ({beat.describe()}: {why}); {stop}, or give "
                     "this run another name (run=NAME)")


def ended_because(beat: Beat, job_state: AskJob | None) -> str | None:
    """Why the holder of `beat` has certainly ended, without watching it; None when that is not known."""
    if beat.ended:
        return "it ended"
    if beat.job_id and job_state is not None:
        job = job_state(beat.job_id)
        if job is not None and job.state.over:
            return f"job {beat.job_id} ended {job.shown}"
    if not beat.job_id and beat.same_process_namespace() and not _alive(beat.pid):
        return f"process {beat.pid} is gone"
    return None


def _asking_once(job_state: AskJob, own_job: str | None) -> AskJob:
    """One question to the scheduler per job at most, and none about the job this process runs in (a requeued
    attempt finds its own job's beat: that job is running)."""
    def state(job_id: str) -> JobStanding | None:
        return JobStanding(job_id, JobState.RUNNING, "running") if job_id == own_job else job_state(job_id)
    return state


def check_free(run_dir: Path, job_id: str | None, restart: int, job_state: AskJob | None = None,
               stale_s: float = LEASE_STALE_S, round_: int = 0) -> tuple[Beat, str] | None:
    """Refuse, naming the holder, while another run holds the folder; else the ended holder and why (None: the
    folder was never held). Watches a holder that may be alive for up to `stale_s`. An earlier in-job round of this
    job's attempt has ended: the task wrappers stop a round's ranks before they start the next."""
    beat = read_beat(run_dir)
    if beat is None:
        return None
    ask = functools.cache(job_state) if job_state is not None else None
    job_state = _asking_once(ask, job_id) if ask is not None else None
    earlier_round = job_id is not None and (beat.job_id, beat.restart) == (job_id, restart) and beat.round < round_
    why = f"round {beat.round} of this job was restarted inside the allocation" if earlier_round else None
    why = why or ended_because(beat, job_state)
    if why is not None:
        return beat, why
    job = job_state(beat.job_id) if beat.job_id and job_state is not None else None
    if job is not None and job.state == JobState.PENDING:
        raise _refuse(run_dir, beat, f"job {beat.job_id} is {job.shown}", ask)
    if beat.job_id == job_id and job_id is not None and beat.restart > restart:
        raise _refuse(run_dir, beat, f"restart {beat.restart} of this job runs it; this is restart {restart}", ask)
    if observe(run_dir, beat, stale_s):
        raise _refuse(run_dir, beat, "its lease is beating", ask)
    return beat, f"its lease did not beat for {stale_s:.0f} s"


def take_lease(run_dir: Path, job_id: str | None, restart: int, job_state: AskJob | None = None,
         stale_s: float = LEASE_STALE_S, round_: int = 0) -> Lease:
    """Rank 0, before its first step: the next generation of the folder's lease, beating from a thread."""
    over = generation(run_dir)
    previous = check_free(run_dir, job_id, restart, job_state, stale_s, round_)
    try:
        lease = Lease.take(run_dir, over, job_id, restart, round_)
    except LeaseLost as e:
        raise UserError(f"the run folder {run_dir} is in use by another run: {e}") from None
    if previous is not None and not previous[0].ended:
        log.warning("took over the run folder from %s: %s", previous[0].describe(), previous[1])
    lease.start()
    return lease
