"""A task wrapper never waits without a deadline for its rank: a rank stuck inside a CUDA call ignores SIGTERM (and
its watchdog may never run), so once it should end (a stop signal passed on, its attempt ended) its wrapper kills it
past the deadline and says so in one line. The rank here is a real process that ignores SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from launch import launch_config
from launch.rank.rank_watch import RankWatch
from launch.rank.signal_relay import SignalRelay

STUCK = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
OBEYS = "import time; print('up', flush=True); time.sleep(600)"


STARTED: list[subprocess.Popen] = []


def rank(code: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    STARTED.append(child)
    assert child.stdout.readline() == "up\n"  # its SIGTERM disposition is in place
    return child


@pytest.fixture(autouse=True)
def no_child_left():
    yield
    while STARTED:  # a test that failed leaves none behind
        child = STARTED.pop()
        child.kill()
        child.wait()
        child.stdout.close()


@pytest.fixture
def relay():
    relay = SignalRelay([signal.SIGTERM])
    yield relay
    relay.restore()


@pytest.mark.timeout(60)
def test_a_rank_that_ignores_the_stop_signal_is_killed_past_its_deadline(relay):
    child = rank(STUCK)
    watch = RankWatch("rank 3 on node7", ended=lambda: False, signalled_s=1.0)
    os.kill(os.getpid(), signal.SIGTERM)  # Slurm's stop, caught by the wrapper and passed on
    start = time.monotonic()
    assert relay.wait(child, lambda _signum: True, watch=watch) == -signal.SIGKILL
    assert 1.0 <= time.monotonic() - start < 20
    assert watch.killed == ("rank 3 on node7 did not end within 1 s after SIGTERM was passed on to it (stuck inside a "
                            "GPU call?): killed it (SIGKILL)")


@pytest.mark.timeout(60)
def test_a_rank_still_there_after_its_attempt_ended_is_killed(relay, tmp_path):
    child = rank(STUCK)
    line = tmp_path / "attempts.jsonl"
    watch = RankWatch("rank 0 on node1", ended=line.exists, signalled_s=600.0, ended_s=1.0, look_s=0.1)
    start = time.monotonic()
    line.write_text("{}\n")  # another rank reported the hang (and requeued, or not)
    assert relay.wait(child, lambda _signum: True, watch=watch) == -signal.SIGKILL
    assert 1.0 <= time.monotonic() - start < 20
    assert watch.killed.startswith("rank 0 on node1 did not end within 1 s after its attempt ended")


@pytest.mark.timeout(60)
def test_a_rank_that_ends_when_told_is_not_killed(relay):
    child = rank(OBEYS)
    watch = RankWatch("rank 1 on node1", ended=lambda: False, signalled_s=30.0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert relay.wait(child, lambda _signum: True, watch=watch) == -signal.SIGTERM
    assert watch.killed == ""


@pytest.mark.timeout(60)
def test_the_task_wrapper_kills_its_rank_once_another_rank_ended_the_attempt(tmp_path, monkeypatch):
    """The whole wrapper: another rank's watchdog reported the hang and wrote the attempt's line (not requeued: the
    hang repeated); this task's rank is stuck and ignores every signal it is sent. The task fails in one line."""
    from gpt.config import schema
    from helpers import compose
    from launch.backends.slurm import task
    from launch.rank import rank_watch
    from launch.recovery import standby

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}  # the wrapper catches them
    for name, value in {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "0", "SLURM_PROCID": "0",
                        "GPTLAUNCH_ROUND": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(rank_watch, "ENDED_EXIT_S", 1.0)
    monkeypatch.setattr(rank_watch, "ENDED_LOOK_S", 0.1)
    schema.save(launch_config.parse(compose("preemption.in_job_restarts=0")), tmp_path / "config.yaml")
    (tmp_path / "attempts.jsonl").write_text('{"job_id": "42", "restart": 0, "ended": "hang", "requeued": false}\n')
    monkeypatch.setattr(standby.Standby, "take", lambda self, place: rank(STUCK))
    try:
        with pytest.raises(task.RankFailed) as failed:
            task.RankTask(str(tmp_path))()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert str(failed.value).startswith("rank 0 on ") and str(failed.value).endswith(
        "did not end within 1 s after its attempt ended (stuck inside a GPU call?): killed it (SIGKILL)")
