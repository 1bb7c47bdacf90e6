"""The next round's rank waits as a standby process; it starts only once this round's rank has done its imports
(both would share the node's CPUs at start-up), and asks whether it has at most once a second (a file read on the
shared file system per task). A spare waits for its round's end, and not beyond its round's silence."""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from gpt.config import schema
from launch import launch_config
from gpt.resilience.lease import Lease
from gpt.resilience.timing import ENDED_EXIT_S, LEASE_BEAT_S, ROUND_SILENT_S
from gpt.run_folder import RunFolder
from helpers import compose
from launch.recovery.round_agent import LOOK_S, RoundAgent, RoundSilent
from launch.rank.job_env import ROUND_VAR, JobEnvironment, job_environment
from launch.recovery.standby import ASK_S, Standby
from launch.recovery.rounds import Rounds


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
    schema.save(launch_config.parse(compose("preemption.in_job_restarts=1")), RunFolder(tmp_path).config)
    agent = RoundAgent(tmp_path, JobEnvironment({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}), "h")
    assert not agent.next_asked(0)
    agent.rounds.path(1).parent.mkdir(parents=True, exist_ok=True)
    agent.rounds.path(1).write_text("{}")
    assert not agent.next_asked(0)  # looked less than a second ago
    time.sleep(LOOK_S + 0.05)
    assert agent.next_asked(0) and agent.next_asked(0)


def test_the_tasks_of_a_node_share_one_look_at_the_run_folder_per_interval(tmp_path, monkeypatch):
    """8 task wrappers on 2 nodes: the look for the next round (each second) and for the attempt's line (every
    ENDED_LOOK_S) reach the run folder once per node, not once per task (2,048 tasks on 256 nodes made 2,048 lookups
    a second); every task still sees the next round asked, a second later at most, and the last one cleans up."""
    from pathlib import Path

    from gpt.resilience.timing import ENDED_LOOK_S
    from gpt.run_folder import AttemptsLog
    from launch.recovery.node_heartbeat import node_local_dir

    schema.save(launch_config.parse(compose("preemption.in_job_restarts=1")), RunFolder(tmp_path).config)
    env = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}
    agents = [RoundAgent(tmp_path, JobEnvironment(env), f"n{t // 4}") for t in range(8)]
    for agent in agents:
        agent.share_on_node()
    following, looks, lines, clock = agents[0].rounds.path(1), [], [], [1000.0]
    real_exists, real_line = Path.exists, AttemptsLog.line_of
    monkeypatch.setattr(Path, "exists", lambda p, *a: (looks.append(p) if p == following else 0, real_exists(p, *a))[1])
    monkeypatch.setattr(AttemptsLog, "line_of", lambda log, *a: (lines.append(a), real_line(log, *a))[1])
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    for _ in range(5):
        clock[0] += ENDED_LOOK_S  # as often as each task's RankWatch asks
        assert not any(agent.attempt_ended(0) for agent in agents)
    for _ in range(5):
        clock[0] += LOOK_S
        assert not any(agent.next_asked(0) for agent in agents)
    assert (len(lines), len(looks)) == (5 * 2, 5 * 2)  # before: 5 * 8 each
    following.parent.mkdir(parents=True, exist_ok=True)
    following.write_text("{}")
    clock[0] += LOOK_S
    assert all(agent.next_asked(0) for agent in agents)
    for agent in agents:
        agent.release()
    assert not node_local_dir(tmp_path, "n0").parent.exists()


def test_without_in_job_restarts_a_task_never_looks_for_a_next_round(tmp_path, monkeypatch):
    """No round follows (launch.recovery.rounds.in_job_restart): the wrapper's once-a-second look would be a metadata
    operation per task per second on the shared file system, for nothing."""
    schema.save(launch_config.parse(compose("preemption.in_job_restarts=0")), RunFolder(tmp_path).config)
    agent = RoundAgent(tmp_path, JobEnvironment({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}), "h")
    looked = []
    monkeypatch.setattr(Rounds, "path", lambda self, k: looked.append(k))  # any lookup would fail here
    assert not agent.next_asked(0) and not agent.next_asked(0, now=True)
    assert looked == []


@pytest.mark.slow
def test_a_standby_rank_by_default_on_gpu_ranks_only(tmp_path, monkeypatch):
    """preemption.standby_rank=auto: a GPU node's CPUs have room for the standby's imports; a CPU rank computes on
    every CPU its task has, so there the next round's rank starts when it is needed."""
    from gpt.config.sections import PreemptionConfig
    from gpt.errors import ConfigError
    from gpt.run_folder import RunFolder
    from helpers import plan
    from launch.backends.slurm.task import standby_wanted

    assert PreemptionConfig().standby("cuda") and not PreemptionConfig().standby("cpu")
    assert PreemptionConfig(standby_rank=True).standby("cpu") and not PreemptionConfig(standby_rank=False).standby("cuda")
    with pytest.raises(ConfigError, match="preemption.standby_rank"):
        PreemptionConfig(standby_rank="sometimes").validate()
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    folder = RunFolder(plan(tmp_path / "auto", "model=tiny"))
    assert not standby_wanted(folder)  # train.device=auto on a node Slurm gave no GPU
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    assert standby_wanted(folder)
    assert not standby_wanted(RunFolder(plan(tmp_path / "off", "model=tiny", "preemption.standby_rank=false")))
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    assert standby_wanted(RunFolder(plan(tmp_path / "on", "model=tiny", "preemption.standby_rank=true")))


def test_a_disabled_standby_starts_nothing_and_a_round_still_gets_its_rank(tmp_path):
    standby = Standby(str(tmp_path), dict(os.environ), [], enabled=False)
    standby.command = [sys.executable, "-c", "pass"]
    standby.start()
    standby.start_when_up(lambda: True)
    assert standby.proc is None
    proc = standby.take({})
    assert proc.wait(timeout=30) == 0


def spare(run_dir, *overrides: str) -> RoundAgent:
    """Task 1 of job 7 on host b, a spare node (cluster.spare_nodes=1) while round 0 runs on host a."""
    schema.save(launch_config.parse(compose("cluster=srun", "cluster.spare_nodes=1", *overrides)),
                RunFolder(run_dir).config)
    env = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0", "SLURM_JOB_NODELIST": "a,b", ROUND_VAR: "0"}
    return RoundAgent(run_dir, job_environment(env), "b")


def test_a_spares_deadline_is_the_runs_longest_watchdog_budget_then_a_fired_ranks_exit(tmp_path):
    agent = spare(tmp_path, "watchdog.save_first_s=1800")
    assert agent.silent_s == 1800 + 60 + ROUND_SILENT_S
    assert spare(tmp_path).silent_s == launch_config.parse(compose()).watchdog.process_group_timeout() + ROUND_SILENT_S
    assert ROUND_SILENT_S < ENDED_EXIT_S  # the requeued rank's wait for Slurm comes after its line


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_spare_waits_while_its_round_beats_and_ends_in_one_line_once_it_fell_silent(tmp_path):
    """Under --no-kill a round whose ranks all ended without a line in the attempts log (and asked for no next
    round) leaves nothing else to end a spare's task: it ends once the round showed no sign of life (rank 0's beat
    of the lease) for its deadline, instead of holding the node to the job's time limit."""
    agent = spare(tmp_path)
    agent.silent_s = 3 * LEASE_BEAT_S  # the run's own is minutes (above)
    lease = Lease.take(tmp_path, 0, "7", 0, 0)
    lease.start(beat_s=0.2)
    ended: list[BaseException | int | None] = []

    def wait() -> None:
        try:
            ended.append(agent.idle(0))
        except RoundSilent as e:
            ended.append(e)
    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(agent.silent_s + 3)
    assert waiter.is_alive() and not ended  # the round beats: the spare waits on
    lease.release()  # the round's ranks are gone, without a line
    gone = time.monotonic()
    waiter.join(agent.silent_s + 2 * LEASE_BEAT_S + 5)
    assert ended and isinstance(ended[0], RoundSilent), ended
    assert time.monotonic() - gone >= agent.silent_s - LEASE_BEAT_S
    said = str(ended[0])
    assert said.startswith("b waited as a spare in round 0 of job 7 (restart 0), which showed no sign of life for ")
    assert f"wrote no line in {RunFolder(tmp_path).attempts.log}" in said and "\n" not in said


def test_a_spare_ends_quietly_once_its_rounds_line_says_the_run_goes_no_further(tmp_path):
    agent = spare(tmp_path)
    RunFolder(tmp_path).attempts.append("7", 0, {"ended": "finished"})
    assert agent.idle(0) is None
