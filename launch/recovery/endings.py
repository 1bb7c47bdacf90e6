"""The ways a rank's attempt ends before it finishes, each turned into an `Ending` for the one decision
(launch.recovery.decision): its ranks stopped together with a checkpoint saved (a preemption signal, Ctrl-C, a node
the scheduler lost, a straggler's host to leave out, the user's cancel), a hang its watchdog saw, a peer that
vanished under a collective, a rank out of device memory. A rank's other errors are no ending here: they fail the job
(launch.rank.worker)."""
from __future__ import annotations

import logging

from gpt.collectives.process_group import DistEnv, from_rank0, leave
from gpt.config.sections import WatchdogConfig
from gpt.errors import EXIT_FAILED, EXIT_USER, UserError, error_line
from gpt.resilience.progress import PROGRESS
from gpt.resilience.timing import ACTOR_WAIT_S
from gpt.train.out_of_memory import RanOutOfMemory
from gpt.train.summary import FitSummary
from gpt.run_folder import CANCELLED, CTRL_C, RunFolder
from launch import launch_config
from launch.recovery.decision import Cause, Ending, decided_elsewhere, recover
from launch.recovery.hang import detection_s
from launch.recovery.lost import end_for_lost_node, lost_peers
from launch.recovery.out_of_memory import RanOut
from launch.recovery.rounds import hosts_of
from launch.recovery.watchdog import Watchdog
from launch.run.attempts import Attempt, hang_report_name
from launch.run.job_record import cancel_requested

log = logging.getLogger(__name__)
TIME_LIMIT = "preempted:time limit"  # saved at the time limit's warning, or at the limit: a stop like a preemption


def end_stopped(attempt: Attempt, env: DistEnv, restarts: int, summary: FitSummary, record: dict) -> bool:
    """Every rank has saved (the save ends with a barrier). Rank 0 ends the attempt: a requeue (Slurm then stops
    every process of this attempt with SIGTERM, which only sets the flag now, and starts the job again with the same
    id), the chain's next link, or a spare's round for a lost node or a straggler. Returns, on every rank, whether
    the stop is as it should be: the run goes on by itself, or the user cancelled the job (the rank then exits 0,
    not as a preemption that was not requeued)."""
    goes_on = False
    if env.is_main:
        ending = why_stopped(attempt, restarts, summary, record)
        outcome = recover(ending)
        goes_on = outcome.goes_on or ending.cause is Cause.CANCELLED
        if ending.cause is Cause.CANCELLED:
            log.info("%s at step %d, checkpoint saved; %s", CANCELLED, summary.last_step, outcome.note)
        else:  # the scheduler's word on a preemption, which the signal alone does not say
            by = f": {ending.record['preempted_by']}" if "preempted_by" in ending.record else ""
            (log.info if goes_on else log.warning)("stopped at step %d after %s, checkpoint saved%s; %s",
                                                   summary.last_step, summary.preempted, by, outcome.note)
    goes_on = from_rank0(goes_on)
    leave()
    return goes_on


def why_stopped(attempt: Attempt, restarts: int, summary: FitSummary, record: dict) -> Ending:
    """Why the ranks stopped: Ctrl-C (nothing runs the job again), a node lost (how Slurm ends a lost node's job;
    one lost in an earlier round, which a spare replaced, is not), a straggler to leave out, else a preemption."""
    run_dir, job, signalled = attempt.run_dir, attempt.job, summary.preempted
    lost = job.lost_nodes() if signalled == "SIGTERM" else ""
    lost_here = tuple(h for h in hosts_of(lost) if h in attempt.nodes)
    straggler = summary.exclusion
    record = {**record, **({"straggler": straggler} if straggler else {})}
    ended = f"node failure: {lost}" if lost_here else f"preempted:{signalled}"
    if signalled == "SIGINT":
        return Ending(run_dir, job, Cause.STOPPED, CTRL_C, restarts, record=record)
    if lost_here:
        return Ending(run_dir, job, Cause.NODE_FAILURE, ended, restarts, lost_here, record)
    if cancel_requested(run_dir, job.job_id) or (signalled == "SIGTERM" and job.cancelled()):
        return Ending(run_dir, job, Cause.CANCELLED, CANCELLED, restarts, record=record)
    if straggler:
        return Ending(run_dir, job, Cause.STRAGGLER, ended, restarts, (straggler["host"],), record)
    if signalled == "SIGTERM" and (by := job.preemption()) is not None:  # not a self-requeue or a node failure
        return Ending(run_dir, job, Cause.PREEMPTED, by.said, restarts, record={**record, "preempted_by": by.said})
    if signalled in ("SIGTERM", "SIGUSR2") and (limit := job.time_limit(_warning_s(run_dir))) is not None:
        return Ending(run_dir, job, Cause.PREEMPTED, TIME_LIMIT, restarts, record={**record, "time_limit": limit})
    return Ending(run_dir, job, Cause.PREEMPTED, ended, restarts, record=record)


def _warning_s(run_dir) -> float:
    """How long before the time limit the scheduler warns the job (cluster.signal_delay_s; none: no warning)."""
    try:
        return float(launch_config.load(RunFolder(run_dir).config).cluster.signal_delay_s or 0)
    except (OSError, UserError):
        return 0.0


def start_watchdog(attempt: Attempt, env: DistEnv, watchdog: WatchdogConfig, restarts: int) -> None:
    """The rank's watchdog, from before it joins the others to its exit."""
    if watchdog.enabled:
        attempt.watchdog = Watchdog(watchdog, attempt.run_dir, env.rank, env.world_size, env.hostname, attempt.number,
                                    lambda report: end_hung_attempt(attempt, restarts, report),
                                    master=(env.master_addr, env.master_port) if env.distributed else None,
                                    restart=attempt.job.restart,
                                    report_name=hang_report_name(attempt.job, attempt.number)).start()


def end_hung_attempt(attempt: Attempt, restarts: int, report: dict | None) -> bool:
    """Called by the watchdog while the main thread is stuck. The one rank that acts (it has the report) says so
    in one line and ends the attempt, leaving out the hosts the report names gone or cut off; another rank learns
    from the attempts log what it decided. Returns whether the job runs again and stops this attempt itself (the
    rank waits for that; a packed point's rank exits, and its allocation requeues once its step has ended)."""
    run_dir, job = attempt.run_dir, attempt.job
    if report is None:
        return job.scheduler != "none" and decided_elsewhere(run_dir, job, ACTOR_WAIT_S).ends_attempt(job)
    log.error("%s", report["summary"])
    began = attempt.loop.first_step if attempt.loop else None  # hung in start-up: nothing saved since
    gone = hosts_gone(report)
    ended = f"node failure: {', '.join(gone)} gone (no heartbeat from any of its ranks)" if gone else "hang"
    return recover(Ending(run_dir, job, Cause.HANG, ended, restarts, tuple(report.get("exclude") or ()),
                          attempt.early_end(ended, hang=report["summary"], hang_report=report["report"],
                                            detection_s=detection_s(report)),
                          began=began, wait_s=ACTOR_WAIT_S)).ends_attempt(job)


def hosts_gone(report: dict) -> list[str]:
    """The hosts a hang report finds lost: every rank on them gone, none surviving (a lost node, not a hang)."""
    beats = report.get("ranks") or []
    host = [(b or {}).get("host") for b in beats]
    alive = {host[r] for r in report.get("surviving") or () if r < len(host)}
    return sorted({host[r] for r in report.get("lost") or () if r < len(host) and host[r]} - alive)


def end_out_of_memory(attempt: Attempt, error: RanOutOfMemory, restarts: int) -> int:
    """This rank ran out of device memory in a step: the one decision goes on with a smaller micro-batch (its ranks
    stop: the next round's, or the requeued job's, start with it), or stops at micro-batch 1. Another rank that ran
    out at once leaves it to the first (without a scheduler's job id it cannot read its line, and needs not: the
    launcher reads the round). Returns the rank's exit code: a failed attempt, or at micro-batch 1 a size the user
    must change (2)."""
    run_dir, job = attempt.run_dir, attempt.job
    ran_out = RanOut.of(error.record)
    began = attempt.loop.first_step if attempt.loop else None
    record = attempt.early_end(Cause.OUT_OF_MEMORY.value, with_startup=True, out_of_memory=ran_out.record())
    recover(Ending(run_dir, job, Cause.OUT_OF_MEMORY, Cause.OUT_OF_MEMORY.value, restarts, record=record, began=began,
                   wait_s=ACTOR_WAIT_S if job.scheduler != "none" else 0.0))
    return EXIT_FAILED if ran_out.next_micro_batch else EXIT_USER


def when_a_rank_vanished(attempt: Attempt, e: BaseException, max_restarts: int) -> None:
    """A collective that failed because another rank vanished (killed, or its host lost: its heartbeat stops
    without a word) ends the attempt as a hang does: reported, requeued. A rank's own error does not."""
    dog = attempt.watchdog
    if dog is None or not collective_failed(e):
        return
    if end_for_lost_node(attempt, max_restarts):  # rank 0, on the scheduler's word: no wait for silent heartbeats
        return
    dog.end(f"failed: {type(e).__name__}")
    if lost_peers(dog):
        dog.fire(f"a collective failed ({error_line(e, limit=200)})", 0.0, PROGRESS.snapshot()["idle_s"])
    PROGRESS.stop_if_halted()  # the watchdog thread ran out of budget meanwhile: it ends the attempt


def collective_failed(e: BaseException) -> bool:
    return bool(PROGRESS.failed_in) or "peer" in str(e).lower()
