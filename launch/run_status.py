"""Where a submitted run stands, from its run folder and one question to the scheduler: for launch.status and
launch.list, which run on a login node without the launcher that submitted the jobs. Torch-free.

A run's jobs are those its slurm_job.json names (a chain's links too) and the one its ranks recorded from inside
(job.json: launch.run.job_record); a sweep folder's runs are the run folders
below it, and its report job is named in report_job.json.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch import launch_config
from gpt.config.report import ReportConfig
from gpt.errors import UserError
from gpt.resilience.goodput import run_goodput
from gpt.run_folder import (CANCELLED, CTRL_C, NOT_RUNS, AttemptLine, Next, RunFolder, excluded_hosts,
                            read_metrics_lines)
from launch.backends import REGISTRY, scheduler
from launch.backends.job_state import JobStanding, JobState, SchedulerUnavailable
from launch.run.attempts import failed_saves_line, ran_on
from launch.run.identity import newest_step
from launch.run.job_record import cancelled_by_user, recorded_job

REPORT_JOB = "report_job.json"  # in a sweep folder: the dependency job that builds its report
SEARCH_JOB = "search_job.json"  # in a sweep folder: the job that goes on with a detached search (hydra/sweeper=optuna)
FINISHED, FAILED, WAITING = "finished", "failed", "running"  # a run's verdict; launch.status exits 0, 1, 3
UNKNOWN = "unknown"  # its job's state: the scheduler does not answer (launch.status exits 4)
STOPPED = "stopped (the same command continues it)"  # saved after a signal or a preemption, not requeued: exits 1


@dataclass(frozen=True)
class RunStatus:
    run_dir: Path
    job_ids: tuple[str, ...]
    state: JobState  # the state of its job in flight (else its last one)
    shown: str  # that state in the scheduler's words
    reason: str  # why it waits, in the scheduler's words (Slurm: JobHeldUser, Priority, Dependency, ...)
    step: int | None  # steps done: the newest step rank 0 logged, plus one, or its newest checkpoint's if later
    max_steps: int | None
    tokens_per_s: float | None
    eta_s: float | None
    attempts: int  # attempts recorded in the attempts log (the one in flight not counted)
    restarts: int  # attempts that ended by requeueing their job (preempted, hung, a node lost)
    goodput: float | None
    links: tuple[str, ...] = ()  # a chain's links (cluster.chain), each as "JOB STATE"
    in_job: tuple[str, ...] = ()  # one line per in-job restart (launch.recovery.rounds) or rank out of memory
    stuck: str | None = None  # it waits and will not start by itself: what the user can do
    cancelled: bool = False  # its job was cancelled (scancel, launch.cancel), or its last attempt says so
    # its job lives on (an allocation: salloc), but the run's newest attempt in it ended for good, and no launch
    # started in it since (ended_in)
    ended_in_job: bool = False
    interrupted: str = ""  # how its newest attempt that did not finish ended (preempted by another job, TIMEOUT, ...)
    stopped: bool = False  # its newest attempt saved after a signal or a preemption and was not requeued
    failed_saves: str = ""  # the interval saves storage refused, in words (launch.run.attempts.failed_saves_line)
    stopped_early: str = ""  # its newest attempt ended at a rung of its sweep's early stopping: done (exit 0)
    # its summary.json is the newest attempt's (an attempt that failed since, asked for more steps, is not done)
    summarised: bool = False
    excluded: tuple[str, ...] = ()  # the hosts its attempts were kept off (gpt.run_folder.excluded_hosts)

    @property
    def finished(self) -> bool:
        return self.step is not None and self.max_steps is not None and self.step >= self.max_steps

    @property
    def verdict(self) -> str:
        if self.state.live and not self.ended_in_job and not (self.finished and self.summarised):
            return WAITING
        if self.stopped_early and not self.finished:
            return self.stopped_early.split(":")[0]  # "stopped early at step S (rung K)"
        if self.finished or self.summarised:
            return FINISHED
        if self.state is JobState.UNKNOWN:  # its last attempt's line may be older than what the job did since
            return UNKNOWN
        return CANCELLED if self.cancelled else STOPPED if self.stopped else FAILED


def run_folders(target: Path, depth: int = 4) -> list[Path]:
    """The run folders at or under target: folders with the launcher's config.yaml and run.json (a job still pending
    has no metrics yet; Hydra's configs/ has a config.yaml of its own). Links are not followed: a run is listed once."""
    folder = RunFolder(target)
    if folder.config.is_file() and folder.identity.is_file():
        return [target]
    if depth == 0 or not target.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(p for p in target.iterdir() if p.is_dir() and not p.is_symlink()):
        if child.name not in NOT_RUNS and not child.name.startswith(".") and child.name not in (*REGISTRY, "code"):
            found.extend(run_folders(child, depth - 1))
    return found


def job_ids(run_dir: Path) -> tuple[str, ...]:
    """The run's jobs, oldest first: its newest submission's (a chain has several), and the job its ranks recorded
    from inside (`sbatch slurm/multi_node.sh`, a stock launcher, `salloc`), placed by when each was written."""
    submitted: tuple[str, ...] = ()
    path = RunFolder(run_dir).slurm_job
    try:
        record = json.loads(path.read_text())
        submitted, when = tuple(record.get("chain") or [record["job_id"]]), path.stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        when = 0.0
    inside, recorded = recorded_job(run_dir)
    if inside is None or inside in submitted:
        return submitted
    return (*submitted, inside) if recorded >= when else (inside, *submitted)


def ask_scheduler(ids: list[str]) -> dict[str, JobStanding]:
    """Each job's standing, in one question; SchedulerUnavailable when the scheduler does not answer (an outage is
    never taken for jobs that are gone: launch.cancel then acts on nothing)."""
    return scheduler().standings(ids) if ids else {}


def standings(ids: list[str]) -> dict[str, JobStanding]:
    """What the listings show (status, list, logs): each job's standing, or when the scheduler does not answer,
    each job UNKNOWN with why (the run folders still tell the steps)."""
    try:
        return ask_scheduler(ids)
    except SchedulerUnavailable as e:
        why = f"{e.scheduler} does not answer: {e}"
        return {j: JobStanding(j, JobState.UNKNOWN, JobState.UNKNOWN.name, why) for j in ids}


def shown(infos: dict[str, JobStanding], job_id: str) -> str:
    return infos[job_id].label if job_id in infos else JobState.GONE.name


def read_status(run_dir: Path, infos: dict[str, JobStanding]) -> RunStatus:
    ids = job_ids(run_dir)
    live = [infos[j] for j in ids if j in infos and not infos[j].state.over]
    current = live[0] if live else (infos.get(ids[-1]) if ids else None)
    state = current.state if current else JobState.GONE
    reason = current.reason if current else ""
    max_steps = _max_steps(run_dir)
    train = _train_records(run_dir)
    saved = newest_step(run_dir)  # where a stop between log steps left it
    step = max((s for s in (train[-1]["step"] if train else None, saved) if s is not None), default=None)
    tokens = steady_tokens_per_s(train)
    times = [r["step_time_s"] for r in train[-20:] if isinstance(r.get("step_time_s"), (int, float))]
    eta = statistics.median(times) * (max_steps - step) if times and step is not None and max_steps else None
    attempts = RunFolder(run_dir).attempts.read()
    restarts = sum(1 for a in attempts if a.requeued)
    links = tuple(f"{j} {shown(infos, j)}" for j in ids) if len(ids) > 1 else ()
    in_job = tuple(filter(None, map(recovered, attempts)))
    cancelled = (current is not None and current.cancelled) or cancelled_by_user(run_dir)
    interrupted = next((a.ended for a in reversed(attempts) if a.ended and not (a.finished or a.stopped_early)), "")
    early = AttemptLine.stopped_early_why(attempts)
    stopped = bool(attempts) and (attempts[-1].ended.startswith("preempted") or attempts[-1].ended == CTRL_C) \
        and not attempts[-1].requeued
    return RunStatus(run_dir, ids, state, current.label if current else state.name, reason, step, max_steps, tokens,
                     eta, len(attempts), restarts, run_goodput(attempts).goodput, links, in_job,
                     current.stuck if current else None, cancelled, ended_in(run_dir, current, attempts), interrupted,
                     stopped, failed_saves_line(attempts), early, summarised(run_dir, attempts),
                     tuple(excluded_hosts(attempts)))


def summarised(run_dir: Path, attempts: list[AttemptLine]) -> bool:
    """Whether the run's summary.json (written when an attempt finishes) tells where it stands: no attempt that
    ended otherwise came after it."""
    last = next((a for a in reversed(attempts) if a.ended), None)
    return RunFolder(run_dir).summary.is_file() and (last is None or last.finished or bool(last.stopped_early))


def recovered(a: AttemptLine) -> str:
    """The line under the run for an in-job restart (cause, step, spare), or for a rank out of memory, which says the
    micro-batch the run went on with ("": neither)."""
    if a.in_job_restart:
        return (f"in-job restart {a.in_job_restart} of job {a.job_id}: {a.ended} at step {a.last_step}; "
                f"{a.note}{ran_on(a)}")
    return f"{a.ended} in job {a.job_id}: {a.note}" if a.out_of_memory else ""


def ended_in(run_dir: Path, job: JobStanding | None, attempts: list[AttemptLine]) -> bool:
    """Whether the run's newest attempt ran in `job`, still live, and ended with nothing to follow (failed, stopped,
    cancelled), after the newest launch in that job recorded itself (job.json: every launch in an allocation does,
    at its start and at each attempt's)."""
    if job is None or not job.state.live or not attempts:
        return False
    last = attempts[-1]
    recorded, when = recorded_job(run_dir)
    return last.job_id == job.job_id == recorded and last.next is Next.STOP and last.time >= when


def _max_steps(run_dir: Path) -> int | None:
    try:
        return launch_config.load(RunFolder(run_dir).config).train.max_steps
    except UserError:  # the listing goes on; the run's own commands say what is wrong with it
        return None


def steady_tokens_per_s(train: list[dict[str, Any]]) -> float | None:
    """The run's tokens/s as its report gives it: the median of its log windows, the first left out (compiling,
    warming up; report.skip_windows), not the last window alone, which a neighbour or the final save may have slowed."""
    skip = ReportConfig.skip_windows
    rates = [r["tokens_per_s"] for r in (train[skip:] if len(train) > skip else train)
             if isinstance(r.get("tokens_per_s"), (int, float))]
    return statistics.median(rates) if rates else None


def _train_records(run_dir: Path) -> list[dict[str, Any]]:
    """Rank 0's train records in step order, the steps done (a requeued attempt appends to the same file)."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in read_metrics_lines(RunFolder(run_dir).metrics_file(0)):
        if isinstance(r, dict) and r.get("kind") == "train" and isinstance(r.get("step"), int):
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def report_job(sweep_dir: Path) -> str | None:
    return sweep_job(sweep_dir, REPORT_JOB)


def sweep_job(sweep_dir: Path, record: str) -> str | None:
    """The job of the sweep's own that this record names (REPORT_JOB, SEARCH_JOB), if it has one."""
    try:
        return json.loads((sweep_dir / record).read_text())["job_id"]
    except (OSError, ValueError, KeyError):
        return None
