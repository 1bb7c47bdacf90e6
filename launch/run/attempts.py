"""The lifecycle of an attempt of a run, over its attempts log (gpt.run_folder.AttemptsLog): rank 0 writes an
attempt's line when it ends, with its start-up breakdown and its goodput record (gpt.resilience.goodput).

The mark of the attempt in flight (job id, restart, lease generation, start time) is removed when its line is
written. An attempt killed outright (kill -9, a lost node, the time limit) writes no line: the next one finds the
mark, asks the scheduler how that job ended, and writes the line for it. Each line has one writer, the first to
claim it (AttemptsLog.claim), however many processes try; a process whose attempt lost the run folder's lease writes
none (gpt.resilience.lease.fence)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import UserError, error_line
from gpt.resilience.disk_faults import cause
from gpt.resilience.goodput import ESTIMATED, kept_training_s, last_record_time, last_trained_step
from gpt.resilience.lease import Lease, fence, fenced_generation, read_beat
from gpt.resilience.timing import SCHEDULER_GRACE_S
from gpt.run_folder import AttemptLine, AttemptsLog, Next, RunFolder
from gpt.train.hooks import LoopHook, RunningLoop
from gpt.train.summary import FitSummary
from launch.rank.job_env import JobEnvironment
from launch.recovery.rounds import Rounds
from launch.run.identity import record_data
from launch.run.notify import notify
from launch.run.startup import ATTEMPT_START

if TYPE_CHECKING:
    from launch.recovery.watchdog import Watchdog
    from launch.run.startup import StartupClock

log = logging.getLogger(__name__)

LOOP_BEGAN = "loop_began"  # a mark's key: when the attempt's training loop began (its start-up ended)
SPENT = "spent"  # a mark's key: what the attempt spent up to its last save (BeginAttempt)


def this_attempt(job: JobEnvironment) -> str:
    """This process's attempt's name in the attempts log."""
    return AttemptsLog.key(job.job_id, job.restart, fenced_generation(), job.round, job.launch)


def claim_this_attempt(run_dir: Path, job: JobEnvironment) -> bool:
    """Whether this process decides and writes this attempt's line (the first to ask, of any host)."""
    return RunFolder(run_dir).attempts.claim(this_attempt(job))


def hang_report_name(job: JobEnvironment, number: int) -> Callable[[], str]:
    """What names this attempt's hang report when a hang is seen: its own id, never the count of the attempts log's
    lines (`number`, a fallback for ranks started by hand before the lease): an attempt killed before its line
    leaves the next one the same count, which would find the old report and take itself for hung within a second,
    attempt after attempt. The id is its name in the attempts log (job, restart and round; without a scheduler the
    lease's generation), or before the lease of a run without a scheduler, the time its launcher started it."""
    def name() -> str:
        if job.job_id or fenced_generation() is not None:
            return this_attempt(job)
        started = job.environ.get(ATTEMPT_START)
        return f"started{started}" if started else str(number)
    return name


def marked_attempt(mark: dict[str, Any]) -> str:
    return AttemptsLog.key(mark.get("job_id"), mark.get("restart", 0), mark.get("generation"), mark.get("round", 0),
                           mark.get("launch", ""))


def log_attempt(run_dir: Path, job: JobEnvironment, record: dict[str, Any], claimed: bool = False) -> bool:
    """This attempt's line, unless another process claimed it (`claimed`: this one did); returns whether this one
    wrote it. It names the nodes the attempt ran on, from its mark."""
    fence()
    attempts, key = RunFolder(run_dir).attempts, this_attempt(job)
    mark = attempts.read_mark()
    mine = mark is not None and marked_attempt(mark) == key
    nodes = {"nodes": mark["nodes"]} if mine and "nodes" in mark else {}
    if mine and not record.get("goodput"):  # ended before its trainer returned: a hang, a failure, a lost node
        record = {**record, "goodput": estimated_goodput(run_dir, mark, record)}
    if claimed:
        attempts.append(job.job_id, job.restart, {**record, **nodes}, job.round, job.launch)
    elif not attempts.append_once(key, job.job_id, job.restart, {**record, **nodes}, job.round, job.launch):
        return False
    notify(run_dir)
    return True


def requeued(run_dir: Path, job: JobEnvironment) -> bool:
    """Whether this attempt of this job ended by requeueing itself (its line in the attempts log says so)."""
    line = this_attempts_line(run_dir, job)
    return line is not None and line.next is Next.REQUEUE


def goodput_record(run_dir: Path, started: float, startup: dict[str, float], summary: FitSummary) -> dict:
    """Where this attempt's allocated time went; `started` is when the attempt began (epoch seconds)."""
    return {"allocated_s": round(time.time() - started, 3), "startup_s": startup_s(startup),
            "load_s": startup.get("checkpoint_load_s", 0.0),
            "steps_replayed": steps_replayed(run_dir, summary.first_step), **summary.spent}


def startup_s(startup: dict[str, float], mark: dict[str, Any] | None = None) -> float:
    """Seconds from the attempt's start to its first step, which is training time: from its start-up breakdown;
    without one (the attempt did not live to write it), from its mark, which rank 0 wrote as its loop began."""
    if "to_first_step_s" in startup:
        to_first = startup["to_first_step_s"] - startup.get("first_step_s", 0.0)
    elif mark is not None and LOOP_BEGAN in mark:
        to_first = mark[LOOP_BEGAN] - mark["started"]
    else:
        to_first = 0.0
    return round(max(to_first, 0.0), 3)


def steps_replayed(run_dir: Path, first_step: int) -> int:
    """How many steps of the attempt before this one (beginning at `first_step`) it trains again: those that attempt
    trained past the checkpoint this one resumes from (lost). Read before this attempt's line is written."""
    earlier = RunFolder(run_dir).attempts.read()
    if not earlier:
        return 0
    before = earlier[-1]  # a line written for an attempt killed outright says how far it trained in trained_to
    last = before.trained_to if isinstance(before.trained_to, int) else before.last_step
    return max(last - first_step, 0) if isinstance(last, int) else 0


def spent_so_far(mark: dict[str, Any]) -> dict[str, Any]:
    """What an attempt that wrote no time of its own spent evaluating and saving, up to its last save: rank 0 adds
    it to the attempt's mark after each save (BeginAttempt)."""
    spent = mark.get(SPENT) or {}
    return {"eval_s": spent.get("eval_s", 0.0), "save_s": spent.get("save_s", 0.0), "saves": spent.get("saves", 0)}


def estimated_goodput(run_dir: Path, mark: dict[str, Any], record: dict[str, Any]) -> dict:
    """The goodput record of this attempt, ending before its trainer returned: allocated until now (it holds the
    allocation still), its steps timed by their median in rank 0's metrics, its start-up from its breakdown (or its
    mark), its saves from its mark. Its steps after the last checkpoint count as lost once the next attempt trains
    them again (steps_replayed)."""
    began = record.get("first_step") if isinstance(record.get("first_step"), int) else mark.get("first_step") or 0
    last = record.get("last_step")
    last = last if isinstance(last, int) else last_trained_step(run_dir, mark["started"]) or began
    return {"allocated_s": round(max(time.time() - mark["started"], 0.0), 3),
            "startup_s": startup_s(record.get("startup") or {}, mark),
            "train_s": kept_training_s(run_dir, mark["started"], began, last), **spent_so_far(mark),
            "steps": max(last - began, 0), "steps_replayed": steps_replayed(run_dir, began),
            ESTIMATED: "rank 0's metrics"}


def begin_attempt(run_dir: Path, job: JobEnvironment, started: float, first_step: int,
                  nodes: list[str]) -> None:
    """Rank 0, before the first step: record the attempt before it (if it left no line), then mark this one, with
    the `nodes` its ranks run on (in rank order)."""
    began = time.time()
    attempts = RunFolder(run_dir).attempts
    previous = attempts.read_mark() or unbegun_round(run_dir, job, first_step)
    if previous is not None:
        how = job.end_reason(previous.get("job_id")) if previous.get("job_id") else "killed outright"
        log_killed(run_dir, previous, first_step, {"ended": how, "recorded_by": "the next attempt"})
    fence()
    attempts.mark({"job_id": job.job_id, "restart": job.restart, "round": job.round, "generation": fenced_generation(),
                   "started": started, LOOP_BEGAN: began, "first_step": first_step, "nodes": nodes,
                   **({"launch": job.launch} if job.launch else {})})


def unbegun_round(run_dir: Path, job: JobEnvironment, resumes_from: int) -> dict[str, Any] | None:
    """The mark of the in-job round that the newest line asked for, as that round would have written it, when it
    never reached its first step (its ranks were stopped while they started, by a preemption whose grace time ran
    out, a time limit or a lost node): it wrote no line and no mark, and is recorded as one killed outright. None
    when the newest line asked for no round, or this attempt is that round. Without a scheduler an attempt is named
    by the lease generation it took, which such a round never did: it is left out, as any local attempt stopped
    before its first step is."""
    lines = RunFolder(run_dir).attempts.read()
    last = lines[-1] if lines else None
    if last is None or not last.in_job_restart or not last.job_id:
        return None
    k = last.in_job_restart
    if (last.job_id, last.restart, k, last.launch) == (job.job_id, job.restart, job.round, job.launch):
        return None
    asked = Rounds.named(run_dir, last.job_id, last.restart, last.launch).read(k) or {}
    launch = {"launch": last.launch} if last.launch else {}
    return {"job_id": last.job_id, "restart": last.restart, "round": k, **launch, "first_step": resumes_from,
            "started": asked.get("requested", last.time), "nodes": asked.get("hosts", [])}


def log_killed(run_dir: Path, mark: dict[str, Any], resumes_from: int, record: dict[str, Any],
               claimed: bool = False) -> None:
    """The line of an attempt that ended without writing one (its `mark`), with the training it kept: its steps
    up to the checkpoint the run resumes from; unless another process claimed it (`claimed`: this one did)."""
    fence()
    attempts = RunFolder(run_dir).attempts
    if not (claimed or attempts.claim(marked_attempt(mark))):
        return
    # once the next attempt records this one, the lease beats for the next: this one's last metrics record then
    beat = None if record.get("recorded_by") else _last_beat(run_dir)
    last_alive = beat or last_record_time(run_dir, mark["started"]) or mark["started"]
    began = mark.get("first_step") or 0
    trained = last_trained_step(run_dir, mark["started"])
    # every step it trained is timed; those past resumes_from count as lost once the next attempt trains them again
    to = max(trained or 0, resumes_from)
    attempts.append(mark.get("job_id"), mark.get("restart", 0), {
        "first_step": began, "last_step": resumes_from, **({"nodes": mark["nodes"]} if "nodes" in mark else {}),
        **({"trained_to": trained} if trained is not None and trained > resumes_from else {}),
        **record,
        "goodput": {"allocated_s": round(max(last_alive - mark["started"], 0.0), 3), "startup_s": startup_s({}, mark),
                    "train_s": kept_training_s(run_dir, mark["started"], began, to), **spent_so_far(mark),
                    "steps": max(to - began, 0), "steps_replayed": steps_replayed(run_dir, began),
                    ESTIMATED: "the lease's beat" if beat else "rank 0's last metrics record"}},
                    mark.get("round", 0), mark.get("launch", ""))
    notify(run_dir)


def ran_on(attempt: AttemptLine, most: int = 8) -> str:
    """' (ran on gl-n1, gl-n2)': the attempt's nodes, counted where there are more than `most`."""
    nodes = attempt.nodes
    if not nodes:
        return ""
    return f" (ran on {', '.join(nodes)})" if len(nodes) <= most else f" (ran on {len(nodes)} nodes)"


def failed_saves_line(attempts: list[AttemptLine]) -> str:
    """'checkpoint saves failed at step(s) 4, 8 (checkpoint.on_save_error=continue: the run trained on; ...)', or
    '' when storage refused none."""
    steps = [s for a in attempts for s in a.failed_saves]
    if not steps:
        return ""
    return (f"checkpoint saves failed at step(s) {', '.join(map(str, steps))} (checkpoint.on_save_error=continue: the "
            "run trained on; see logs/rank0.log)")


def this_attempts_line(run_dir: Path, job: JobEnvironment) -> AttemptLine | None:
    """The line this attempt of this job has written already (a rank's task recorded it vanishing), if any."""
    return RunFolder(run_dir).attempts.line_of(job.job_id, job.restart, job.round, job.launch)


def _last_beat(run_dir: Path) -> float | None:
    """When the run folder's lease last beat, by the holder's clock (a goodput figure, not a liveness test)."""
    try:
        beat = read_beat(run_dir)
    except UserError:
        return None
    return beat.time if beat else None


def end_attempt(run_dir: Path, key: str) -> None:
    """Remove attempt `key`'s mark once its line is written (a later attempt's mark stays)."""
    RunFolder(run_dir).attempts.unmark(key)


@dataclass
class Attempt:
    """This rank's attempt as far as it got: what ends it (its watchdog, rank 0's lease of the run folder) and what
    its line in the attempts log says when it ends early (a hang, a failure)."""

    run_dir: Path
    number: int = 0  # 1 for a run's first attempt
    job: JobEnvironment | None = None
    clock: StartupClock | None = None
    watchdog: Watchdog | None = None
    lease: Lease | None = None
    loop: RunningLoop | None = None  # the training loop, once rank 0 has marked the attempt begun (BeginAttempt)
    nodes: list[str] = field(default_factory=list)  # the attempt's hosts in rank order, once its ranks have joined

    def early_end(self, ended: str, with_startup: bool = False, **extra: Any) -> dict[str, Any]:
        """Its line when it ends before the trainer returns: the steps it ran, as far as it knows them, and with
        its start-up breakdown when asked (not from the watchdog's thread: the trainer may still write it)."""
        loop = self.loop
        record = {"first_step": loop.first_step if loop else None,
                  "last_step": loop.step if loop else None, "ended": ended, **extra}
        if with_startup and loop is not None and self.clock is not None:
            record["startup"] = self.clock.breakdown(loop.startup)
        return record

    def release(self, code: int) -> None:
        """At the rank's exit: its watchdog says how it ended, and rank 0 gives the run folder's lease back."""
        if self.watchdog is not None:
            self.watchdog.end("finished" if code == 0 else f"exit code {code}")
            self.watchdog.close()  # the rank ends with os._exit: no atexit handler runs
        if self.lease is not None:
            self.lease.release()


@dataclass
class BeginAttempt(LoopHook):
    """The training loop's hook that begins the attempt before its first step: rank 0 records the attempt before it
    (if it left no line) and marks this one, with the data it trains on; from then on an early end names the loop's
    steps, and after each save the mark holds what the attempt has spent (a line written for it reads it)."""

    attempt: Attempt
    is_main: bool
    data_dir: str
    saves: int = 0  # the saves the mark holds

    def started(self, loop: RunningLoop) -> None:
        a = self.attempt
        if self.is_main:
            begin_attempt(a.run_dir, a.job, a.clock.attempt_start or a.clock.process_start, loop.first_step, a.nodes)
            record_data(a.run_dir, self.data_dir, loop.data_fingerprint)
        a.loop = loop

    def after_step(self, step: int) -> None:
        """The step after a save: rank 0 adds what the attempt has spent so far to its mark (one write per save),
        so that a line written for it after a kill -9 still counts its saves."""
        loop = self.attempt.loop
        if not self.is_main or loop is None or loop.spent.saves == self.saves:
            return
        self.saves = loop.spent.saves
        fence()
        try:  # a goodput figure: training goes on without it
            RunFolder(self.attempt.run_dir).attempts.add_to_mark(this_attempt(self.attempt.job),
                                                                 {SPENT: loop.spent.as_dict()})
        except OSError as e:
            log.warning("cannot note this attempt's saves in its mark: %s", cause(e))


def log_failure(attempt: Attempt, message: str, peer_gone: bool = False, how: str = "failed") -> None:
    """Rank 0 of an attempt that began (it holds the run's lease) says how it failed; one refused before that
    writes nothing into another run's log. A collective that failed under it (`peer_gone`) may mean a rank was
    killed: its task records the attempt (and requeues), so rank 0 gives it SCHEDULER_GRACE_S to do so first."""
    run_dir, job = attempt.run_dir, attempt.job
    if attempt.lease is None:
        return
    deadline = time.monotonic() + (SCHEDULER_GRACE_S if peer_gone and job.scheduler != "none" else 0)
    while this_attempts_line(run_dir, job) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if this_attempts_line(run_dir, job) is not None:  # a vanished rank's task wrote it
        return
    try:
        log_attempt(run_dir, job, attempt.early_end(f"{how}: {error_line(message, limit=300)}", with_startup=True))
        end_attempt(run_dir, this_attempt(job))
    except OSError as e:
        log.warning("cannot write this attempt's line in %s: %s; the next attempt records it", run_dir, cause(e))
