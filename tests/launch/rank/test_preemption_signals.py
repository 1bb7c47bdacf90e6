"""preemption.signals reach every process that passes signals on to a rank: the task wrapper (it catches them,
starts the rank ignoring them, and passes them on once the rank handles them) and srun's launcher (the tasks start
ignoring them; it catches them and passes them on once every rank is up). The processes are stood in for here;
tests/slurm/test_preemption.py signals real jobs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt.config import schema
from launch import launch_config
from gpt.errors import UserError
from gpt.run_folder import RunFolder
from launch.rank.job_env import ROUND_VAR
from launch.run.startup import STEP_TOKEN
from helpers import REPO, compose
from launch.backends import srun
from launch.backends.slurm import task
from launch.recovery import standby

WATCHED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


@pytest.fixture(autouse=True)
def own_handlers():
    """Default handlers while a test runs (an earlier test may have left its own), and the earlier ones after."""
    before = {s: signal.signal(s, signal.SIG_DFL) for s in WATCHED}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    schema.save(launch_config.parse(compose("preemption.signals=[SIGTERM,SIGUSR1]")), tmp_path / "config.yaml")
    return tmp_path


class Child:
    """A stand-in for the process a wrapper starts: `on_wait` runs at its first wait, which then times out once."""

    def __init__(self, cmd, on_wait=None, **kwargs):
        self.cmd, self.kwargs, self.on_wait = cmd, kwargs, on_wait
        self.pid, self.sent, self.waits = os.getpid(), [], 0

    def wait(self, timeout=None):
        self.waits += 1
        if self.waits == 1:
            self.on_wait(self)
            raise subprocess.TimeoutExpired(self.cmd, timeout)
        return 0

    def send_signal(self, signum):
        self.sent.append(signum)


def starting(children: list[Child], on_wait):
    """A Popen that starts a Child (kept in `children`) whose first wait runs `on_wait`."""
    def start(cmd, **kwargs):
        children.append(Child(cmd, on_wait, **kwargs))
        return children[-1]
    return start


def caught(signum) -> bool:
    return callable(signal.getsignal(signum))


def test_the_task_wrapper_catches_ignores_and_passes_on_the_configured_signals(run_dir, monkeypatch):
    def signalled(child):
        assert caught(signal.SIGTERM) and caught(signal.SIGUSR1) and not caught(signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)  # the rank handles it (this process stands in for it)

    children: list[Child] = []
    monkeypatch.setattr(standby.subprocess, "Popen", starting(children, signalled))  # the wrapper starts its rank there
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv(ROUND_VAR, "0")  # the wrapper sets its round in this process's environment: undone after
    assert task.RankTask(str(run_dir))()["rank"] == 0
    [child] = children
    assert child.sent == [signal.SIGUSR1]
    child.kwargs["preexec_fn"]()  # what the rank starts with
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN == signal.getsignal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGUSR2) != signal.SIG_IGN


def test_srun_starts_the_tasks_ignoring_the_configured_signals_and_passes_them_on(run_dir, monkeypatch):
    folder = RunFolder(run_dir)

    def signalled(child):
        assert caught(signal.SIGTERM) and caught(signal.SIGUSR1) and caught(signal.SIGINT)
        assert not caught(signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        folder.environment.mkdir()
        for rank in range(2):  # every rank is up: its record carries the token of this srun step
            folder.environment_record(rank).write_text(json.dumps({"step": child.kwargs["env"][STEP_TOKEN]}))

    children: list[Child] = []
    monkeypatch.setattr(srun.subprocess, "Popen", starting(children, signalled))
    srun.run_srun(run_dir, 1, 2)
    [child] = children
    assert 'trap "" TERM USR1; exec "$0" "$@"' in child.cmd
    assert child.sent == [signal.SIGUSR1]
    assert not caught(signal.SIGUSR1)  # the launcher's own handlers are back


def test_srun_holds_a_signal_until_every_rank_is_up(run_dir, monkeypatch):
    children: list[Child] = []
    monkeypatch.setattr(srun.subprocess, "Popen", starting(children, lambda child: os.kill(os.getpid(), signal.SIGTERM)))
    srun.run_srun(run_dir, 1, 2)
    assert children[0].sent == []  # no rank wrote its environment record: none handles signals yet


def test_without_a_readable_config_srun_starts_nothing_and_says_why_in_one_line(tmp_path, monkeypatch):
    """The run's config has one reader (gpt.config.schema.load) and one failure: no step with guessed signals."""
    children: list[Child] = []
    monkeypatch.setattr(srun.subprocess, "Popen", starting(children, lambda child: None))
    with pytest.raises(UserError, match=f"the run's config {tmp_path / 'config.yaml'} cannot be read"):
        srun.run_srun(tmp_path, 1, 1)
    assert children == []


RANK = """
import os, signal, sys, time
from launch.rank.parent import end_with_launcher
signal.signal(signal.SIGUSR2, lambda *_: (open(sys.argv[1], "w").write("SIGUSR2"), sys.exit(0)))
end_with_launcher(signal.SIGUSR2)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
"""
LAUNCHER = """
import os, subprocess, sys, time
os.environ["GPTLAUNCH_LAUNCHER_PID"] = str(os.getpid())
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(60)
"""


def test_a_rank_gets_its_preemption_signal_when_its_launcher_is_killed_outright(tmp_path):
    """preemption.signals=[SIGUSR2] (no SIGTERM): a rank whose launcher dies of kill -9 is sent SIGUSR2, which it
    handles (saves and stops), not SIGTERM, which would kill it without a save."""
    said = tmp_path / "said"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(said)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{said}.ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while not (said.exists() and said.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert said.read_text() == "SIGUSR2"
    finally:
        launcher.kill()


def test_one_task_per_node_asks_slurm_whether_a_preemption_came_before_its_handlers(monkeypatch):
    """8 tasks on 2 nodes start while Slurm preempts the job: the node's first task (SLURM_LOCALID 0) asks scontrol
    and takes the SIGTERM it missed as caught; the others do not ask (every task asked: 2,048 calls to slurmctld
    within a second), and their ranks save all the same, the flag being OR-reduced across ranks."""
    from types import SimpleNamespace

    from launch.backends.slurm.job import SlurmJob
    from launch.rank.job_env import Preemption

    asked = []
    monkeypatch.setattr(SlurmJob, "preemption", lambda job: asked.append(job) or Preemption("preempted", True))
    relays = [SimpleNamespace(previous={signal.SIGTERM: signal.SIG_IGN}, received=[]) for _ in range(8)]
    for t, relay in enumerate(relays):
        task.missed_preemption(relay, SlurmJob({"SLURM_JOB_ID": "7", "SLURM_PROCID": str(t),
                                                "SLURM_LOCALID": str(t % 4), "SLURM_NODEID": str(t // 4)}))
    assert len(asked) == 2  # before: 8
    assert [r.received for r in relays] == [[signal.SIGTERM], [], [], [], [signal.SIGTERM], [], [], []]
