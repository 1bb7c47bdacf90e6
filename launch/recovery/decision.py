"""What follows an attempt that ends early, decided in one place for every site that sees one end (a preemption
signal, a hang, a node failing its health check, a node the scheduler holds down, a rank killed, a rank out of
memory).

In order of cost: continue (a flagged node kept where no requeue could leave it out), the next round inside the
allocation (launch.recovery.rounds: a spare for the hosts named, else the nodes left, launch.recovery.shrink), the
chain's next link (cluster.chain: a requeue would run ahead of it), a requeue (without the named hosts), else stop
with one line that says how to continue. A fault of the run itself (a lost rank, a hang) is bounded by progress: no
second recovery in a row without a newer checkpoint, since a fault that repeats (hanging at the same step) would
repeat on every restart. A rank out of device memory goes on the same ways with a smaller micro-batch and the same
global batch (launch.recovery.out_of_memory), and stops at micro-batch 1: each recovery is bounded by the micro-batch,
not by progress.

One process decides each attempt's end, the first to claim its line in the attempts log; it writes the line, with
the outcome in it (gpt.run_folder.AttemptLine.next), and starts the next round. Any other process reads that outcome
from the line."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from gpt.errors import UserError
from gpt.run_folder import AttemptLine, Next, RunFolder
from launch.rank.job_env import ROUND_VAR, JobEnvironment
from launch.run.attempts import end_attempt, log_attempt, log_killed, marked_attempt, this_attempt
from launch.run.identity import newest_step
from launch.recovery.out_of_memory import RanOut, write_micro_batch
from launch.recovery.rounds import InJobRestart, hosts_of, in_job_restart

log = logging.getLogger("launch.recovery.decision")


class Cause(Enum):
    STOPPED = "stopped"  # Ctrl-C: the user stops the run
    CANCELLED = "cancelled"  # the user cancelled the job (scancel, launch.cancel): neither a preemption nor a failure
    PREEMPTED = "preempted"  # a preemption signal, the time limit's warning: the job is leaving its allocation
    NODE_FAILURE = "node failure"  # the scheduler holds the hosts down, and keeps the job off them itself
    STRAGGLER = "straggler"
    HEALTH = "health"  # flagged at start-up: kept when nothing can leave it out
    HANG = "hang"
    LOST_RANK = "lost rank"
    OUT_OF_MEMORY = "out of memory"  # a rank's step: its record (`out_of_memory`) says which, where and at what size

    @property
    def bounded(self) -> bool:
        """A fault of the run that may repeat at the same step: the progress rule applies."""
        return self in (Cause.HANG, Cause.LOST_RANK)


@dataclass(frozen=True)
class Ending:
    """An attempt that ends early, as the site that saw it knows it: `ended` and `record` go into its line;
    `hosts` are left out of the next round and the requeue; `began` is the step it resumed from (None: it had not
    begun training, nothing saved since); `mark` is the mark of an attempt that wrote no line (its line is made from
    it, with the training its checkpoint kept); `points`: the run folders of a packed allocation, where the ending is
    the allocation's (launch.recovery.packed; `run_dir` is its first)."""

    run_dir: Path
    job: JobEnvironment
    cause: Cause
    ended: str
    max_restarts: int
    hosts: tuple[str, ...] = ()
    record: dict[str, Any] = field(default_factory=dict)
    began: int | None = None
    mark: dict[str, Any] | None = None
    wait_s: float = 0.0  # how long to wait for the line of the process that decided instead
    claimed: bool = False  # this process claimed the attempt already (AttemptsLog.claim: the one claim of its end)
    points: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Outcome:
    next: Next
    note: str  # how the run goes on, or why it does not and how to continue it
    restart: InJobRestart | None = None
    link: str | None = None
    # the train.micro_batch_size the run goes on with: smaller (out of memory), or kept on fewer nodes (shrink)
    micro_batch: int | None = None

    @property
    def goes_on(self) -> bool:
        return self.next is not Next.STOP

    @property
    def runs_again(self) -> bool:
        """The job runs again by itself (a round inside the allocation, or a requeue): Slurm stops this attempt."""
        return self.next in (Next.RESTART, Next.REQUEUE)

    def ends_attempt(self, job: JobEnvironment) -> bool:
        """The attempt's processes wait to be stopped: by the next round, or by the requeue where that ends the
        attempt at once (a packed point's step ends first, and its allocation then requeues)."""
        return self.next is Next.RESTART or (self.next is Next.REQUEUE and job.requeue_ends_attempt)

    def record(self) -> dict[str, Any]:
        """What the attempt's line says of it."""
        return {"requeued": self.next is Next.REQUEUE, "note": self.note,
                **(self.restart.record() if self.restart else {}), **({"next_link": self.link} if self.link else {})}

    @classmethod
    def of(cls, line: AttemptLine) -> Outcome:
        return cls(line.next, line.note or line.ended, link=line.next_link)


def recover(end: Ending) -> Outcome:
    """Decide, write the attempt's line once, end the attempt and start the next round; or, where another process
    claimed the attempt first, its outcome."""
    attempts = RunFolder(end.run_dir).attempts
    key = marked_attempt(end.mark) if end.mark is not None else this_attempt(end.job)
    try:
        mine = end.claimed or attempts.claim(key)
    except OSError:  # the storage fails: decide anyway (the requeue comes first), the line may not be written
        mine = True
    if not mine:
        return decided_elsewhere(end.run_dir, end.job, end.wait_s)
    newest, earlier = _progress(end.run_dir)
    outcome = decide(end, newest, earlier)
    if outcome.next is Next.CONTINUE:
        attempts.unclaim(key)  # the attempt goes on and writes its own line when it ends
        return outcome
    record = {**end.record, "ended": end.ended, **outcome.record()}
    try:
        if end.mark is not None:
            log_killed(end.run_dir, end.mark, newest or 0, record, claimed=True)
        else:
            log_attempt(end.run_dir, end.job, record, claimed=True)
        end_attempt(end.run_dir, key)
    except OSError as e:
        log.warning("cannot record the attempt in %s: %s; the next attempt records it", attempts.log, e)
    if outcome.micro_batch is not None:  # before the next round's ranks start: they read config.yaml
        try:
            write_micro_batch(end.run_dir, outcome.micro_batch)
        except (OSError, UserError) as e:
            log.warning("cannot write train.micro_batch_size=%d into the run's config.yaml: %s", outcome.micro_batch, e)
    if outcome.restart:
        outcome.restart.begin(end.run_dir, end.job)
    if end.cause not in (Cause.STOPPED, Cause.CANCELLED, Cause.PREEMPTED):  # they say where they stopped (worker)
        (log.warning if outcome.goes_on else log.error)("%s: %s", end.ended, outcome.note)
    return outcome


def decide(end: Ending, newest: int | None, earlier: list[AttemptLine]) -> Outcome:
    """The outcome, in order of cost, bounded by progress for the run's own faults."""
    cause = end.cause
    if cause is Cause.STOPPED:
        return Outcome(Next.STOP, "stopped by Ctrl-C; the same command continues the run")
    if cause is Cause.CANCELLED:  # an attempt's line says "cancelled by the user" as how it ended: the note, what then
        said = f"{end.ended}; " if end.points else ""  # a packed allocation has no line of its own
        return Outcome(Next.STOP, said + continues(newest, end.points))
    if cause is Cause.OUT_OF_MEMORY:
        return smaller_micro_batch(end, newest)
    began = end.began if end.began is not None else end.mark.get("first_step") if end.mark else newest
    if cause.bounded and (repeated := repeated_recovery(earlier, began, newest)):
        where = f"step {newest}" if newest is not None else "the start"
        return Outcome(Next.STOP, f"not requeued: the attempt before {repeated} too, and no checkpoint newer than "
                                  f"{where} was saved since (a fault that repeats would repeat on every restart); "
                                  f"{continues(newest)}")
    return goes_on(end, newest)


def goes_on(end: Ending, newest: int | None) -> Outcome:
    """How the run goes on, cheapest first: a round inside the allocation, the chain's next link, a requeue; else
    stop with the line that says how to continue."""
    cause, job = end.cause, end.job
    why_not = ""
    if cause is not Cause.PREEMPTED:  # a preempted job leaves its allocation
        # a straggler is slow, not lost: a requeue without it gets the whole world back, fewer nodes would not
        restart, why_not = in_job_restart(end.run_dir, job, end.ended, _in_job_excluded(end),
                                          may_shrink=cause is not Cause.STRAGGLER)
        if restart is not None:  # on fewer nodes: the micro-batch kept in config.yaml, the accumulation grows
            pinned = restart.shrunk.micro_batch if restart.shrunk else None
            return Outcome(Next.RESTART, restart.note, restart, micro_batch=pinned)
        if (kept := _restart_keeping(end)) is not None:
            return kept
    if (link := job.next_link(end.run_dir)) is not None:
        return Outcome(Next.NEXT_LINK, f"ends here: job {link}, the chain's next link, continues the run", link=link)
    requeued, how = _requeue(end)
    said = end.record.get("preempted_by") if end.points else None  # a packed allocation has no line of its own
    note = "; ".join(filter(None, [said, why_not, how]))
    if requeued:
        return Outcome(Next.REQUEUE, note)
    if cause is Cause.HEALTH:
        return Outcome(Next.CONTINUE, note)
    said_why = "preempted_by" in end.record or "time_limit" in end.record  # else the signal: the worker says it
    hint = "" if cause is Cause.PREEMPTED and not said_why else continues(newest, end.points)
    return Outcome(Next.STOP, "; ".join(filter(None, [note, hint])))


WHO = {Next.RESTART: "the next round", Next.REQUEUE: "the requeued job", Next.NEXT_LINK: "the chain's next link",
       Next.STOP: "the same command"}


def smaller_micro_batch(end: Ending, newest: int | None) -> Outcome:
    """A rank ran out of memory: the run goes on as after any other early end, with a smaller micro-batch; at 1,
    it stops with what needs less memory."""
    ran_out = RanOut.of(end.record["out_of_memory"])
    if ran_out.next_micro_batch is None:
        return Outcome(Next.STOP, ran_out.stop())
    then = goes_on(end, newest)
    note = "; ".join([ran_out.going_on(WHO[then.next]), then.note])
    return dataclasses.replace(then, note=note, micro_batch=ran_out.next_micro_batch)


def repeated_recovery(earlier: list[AttemptLine], began: int | None, newest: int | None) -> str | None:
    """The progress rule. `earlier`: the attempts log; `began`: the step this attempt resumed from; `newest`: the
    newest checkpoint's step now. When the attempt before ended in a recovery too and nothing newer was saved since,
    how it ended ("lost a rank", "hung"); else None."""
    last = earlier[-1] if earlier else AttemptLine()
    how = "lost a rank" if last.lost_rank is not None else "hung" if last.ended == "hang" \
        else "lost a node" if "hang_report" in last.extra else None  # a host its watchdog found gone
    return how if how and (newest or 0) <= (began or 0) else None


def decided_elsewhere(run_dir: Path, job: JobEnvironment, wait_s: float) -> Outcome:
    """The outcome the process that claimed this attempt decided, from its line (it decides, then writes it)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            line = RunFolder(run_dir).attempts.line_of(job.job_id, job.restart, job.round, job.launch)
        except OSError:
            line = None
        if line is not None:
            return Outcome.of(line)
        if time.monotonic() >= deadline:
            return Outcome(Next.STOP, "another process claimed this attempt's record and wrote none")
        time.sleep(0.2)


def continues(newest: int | None, points: tuple[Path, ...] = ()) -> str:
    if points:
        return f"the same command continues its {len(points)} point(s), each from its newest checkpoint"
    where = f"its newest checkpoint (step {newest})" if newest is not None else "the start (no checkpoint yet)"
    return f"the same command continues the run from {where}"


def _progress(run_dir: Path) -> tuple[int | None, list[AttemptLine]]:
    try:
        return newest_step(run_dir), RunFolder(run_dir).attempts.read()
    except OSError:  # the storage fails: the rule cannot be read, and a restart may find it mended
        return None, []


def _in_job_excluded(end: Ending) -> list[str]:
    """A lost rank's hosts, and those the scheduler holds down (a rank's task asks it: one task per attempt)."""
    lost = hosts_of(end.job.lost_nodes()) if end.cause is Cause.LOST_RANK else []
    return sorted({*end.hosts, *lost})


def _restart_keeping(end: Ending) -> Outcome | None:
    """A hang whose named hosts no spare replaces and no requeue could leave out (the partition cannot spare them):
    the next round inside the allocation on the same hosts, cheaper than a requeue onto them."""
    job = end.job
    if end.cause is not Cause.HANG or not end.hosts or ROUND_VAR not in job.environ:
        return None
    kept = job.cannot_spare(list(end.hosts))
    restart = in_job_restart(end.run_dir, job, end.ended)[0] if kept else None
    return Outcome(Next.RESTART, f"{restart.note}; {kept}", restart) if restart else None


def _requeue(end: Ending) -> tuple[bool, str]:
    """Without the named hosts, but where the scheduler holds them down already (it keeps the job off them). A
    flagged node no requeue can leave out is kept where it is: requeued, the job would be flagged on it again."""
    job = end.job
    if job.scheduler == "none" and end.cause.bounded:  # nothing requeues: the continue hint says what does
        return False, ""
    if end.cause is Cause.HEALTH and (kept := job.cannot_spare(list(end.hosts))):
        return False, kept
    if end.hosts and end.cause is not Cause.NODE_FAILURE:
        return job.requeue_excluding(list(end.hosts), end.max_restarts)
    return job.requeue(end.max_restarts)
