"""One writer per run folder: rank 0 of an attempt takes the folder's lease (gpt.resilience.lease) before it trains
and beats it from a thread; a second run in the same folder is refused, naming the holder.

A lease is taken over only when its holder is proven gone: its last beat says so, the scheduler says its job ended,
a process of this host and pid namespace is gone, or a later round or restart of its own job runs. A late beat is not
a proof: a holder whose job the scheduler still lists (running, suspended, queued) or whose process still runs here
keeps the folder, however long its beat is late. Only a holder that cannot be asked after (another host's process,
a job the scheduler cannot tell of) is taken over once its sequence number did not change for LEASE_STALE_S of this
process's clock. A fresh beat always vetoes a take-over, whoever holds it (a second launch in one allocation has the
holder's job id). A displaced holder that wakes up finds the later generation and stops (the fence).
"""
from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from gpt.errors import UserError
from gpt.resilience.lease import Beat, Lease, LeaseLost, generation, observe, read_beat
from gpt.resilience.timing import LEASE_BEAT_S, LEASE_STALE_S
from launch.backends.job_state import JobStanding, JobState

log = logging.getLogger(__name__)

AskJob = Callable[[str], "JobStanding | None"]  # where a job stands; None: the scheduler cannot tell
ALIVE_WATCH_S = 2 * LEASE_BEAT_S + 1  # long enough to see a live holder beat


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


def alive_because(beat: Beat, job: JobStanding | None, own_job: str | None) -> str | None:
    """Why the holder of `beat` certainly still lives, whatever its beat says: its job is live by the scheduler (not
    this process's own job, which says nothing of another launch inside it), or its process runs on this host."""
    if job is not None and job.state.live and beat.job_id != own_job:
        return f"job {beat.job_id} is {job.shown}"
    if beat.same_process_namespace() and _alive(beat.pid):
        return f"process {beat.pid} runs on this host"
    return None


def _asking_once(job_state: AskJob, own_job: str | None) -> AskJob:
    """One question to the scheduler per job at most, and none about the job this process runs in (a requeued
    attempt finds its own job's beat: that job is running)."""
    def state(job_id: str) -> JobStanding | None:
        return JobStanding(job_id, JobState.RUNNING, "running") if job_id == own_job else job_state(job_id)
    return state


def check_free(run_dir: Path, job_id: str | None, restart: int, job_state: AskJob | None = None,
               stale_s: float = LEASE_STALE_S, round_: int = 0, launch: str = "") -> tuple[Beat, str] | None:
    """Refuse, naming the holder, while another run holds the folder; else the ended holder and why (None: the
    folder was never held). Watches a holder that can be told neither alive nor gone for up to `stale_s`."""
    beat = read_beat(run_dir)
    if beat is None:
        return None
    ask = functools.cache(job_state) if job_state is not None else None
    job_state = _asking_once(ask, job_id) if ask is not None else None
    why = _earlier_of_this_job(beat, job_id, restart, round_, launch) or ended_because(beat, job_state)
    if why is not None:
        return beat, why
    job = job_state(beat.job_id) if beat.job_id and job_state is not None else None
    if job is not None and job.state == JobState.PENDING:
        raise _refuse(run_dir, beat, f"job {beat.job_id} is {job.shown}", ask)
    if beat.job_id == job_id and job_id is not None and beat.restart > restart:
        raise _refuse(run_dir, beat, f"restart {beat.restart} of this job runs it; this is restart {restart}", ask)
    alive = alive_because(beat, job, job_id)
    watch_s = min(stale_s, ALIVE_WATCH_S) if alive else stale_s  # refused either way: watched only for the words
    if observe(run_dir, beat, watch_s):
        raise _refuse(run_dir, beat, "its lease is beating", ask)
    if alive:
        raise _refuse(run_dir, beat, f"{silent(beat, watch_s)}, but {alive}", ask)
    return beat, silent(beat, stale_s)


def silent(beat: Beat, watched_s: float) -> str:
    """How long the holder's lease has been silent: at least the time this process watched it; since its last beat
    by the holder's clock (another host's: said as such) when that is longer."""
    since = time.time() - beat.time if beat.time else 0.0
    if since > watched_s + 1:
        return f"its lease has not beaten since {since:.0f} s ago (its host's clock; none in {watched_s:.0f} s watched)"
    return f"its lease did not beat in {watched_s:.0f} s watched"


def _earlier_of_this_job(beat: Beat, job_id: str | None, restart: int, round_: int, launch: str) -> str | None:
    """The holder is an earlier attempt, or an earlier round of this launch, of this very job: the scheduler requeued
    it only once its attempt had ended, and the task wrappers stop a round's ranks before they start the next."""
    if job_id is None or beat.job_id != job_id:
        return None
    if beat.restart < restart:
        return f"restart {beat.restart} of this job ended (this is restart {restart})"
    if beat.restart == restart and beat.launch == launch and beat.round < round_:
        return f"round {beat.round} of this job was restarted inside the allocation"
    return None


def take_lease(run_dir: Path, job_id: str | None, restart: int, job_state: AskJob | None = None,
         stale_s: float = LEASE_STALE_S, round_: int = 0, launch: str = "") -> Lease:
    """Rank 0, before its first step: the next generation of the folder's lease, beating from a thread."""
    over = generation(run_dir)
    previous = check_free(run_dir, job_id, restart, job_state, stale_s, round_, launch)
    try:
        lease = Lease.take(run_dir, over, job_id, restart, round_, launch)
    except LeaseLost as e:
        raise UserError(f"the run folder {run_dir} is in use by another run: {e}") from None
    if previous is not None and not previous[0].ended:
        log.warning("took over the run folder from %s: %s", previous[0].describe(), previous[1])
    lease.start()
    return lease
