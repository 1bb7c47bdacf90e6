"""The next round's rank waits as a standby process; it starts only once this round's rank has done its imports
(both would share the node's CPUs at start-up), and asks whether it has at most once a second (a file read on the
shared file system per task)."""
from __future__ import annotations

import os
import sys
import time

from launch.rank.round_agent import LOOK_S, RoundAgent
from launch.rank.job_env import JobEnvironment
from launch.rank.standby import ASK_S, Standby


def test_a_standby_starts_once_the_rounds_rank_is_up_asking_once_a_second(tmp_path):
    standby = Standby(str(tmp_path), dict(os.environ), [])
    standby.command = [sys.executable, "-c", "import sys; sys.stdin.read()"]
    asked = []

    def up() -> bool:
        asked.append(time.monotonic())
        return len(asked) >= 2
    try:
        standby.start_when_up(up)
        standby.start_when_up(up)
        assert standby.proc is None and len(asked) == 1
        time.sleep(ASK_S + 0.05)
        standby.start_when_up(up)
        assert standby.proc is not None and standby.proc.poll() is None and len(asked) == 2
        standby.start_when_up(up)
        assert len(asked) == 2  # started: no more questions
    finally:
        standby.stop()


def test_a_task_looks_for_the_next_round_once_a_second_and_keeps_what_it_found(tmp_path):
    agent = RoundAgent(tmp_path, JobEnvironment({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}), "h")
    assert not agent.next_asked(0)
    agent.rounds.path(1).parent.mkdir(parents=True, exist_ok=True)
    agent.rounds.path(1).write_text("{}")
    assert not agent.next_asked(0)  # looked less than a second ago
    time.sleep(LOOK_S + 0.05)
    assert agent.next_asked(0) and agent.next_asked(0)
