"""The embedded default backend: a sweep point's ranks run as processes on this machine, through the same
per-rank entry point (launch.worker) that srun starts on a cluster."""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import uuid
from pathlib import Path

import psutil
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from gpt.errors import EXIT_HANG, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER, UserError
from gpt.hang_report import newest_hang
from launch.backends import Backend, RunFailed
from launch.parent import LAUNCHER_PID
from launch.startup import attempt_start_env
from launch.threads import ThreadPlan


def run_local(run_dir: Path, nodes: int, tasks_per_node: int) -> None:
    world = nodes * tasks_per_node
    # Every rank shares this machine's CPUs. The ranks get their settings in their own environment (through
    # env(1): the elastic agent copies this process's environment, which must stay as the user left it, so that
    # nothing carries over from one sweep point to the next).
    rank_env = {**ThreadPlan.decide(ranks_on_host=world).env(), **attempt_start_env(),
                "GPTLAUNCH_TASKS_PER_NODE": str(tasks_per_node), LAUNCHER_PID: str(os.getpid())}
    # Ctrl-C reaches the ranks too (one process group): they save at the next step and stop. The agent must
    # not kill them meanwhile, so SIGINT is left to us.
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world, rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", run_id=uuid.uuid4().hex, max_restarts=0,
                          start_method="spawn", monitor_interval=0.1, signals_to_handle="SIGTERM,SIGHUP,SIGQUIT")
    args = [f"{k}={v}" for k, v in rank_env.items()] + [sys.executable, "-m", "launch.worker", str(run_dir)]
    try:
        with _launcher_state_kept(), _ctrl_c_saves():
            elastic_launch(config, "env")(*args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == EXIT_HANG:  # a failed run, not the user's error
            raise RunFailed(_failure(run_dir, rank, failure.exitcode)) from None
        raise UserError(_failure(run_dir, rank, failure.exitcode)) from None


def _failure(run_dir: Path, rank: int, code: int) -> str:
    again = continue_command()
    if code == EXIT_PREEMPTED:
        return (f"stopped after a signal; every rank saved a checkpoint in {run_dir / 'checkpoints'}. "
                f"Continue with:\n  {again}")
    if code == EXIT_INTERRUPTED:
        return (f"stopped at once (Ctrl-C twice); the newest checkpoint in {run_dir / 'checkpoints'} is kept. "
                f"Continue with:\n  {again}")
    if code == EXIT_HANG:
        return newest_hang(run_dir) or f"rank {rank}'s watchdog saw a hang; its log: {run_dir / 'logs'}"
    hint = "a configuration error (see above)" if code == EXIT_USER else f"exit code {code}"
    return f"rank {rank} failed with {hint}; its log: {run_dir / 'logs' / f'rank{rank}.log'}"


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


@contextlib.contextmanager
def _ctrl_c_saves():
    """Ctrl-C is passed on to the ranks (the agent starts them in sessions of their own, out of the
    terminal's reach): the first makes them save at the next step and stop; a second stops them at once."""
    presses = []

    def handle(signum, frame) -> None:
        presses.append(signum)
        if len(presses) == 1:
            print("\nCtrl-C: every rank saves at its next step, then stops (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "launch.worker" in child.cmdline():
                    child.send_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class LocalBackend(Backend):
    name = "local"

    def run(self, plan) -> None:
        run_local(plan.run_dir, plan.nodes, plan.tasks_per_node)
