"""A rank process that vanished without a word while its host lives (killed by a signal: `kill -9`, the OOM
killer, a segfault): its task, which started it, requeues the job, as a lost host's peers do, so that a failure
a restart fixes does not end the allocation.

Not twice in a row without progress: when the attempt before also lost a rank and this one has saved no newer
checkpoint than the one it resumed from, a crash that repeats (running out of memory at the same step) would
repeat on every restart. The job then fails with the rank named, and the same command continues the run.

The task records the attempt's line itself, then marks the rank's heartbeat ended, so that its peers (whose
collectives failed) leave the attempt to it instead of reporting a hang or a failure of their own. When several
ranks vanish at once (every rank of a node killed), one task claims the attempt (AttemptsLog.claim, the one claim of
an attempt's end) and records it and asks Slurm to requeue; the others read its line.

A rank that died of SIGABRT may be a survivor instead: on GPUs NCCL's error handling aborts every rank left once a
peer is lost or fails. Its task then names that peer (culprit_of_abort), and only the task that claims the attempt
records it. A peer
whose heartbeat stopped while no rank on its host shows life took its host with it: that host is left out of the next
round and of the requeue at once, without waiting minutes for Slurm to mark it down.

A collective failed on rank 0, and the scheduler already holds one of the attempt's nodes down or failed (an
admin's `scontrol update state=down`, a health checker that downs it, a node Slurm stopped hearing from): rank 0
ends the attempt on the scheduler's word at once, instead of waiting for the lost ranks' heartbeats to go silent
(SCHEDULER_GRACE_S and more). A spare takes the node's place in an in-job restart (launch.recovery.rounds), else the job
requeues itself (Slurm starts it on no node it holds down). One question to the scheduler per failure, from rank 0
alone: from every rank, a lost node at a thousand nodes would be thousands of calls at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from launch import launch_config
from launch.recovery.heartbeat import Liveness, all_heartbeats, end_heartbeat
from gpt.resilience.progress import PROGRESS
from gpt.resilience.timing import ABORT_GRACE_S, REQUEUE_WAIT_S, SCHEDULER_GRACE_S
from gpt.run_folder import Next, RunFolder
from launch.run.attempts import Attempt, end_attempt, log_killed, marked_attempt, this_attempts_line
from launch.rank.job_env import JobEnvironment, job_environment
from launch.run.identity import newest_step
from launch.recovery.decision import Cause, Ending, Outcome, recover
from launch.recovery.rounds import hosts_of
from launch.recovery.watchdog import Watchdog


VANISHED = "vanished: "  # how a lost rank's heartbeat ends once its task has seen it go


def requeue_for_lost_rank(run_dir: Path, rank: int, line: str, started: float,
                          gone: tuple[str, ...] = (), claimed: bool = False) -> Outcome:
    """`line` says which rank died how; `started` is when this attempt's task began; `gone`: hosts the heartbeats
    say are lost, whatever the scheduler says yet (left out of the next round and the requeue); `claimed`: this task
    claimed the attempt already (a survivor that found the culprit)."""
    job = job_environment()
    outcome = recover(Ending(run_dir, job, Cause.LOST_RANK, line, _max_restarts(run_dir), tuple(gone),
                             {"lost_rank": rank}, mark=_mark(run_dir, job, started), wait_s=SCHEDULER_GRACE_S,
                             claimed=claimed))
    end_heartbeat(run_dir, rank, f"{VANISHED}{line}")
    return outcome


def record_lost_rank(run_dir: Path, rank: int, line: str, job: JobEnvironment) -> None:
    """Without a scheduler (cluster=local), nothing requeues: the launcher restarts the ranks (launch.recovery.rounds)
    or the same command continues the run. The attempt's line names the rank killed, unless the attempt had not begun
    (no mark) or a rank wrote its line already (which removes the mark)."""
    mark = RunFolder(run_dir).attempts.read_mark()
    if mark is not None:
        recover(Ending(run_dir, job, Cause.LOST_RANK, line, _max_restarts(run_dir), record={"lost_rank": rank},
                       mark=mark))


def _mark(run_dir: Path, job: JobEnvironment, started: float) -> dict:
    """This attempt's mark; lost during start-up, one made here: nothing was saved since the newest checkpoint (a mark
    there is older, and stays for the next attempt to record)."""
    mark = RunFolder(run_dir).attempts.read_mark()
    mine = (job.job_id, job.restart, job.round, job.launch)
    if mark is not None and (mark.get("job_id"), mark.get("restart"), mark.get("round", 0),
                             mark.get("launch", "")) == mine:
        return mark
    return {"job_id": job.job_id, "restart": job.restart, "round": job.round, "started": started,
            "first_step": newest_step(run_dir), **({"launch": job.launch} if job.launch else {})}


def _max_restarts(run_dir: Path) -> int:
    return launch_config.load(RunFolder(run_dir).config).preemption.max_restarts


ABORTED = "aborted: SIGABRT"


@dataclass(frozen=True)
class Culprit:
    """The peer a rank aborted by SIGABRT answers for: NCCL's error handling (TORCH_NCCL_ASYNC_ERROR_HANDLING at its
    default) aborts every survivor once a peer is lost or fails, so a survivor's death by signal is not its own."""

    rank: int
    host: str
    how: str  # "recorded": its task recorded it lost; "failed": an error of its own; "lost": gone without a word,
    #           and no task of its recorded it (its host is gone); "aborted first": it died of SIGABRT before the rest
    code: int = 1  # a failed peer's exit code
    host_gone: bool = False  # "lost", and no rank on its host shows life (ended by its task, or beating)


def culprit_of_abort(run_dir: Path, rank: int, died_at: float, poll_s: float = 0.5) -> Culprit | None:
    """This rank's process died of SIGABRT at `died_at`: the peer really lost or failed, read from the attempts
    log and every rank's heartbeat within ABORT_GRACE_S, or None when this rank was the first to go (its own
    abort)."""
    end_heartbeat(run_dir, rank, ABORTED, aborted_at=died_at)
    liveness, deadline = Liveness(), time.monotonic() + ABORT_GRACE_S
    while (found := _evidence(run_dir, rank, liveness)) is None and time.monotonic() < deadline:
        time.sleep(poll_s)
    return found or _first_aborted(run_dir, rank)


def _evidence(run_dir: Path, rank: int, liveness: Liveness) -> Culprit | None:
    """A peer recorded lost, one that failed by itself, or one whose heartbeat has not moved for SCHEDULER_GRACE_S
    of this observer's own clock (never its wall-clock time against another host's)."""
    line = this_attempts_line(run_dir, job_environment())
    if line and line.lost_rank not in (None, rank):
        return Culprit(line.lost_rank, "", "recorded")
    every = _peers(run_dir, rank, with_self=True)  # its own heartbeat ended ABORTED: its host lives
    liveness.observe([every.get(r) for r in range(max(every, default=-1) + 1)])
    beats = {r: b for r, b in every.items() if r != rank}
    for r, beat in beats.items():
        ended = str(beat.get("ended") or "")
        if ended.startswith("exit code "):
            return Culprit(r, beat.get("host", "?"), "failed", int(ended.split()[-1]))
        if ended.startswith(VANISHED):  # its task saw it killed, though the attempt's line (a hang report, a node
            # failure another process decided) may not name it: it went before NCCL aborted anyone
            return Culprit(r, beat.get("host", "?"), "recorded")
    silent = {r for r, b in every.items() if not b.get("ended") and (liveness.silent_s(r) or 0.0) > SCHEDULER_GRACE_S}
    for r in sorted(silent - {rank}):
        host = beats[r].get("host", "?")  # a dead host's ranks went silent within a beat of each other
        alive = [q for q, b in every.items() if b.get("host") == host
                 and (b.get("ended") or (liveness.silent_s(q) or 0.0) < SCHEDULER_GRACE_S / 2)]
        return Culprit(r, host, "lost", host_gone=host not in ("", "?") and not alive)
    return None


def _first_aborted(run_dir: Path, rank: int) -> Culprit | None:
    """No peer was lost or failed: of the ranks that aborted, the first (NCCL aborts the rest after it)."""
    aborted = {r: b for r, b in _peers(run_dir, rank, with_self=True).items() if b.get("ended") == ABORTED}
    first = min(aborted, key=lambda r: (aborted[r].get("aborted_at", float("inf")), r), default=rank)
    return None if first == rank else Culprit(first, aborted[first].get("host", "?"), "aborted first")


def _peers(run_dir: Path, rank: int, with_self: bool = False) -> dict[int, dict]:
    """The heartbeats of this rank's attempt (the one its own heartbeat names), by rank, less its own."""
    beats = all_heartbeats(run_dir)
    attempt = beats.get(rank, {}).get("attempt")
    return {r: b for r, b in sorted(beats.items())
            if b.get("attempt") == attempt and (with_self or r != rank) and "time" in b}


def record_failed_peer(run_dir: Path, line: str) -> None:
    """A peer failed with an error of its own and NCCL aborted the rest: the attempt's line carries that error,
    unless a rank wrote it already (rank 0 records its own failure) or another process claimed it."""
    job = job_environment()
    mark = RunFolder(run_dir).attempts.read_mark()
    if this_attempts_line(run_dir, job) is not None or mark is None:
        return
    log_killed(run_dir, mark, newest_step(run_dir) or 0, {"ended": f"failed: {line}", "requeued": False})
    end_attempt(run_dir, marked_attempt(mark))


def end_for_lost_node(attempt: Attempt, max_restarts: int) -> bool:
    """Rank 0 (it holds the run folder's lease): True when the scheduler names a lost node among the attempt's and
    this attempt's end is recorded, here or by another process (a lost rank's task, which then decides)."""
    job = attempt.job
    if attempt.lease is None or job is None or not attempt.nodes:
        return False
    said = job.lost_nodes()
    lost = [h for h in hosts_of(said) if h in attempt.nodes]
    if not lost:
        return False
    ended = f"node failure: {said}"
    outcome = recover(Ending(attempt.run_dir, job, Cause.NODE_FAILURE, ended, max_restarts, tuple(lost),
                             attempt.early_end(ended, with_startup=True, detection_s=_unseen())))
    if outcome.next is Next.REQUEUE:  # Slurm stops this attempt; exiting first would count as a failed task
        time.sleep(REQUEUE_WAIT_S)
    return True


def _unseen() -> dict[str, float]:
    """How long the lost node went unseen: since this rank's last progress, until the scheduler named it."""
    return {"lost node": PROGRESS.snapshot()["idle_s"]}


def lost_peers(dog: Watchdog) -> list[int]:
    """After a collective failed in `dog`'s rank: the ranks that vanished (their heartbeat stopped, and they never
    said they were ending), waiting as long as a heartbeat takes to go silent. Empty when a rank said it failed:
    that rank's error is the job's, and the job fails as it should."""
    stale = max(10 * dog.cfg.interval_s, SCHEDULER_GRACE_S)  # a task Slurm saw die: Slurm ends the job first
    deadline = time.monotonic() + stale + 2 * dog.cfg.interval_s
    while time.monotonic() < deadline:
        others = [(r, b) for r, b in enumerate(dog.peers()) if r != dog.rank]
        if any(b is not None and b.get("ended") for _, b in others):
            return []
        lost = [r for r, b in others if b is not None and (dog.liveness.silent_s(r) or 0.0) > stale]
        if lost:
            return lost
        time.sleep(dog.cfg.interval_s)
    return []
