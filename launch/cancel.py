"""`python -m launch.cancel RUN_OR_SWEEP [--now]`: stop a run's or a sweep's jobs, saving first.

Without --now each running job gets the run's preemption signal (preemption.signals, USR2 by default), as a time
limit's warning would: every rank saves at the same step and, told by the run folder (cancel.json) that the user
cancels the job, stops without requeueing it; once it has left the running state (or after --wait-s) it is
cancelled, pending jobs at once. The same launch command continues the run from that checkpoint. --now cancels at
once, as a plain scancel: the ranks save if they can within Slurm's KillWait, unwaited for (the run continues from its
newest whole checkpoint). A packed allocation (hydra.launcher.pack) is one job of
several runs: each of them is told, the packer then requeues nothing (launch.recovery.packed), and the cancel waits
for every one of its running points to save. A sweep's report job is left to run: it builds the report of what was
done. A detached search's job is cancelled first, at once: it would launch the trials again (its study keeps them
running, and the same command goes on with the search). When the scheduler does not answer it says so and exits 1:
an outage is not "no job". Torch-free: it runs on a login node.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gpt.run_folder import RunFolder
from gpt.errors import UserError
from launch.backends import Queue, scheduler
from launch.backends.job_state import JobState, SchedulerUnavailable
from launch.run.job_record import cancelled_by_user, request_cancel, withdraw_cancel
from launch.run_status import SEARCH_JOB, ask_scheduler, job_ids, run_folders, sweep_job

WAIT_S = 300.0  # how long a signalled job may take to save and requeue before it is cancelled anyway
POLL_S = 0.5


def preemption_signal(run_dir: Path) -> str:
    from gpt.resilience.preemption import configured_signals

    names = [s.name.removeprefix("SIG") for s in configured_signals(RunFolder(run_dir).config)]
    return "USR2" if "USR2" in names or not names else names[0]  # USR2: what a time limit's warning sends


def cancel(target: Path, now: bool = False, wait_s: float = WAIT_S, out=sys.stdout) -> int:
    by_job: dict[str, list[Path]] = {}  # a packed allocation's job runs several
    for r in run_folders(target):
        for j in job_ids(r):
            by_job.setdefault(j, []).append(r)
    try:
        _cancel_search(target, out)
        infos = ask_scheduler(sorted(by_job))
    except SchedulerUnavailable as e:  # not "no job": its jobs may wait or run
        return _unanswered(e, "nothing was cancelled or signalled")
    live = {j: i for j, i in infos.items() if i.state.live}
    if not live:
        print(f"no job of {target} is pending or running", file=out)
        return 0
    if theirs := sorted(j for j, i in live.items() if i.theirs):  # nothing is written, nothing signalled
        print(f"error: job(s) {' '.join(theirs)} of {target} belong to another user: only they (or the scheduler's "
              "administrator) can cancel them", file=sys.stderr)
        return 2
    running = [j for j, i in live.items() if i.state != JobState.PENDING]
    first = sorted(set(live) - set(running)) if not now and running else []
    jobs = scheduler()
    try:  # each run's signal, read before anything is sent or written: a config that cannot be read stops nothing
        signals = {j: preemption_signal(by_job[j][0]) for j in running} if not now else {}
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        jobs.cancel(first)  # the pending ones first: no later link of a chain may start once a link has saved
        if signals:
            for j, name in signals.items():  # the steps only (not the batch shell): the ranks save, and stop as asked
                signal_saving(jobs, by_job[j], j, name)
            print(f"sent the preemption signal to job(s) {' '.join(running)}: their ranks save a checkpoint",
                  file=out, flush=True)
            _wait_off_running(running, wait_s,
                              lambda: all(cancelled_by_user(r, j) for j in running for r in by_job[j]))
        jobs.cancel(sorted(set(live) - set(first)))
    except SchedulerUnavailable as e:
        return _unanswered(e, f"job(s) {' '.join(sorted(live))} may not all be cancelled")
    print(f"cancelled job(s) {' '.join(sorted(live))}; the same launch command continues the run(s) from their newest "
          "checkpoint", file=out)
    return 0


def _cancel_search(target: Path, out) -> None:
    job = sweep_job(target, SEARCH_JOB)
    if job and any(i.state.live for i in ask_scheduler([job]).values()):
        scheduler().cancel([job])
        print(f"cancelled the search's job {job}; the same command goes on with the search", file=out, flush=True)


def _unanswered(error: SchedulerUnavailable, done: str) -> int:
    print(f"error: {error.scheduler} does not answer ({error}): {done}; run this command again once it answers",
          file=sys.stderr)
    return 1


def signal_saving(jobs: Queue, run_dirs: list[Path], job_id: str, name: str) -> None:
    """The request first, in every run folder of the job (a rank reads it once it has saved at the signal, to stop as
    cancelled rather than requeue; a packer, not to requeue the allocation), then the signal; a signal that fails
    takes its requests back: a request no signal follows would make the job's next preemption read as the user's
    cancel."""
    for run_dir in run_dirs:
        request_cancel(run_dir, [job_id])
    try:
        jobs.cancel([job_id], signal=name)
    except BaseException:
        for run_dir in run_dirs:
            withdraw_cancel(run_dir, job_id)
        raise


def _wait_off_running(job_ids: list[str], wait_s: float, saved: Callable[[], bool]) -> None:
    """Until every job's ranks saved and stopped as cancelled (the cancel then ends the job as the scheduler's own
    cancel would), or no job runs, at most wait_s."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if saved():
            return
        try:
            if not any(i.state in (JobState.RUNNING, JobState.ENDING) for i in ask_scheduler(job_ids).values()):
                return
        except SchedulerUnavailable:
            pass  # the run folders still say when the ranks have saved
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.cancel", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (runs/NAME) or a sweep folder (runs/sweeps/NAME)")
    parser.add_argument("--now", action="store_true",
                        help="cancel at once (scancel): the ranks save only if they can within KillWait")
    parser.add_argument("--wait-s", type=float, default=WAIT_S, help="the longest wait for the save (seconds)")
    args = parser.parse_args(argv)
    if not run_folders(args.run):
        print(f"error: no run folder at or under {args.run} (a folder with a config.yaml)", file=sys.stderr)
        sys.exit(2)
    sys.exit(cancel(args.run, args.now, args.wait_s))


if __name__ == "__main__":
    main()
