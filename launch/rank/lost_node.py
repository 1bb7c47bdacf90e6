"""A collective failed on rank 0, and the scheduler already holds one of the attempt's nodes down or failed (an
admin's `scontrol update state=down`, a health checker that downs it, a node Slurm stopped hearing from): rank 0
ends the attempt on the scheduler's word at once, instead of waiting for the lost ranks' heartbeats to go silent
(SCHEDULER_GRACE_S and more). A spare takes the node's place in an in-job restart (launch.run.rounds), else the job
requeues itself (Slurm starts it on no node it holds down). One question to the scheduler per failure, from rank 0
alone: from every rank, a lost node at a thousand nodes would be thousands of calls at once."""
from __future__ import annotations

import time

from gpt.resilience.timing import REQUEUE_WAIT_S
from gpt.run_folder import Next
from launch.run.attempts import Attempt
from launch.run.recovery import Cause, Ending, recover
from launch.run.rounds import hosts_of


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
                             attempt.early_end(ended, with_startup=True)))
    if outcome.next is Next.REQUEUE:  # Slurm stops this attempt; exiting first would count as a failed task
        time.sleep(REQUEUE_WAIT_S)
    return True
