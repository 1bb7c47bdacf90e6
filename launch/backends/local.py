"""The embedded default backend: a sweep point's ranks run as processes on this machine, through the same
per-rank entry point (launch.rank.worker) that srun starts on a cluster."""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import uuid
from pathlib import Path

import psutil
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from gpt.errors import EXIT_HANG, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER, UserError
from gpt.resilience.hang import newest_hang
from gpt.run_folder import RunFolder
from launch.backends import Backend, RunFailed
from launch.rank.job_env import LAUNCH_VAR, ROUND_VAR, JobEnvironment, job_environment, new_launch
from launch.rank.parent import LAUNCHER_PID, PAUSE_POLL_S
from launch.run.rounds import IN_JOB, Rounds
from launch.run.lost_rank import record_lost_rank
from launch.run.startup import attempt_start_env
from launch.rank.threads import ThreadPlan


# torch's agent logs any rank that exits non-zero ("failed (exitcode: 3) local_rank: 0 ... of binary: env"), a stop
# after Ctrl-C or a signal too; the launcher says itself what happened and what to do next, in one line (_failure)
logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)


def run_local(run_dir: Path, nodes: int, tasks_per_node: int) -> JobEnvironment:
    """The ranks, and again in a new round each time one ends in an in-job restart (launch.run.rounds); the job
    environment of the last round."""
    launch_id = new_launch()
    k = 0
    while not run_round(run_dir, nodes, tasks_per_node, {ROUND_VAR: str(k), LAUNCH_VAR: launch_id}):
        k += 1
    return job_environment({**os.environ, ROUND_VAR: str(k), LAUNCH_VAR: launch_id})


def run_round(run_dir: Path, nodes: int, tasks_per_node: int, round_env: dict[str, str]) -> bool:
    """One round of the ranks: True when they finished, False when the next round is asked for."""
    world = nodes * tasks_per_node
    # Every rank shares this machine's CPUs. The ranks get their settings in their own environment (through
    # env(1): the elastic agent copies this process's environment, which must stay as the user left it, so that
    # nothing carries over from one sweep point to the next).
    rank_env = {**ThreadPlan.decide(ranks_on_host=world).env(), **attempt_start_env(),
                "GPTLAUNCH_TASKS_PER_NODE": str(tasks_per_node), LAUNCHER_PID: str(os.getpid()), **round_env}
    job = job_environment({**os.environ, **round_env})  # the ranks' (inside an allocation, its job's)
    # Ctrl-C and SIGTERM reach the ranks too: they save at the next step and stop. The agent must not kill them
    # meanwhile (nor end in a traceback), so SIGINT and SIGTERM are left to us.
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world, rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", run_id=uuid.uuid4().hex, max_restarts=0,
                          start_method="spawn", monitor_interval=0.1, signals_to_handle="SIGHUP,SIGQUIT")
    args = [f"{k}={v}" for k, v in rank_env.items()] + [sys.executable, "-m", "launch.rank.worker", str(run_dir)]
    try:
        with _launcher_state_kept(), _signals_relayed():
            elastic_launch(config, "env")(*args)
    except ChildFailedError as e:
        rank, failure = root_failure(e)
        if failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM:  # killed, not stopped by the agent
            record_lost_rank(run_dir, rank, f"rank {rank} was killed by {signal.Signals(-failure.exitcode).name}",
                             job)
        if Rounds.of(run_dir, job).path(job.round + 1).exists():
            print(f"{_failure(run_dir, rank, failure.exitcode)}: {IN_JOB} (round {job.round + 1})", file=sys.stderr,
                  flush=True)
            return False
        if failure.exitcode in (EXIT_USER, EXIT_PREEMPTED, EXIT_INTERRUPTED):  # the user's error, or signal: 2
            raise UserError(_failure(run_dir, rank, failure.exitcode)) from None
        raise RunFailed(_failure(run_dir, rank, failure.exitcode)) from None  # a failed run: 1
    return True


def root_failure(e: ChildFailedError) -> tuple[int, ProcessFailure]:
    """The rank that failed first. A rank that died of SIGABRT comes after any other: on GPUs NCCL aborts every
    survivor of a lost or failed peer, often within the same second (the agent's timestamps are whole seconds)."""
    rank = min(e.failures, key=lambda r: (e.failures[r].exitcode == -signal.SIGABRT, e.failures[r].timestamp, r))
    return rank, e.failures[rank]


def _failure(run_dir: Path, rank: int, code: int) -> str:
    again, folder = continue_command(), RunFolder(run_dir)
    if code == EXIT_PREEMPTED:
        return (f"stopped after a signal; every rank saved a checkpoint in {folder.checkpoints}. "
                f"Continue with:\n  {again}")
    if code == EXIT_INTERRUPTED:
        return (f"stopped at once (Ctrl-C twice); the newest checkpoint in {folder.checkpoints} is kept. "
                f"Continue with:\n  {again}")
    if code == EXIT_HANG:
        return newest_hang(run_dir) or f"rank {rank}'s watchdog saw a hang; its log: {folder.logs}"
    if code < 0:
        return f"rank {rank} was killed by {signal.Signals(-code).name}; its log: {folder.log(rank)}"
    hint = "a configuration error (see above)" if code == EXIT_USER else f"exit code {code}"
    return f"rank {rank} failed with {hint}; its log: {folder.log(rank)}"


def continue_command() -> str:
    """The command this process was started with: the same command continues the run."""
    return " ".join(["python -m launch", *map(shlex.quote, sys.argv[1:])])


@contextlib.contextmanager
def _launcher_state_kept():
    """torch's elastic agent sets variables in this process (TORCHELASTIC_*); put them back after each point."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _ranks() -> list[psutil.Process]:
    """This launcher's ranks (the agent starts them in sessions of their own, out of the terminal's reach)."""
    ranks = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "launch.rank.worker" in child.cmdline():
                ranks.append(child)
    return ranks


def _send(signum: int) -> None:
    for rank in _ranks():
        with contextlib.suppress(psutil.Error):
            rank.send_signal(signum)


@contextlib.contextmanager
def _signals_relayed():
    """Ctrl-C and SIGTERM (a process manager, `kill`, a terminal closing) are passed on to the ranks: the first
    makes them save at the next step and stop; a second Ctrl-C stops them at once. Ctrl-Z pauses the ranks and
    then this launcher, and SIGCONT (`fg`, `bg`, `kill -CONT`) resumes them: each rank's session is an orphaned
    process group, where the kernel drops SIGTSTP, so the ranks get SIGSTOP, and so does this process (its own group
    may be orphaned too, as under `setsid`). A plain SIGSTOP reaches this process alone: the ranks stop themselves
    (launch.rank.parent)."""
    presses = []

    def handle(signum, frame) -> None:
        presses.append(signum)
        if len(presses) == 1:
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            print(f"\n{signal.Signals(signum).name}: every rank saves at its next step, then stops{again}",
                  file=sys.stderr, flush=True)
        _send(signum)

    def pause(signum, frame) -> None:
        _send(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)  # here until SIGCONT, whose handler resumes the ranks

    def resume(signum, frame) -> None:
        _send(signal.SIGCONT)
        # a rank that saw this launcher stopped just before (launch.rank.parent) may stop itself after that
        again = threading.Timer(2 * PAUSE_POLL_S, _send, (signal.SIGCONT,))
        again.daemon = True
        again.start()

    previous = {s: signal.signal(s, handler) for s, handler in ((signal.SIGINT, handle), (signal.SIGTERM, handle),
                                                              (signal.SIGTSTP, pause), (signal.SIGCONT, resume))}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class LocalBackend(Backend):
    name = "local"

    def run(self, plan) -> JobEnvironment:
        return run_local(plan.run_dir, plan.nodes, plan.tasks_per_node)
