"""Survivors that NCCL aborts: with TORCH_NCCL_ASYNC_ERROR_HANDLING at its default, every rank left after a peer is
lost or fails dies of SIGABRT. The task wrapper must not take them for lost ranks: one requeue per attempt, one
attempts line naming the rank really lost (or carrying the peer's own error). The task's child is replaced by one
that died of SIGABRT, and Slurm's commands are replaced; tests/slurm/test_preemption.py runs it for real."""
from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest

from gpt.config import schema
from launch import launch_config
from helpers import compose, launch
from launch.backends import local
from launch.backends.slurm import commands, task
from launch.recovery import standby
from launch.recovery import lost


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setattr(task, "REQUEUE_WAIT_S", 0.0)
    monkeypatch.setattr(lost, "ABORT_GRACE_S", 1.0)
    monkeypatch.setenv("GPTLAUNCH_ROUND", "0")  # the task sets it for its rank: restored after the test
    # the requeue (tests/launch/test_in_job_restart_local.py and tests/slurm/test_in_job_restart.py restart in the job)
    schema.save(launch_config.parse(compose("preemption.max_restarts=5", "preemption.in_job_restarts=0")),
                tmp_path / "config.yaml")
    (tmp_path / "watchdog").mkdir()
    (tmp_path / "attempt.json").write_text(json.dumps({"job_id": "42", "restart": 0, "started": 1.0,
                                                      "first_step": 0}))
    for rank in range(3):
        beat(tmp_path, rank)
    return tmp_path


@pytest.fixture
def excluded(monkeypatch) -> list[tuple[str, list[str]]]:
    """The ExcNodeList updates asked of Slurm; the partition (sinfo) has n1-n4, and Slurm holds none down yet."""
    updates: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(commands, "exclude_nodes", lambda job, nodes: updates.append((job, nodes)))
    monkeypatch.setattr(commands, "run", lambda *cmd, **kw: "n1\nn2\nn3\nn4\n" if cmd[0] == "sinfo" else
                        pytest.fail(f"ran {cmd}"))
    monkeypatch.setattr(commands, "lost_nodes", lambda nodelist: "")
    return updates


def beat(run_dir: Path, rank: int, **extra) -> None:
    record = {"rank": rank, "host": f"n{rank + 1}", "attempt": 1, "time": time.time(), "ended": None, **extra}
    (run_dir / "watchdog" / f"rank{rank}.json").write_text(json.dumps(record))


def lines(run_dir: Path) -> list[dict]:
    f = run_dir / "attempts.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


class Relay:
    """No signal handlers in the test process: the child's exit code, at once."""

    def __init__(self, signals):
        self.received: list[int] = []
        self.previous: dict = {}

    def wait(self, child, ready, stop=None, watch=None) -> int:
        return child.wait()


def task_of(rank: int, code: int, monkeypatch) -> task.RankTask:
    """Rank `rank`'s task, whose child ends with `code` (-6: SIGABRT)."""
    class Child:
        pid = 0

        def __init__(self, *args, **kwargs):
            pass

        def wait(self, timeout=None) -> int:
            return code

    monkeypatch.setenv("SLURM_PROCID", str(rank))
    monkeypatch.setattr(standby.subprocess, "Popen", Child)
    monkeypatch.setattr(task, "SignalRelay", Relay)
    return task.RankTask


def run_task(run_dir: Path, rank: int, code: int, monkeypatch) -> str:
    with pytest.raises(task.RankFailed) as failed:
        task_of(rank, code, monkeypatch)(str(run_dir))()
    return str(failed.value)


def test_survivors_aborted_after_a_killed_peer_name_it_and_requeue_once(run_dir, asked, excluded, monkeypatch):
    """Rank 1 is killed (kill -9); NCCL then aborts ranks 0 and 2. One requeue, one line, naming rank 1; its host
    lives (its task recorded it), so the job may run there again."""
    killed = run_task(run_dir, 1, -signal.SIGKILL, monkeypatch)
    assert "rank 1 on " in killed and "killed by SIGKILL" in killed, killed
    for survivor in (0, 2):
        said = run_task(run_dir, survivor, -signal.SIGABRT, monkeypatch)
        assert said.endswith("stopped because rank 1 was lost"), said
    assert asked == ["42"] and excluded == []
    (line,) = lines(run_dir)
    assert line["lost_rank"] == 1 and line["requeued"] is True and "killed by SIGKILL" in line["ended"], line


def test_survivors_aborted_after_a_peer_raised_show_its_error_and_do_not_requeue(run_dir, asked, monkeypatch):
    """Rank 1 fails with a Python error of its own (its heartbeat says how it exited); the survivors NCCL aborted
    carry that error to the user, and the job fails as it should: no requeue, one line with the error."""
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "rank1.log").write_text("[rank1 00:00:01 ERROR] rank failed\nTraceback (most recent call "
                                                "last):\n  File \"x.py\", line 1\nValueError: a bad batch\n")
    beat(run_dir, 1, ended="exit code 1")
    said = [run_task(run_dir, r, -signal.SIGABRT, monkeypatch) for r in (0, 2)]
    for survivor, line in zip((0, 2), said):
        assert line.startswith(f"rank {survivor} on {socket.gethostname()} was aborted (SIGABRT"), line
        assert "rank 1 on n2 exited with code 1: ValueError: a bad batch" in line, line
    assert asked == []
    (line,) = lines(run_dir)
    assert line["ended"].startswith("failed: rank 1 on n2 exited with code 1: ValueError: a bad batch"), line
    assert "lost_rank" not in line


def test_survivors_of_a_lost_host_name_it_and_one_of_them_requeues_without_it(run_dir, asked, excluded, monkeypatch):
    """Rank 1 went with its host: no task of its records anything, and its heartbeat stopped. The survivors name
    it; the first to claim the attempt requeues, once, and keeps the job off that host though Slurm does not hold
    it down yet (it takes minutes to)."""
    monkeypatch.setattr(lost, "SCHEDULER_GRACE_S", 0.5)  # silent that long while the survivor watches
    beat(run_dir, 1, time=time.time() - 60)
    beat(run_dir, 2, ended=lost.ABORTED, aborted_at=time.time())
    first = run_task(run_dir, 0, -signal.SIGABRT, monkeypatch)
    second = run_task(run_dir, 2, -signal.SIGABRT, monkeypatch)
    assert first.startswith("rank 1 on n2 was lost (its heartbeat stopped)"), first
    assert second.endswith("stopped because rank 1 was lost"), second
    assert asked == ["42"] and excluded == [("42", ["n2"])]
    (line,) = lines(run_dir)
    assert line["lost_rank"] == 1 and line["requeued"] is True, line
    assert line["note"].endswith("requeued job 42 (restart 1 of at most 5), without n2 (ExcNodeList)"), line


@pytest.mark.slow
def test_the_next_round_runs_on_a_spare_in_place_of_the_lost_host(run_dir, asked, excluded, monkeypatch):
    """In-job restarts: the round after the lost host's runs on the spare (n4), not on n2 again (whose rendezvous it
    would wait out), though Slurm does not hold n2 down yet; the survivor's task goes on to that round."""
    monkeypatch.setattr(lost, "SCHEDULER_GRACE_S", 0.5)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-4]")
    monkeypatch.setattr(commands, "hostnames", {"n[1-4]": ["n1", "n2", "n3", "n4"]}.get)
    monkeypatch.setattr(commands, "dropped_nodes", lambda job, nodelist: [])
    schema.save(launch_config.parse(compose("cluster=srun", "cluster.spare_nodes=1", "preemption.max_restarts=5")),
                run_dir / "config.yaml")
    beat(run_dir, 1, time=time.time() - 60)
    went_on = task.RankTask(str(run_dir)).aborted(0, "n1", time.time(), next_round=lambda: False)
    assert went_on is True
    request = json.loads((run_dir / "rounds" / "job42-restart0" / "round-1.json").read_text())
    assert (request["hosts"], request["replaced"]) == (["n1", "n4", "n3"], {"n2": "n4"}), request
    assert asked == [] and excluded == []
    (line,) = lines(run_dir)
    assert (line["lost_rank"], line["in_job_restart"], line["replaced"]) == (1, 1, {"n2": "n4"}), line
    # another survivor reads the loss recorded, and its task goes on to that round too
    assert task.RankTask(str(run_dir)).aborted(2, "n3", time.time(), next_round=lambda: True) is True


def test_a_silent_rank_whose_host_still_shows_life_keeps_its_host(run_dir, monkeypatch):
    """Rank 1's heartbeat stopped, but rank 2 on the same host was aborted by its task (which lives there): the
    host is not gone, and only Slurm's word would leave it out."""
    monkeypatch.setattr(lost, "SCHEDULER_GRACE_S", 0.5)
    beat(run_dir, 1, time=time.time() - 60)
    beat(run_dir, 2, host="n2", ended=lost.ABORTED, aborted_at=time.time())
    assert lost.culprit_of_abort(run_dir, 0, time.time(), poll_s=0.1) == lost.Culprit(1, "n2", "lost")
    beat(run_dir, 2, host="n3", ended=lost.ABORTED, aborted_at=time.time())
    assert lost.culprit_of_abort(run_dir, 0, time.time(), poll_s=0.1) == lost.Culprit(
        1, "n2", "lost", host_gone=True)


def test_a_peer_whose_task_saw_it_killed_is_blamed_not_the_first_to_abort(run_dir, monkeypatch):
    """Rank 1 was killed; its task ended its heartbeat, but the attempt's line was another process's (a hang report
    that names no lost rank). Rank 2 aborted before rank 0: rank 1, which went before any abort, is the culprit."""
    (run_dir / "attempts.jsonl").write_text(json.dumps({"job_id": "42", "restart": 0, "ended": "hang"}) + "\n")
    beat(run_dir, 1, ended="vanished: rank 1 on n2 was killed by SIGKILL")
    beat(run_dir, 2, ended=lost.ABORTED, aborted_at=time.time() - 2)
    assert lost.culprit_of_abort(run_dir, 0, time.time(), poll_s=0.1) == lost.Culprit(1, "n2", "recorded")
    assert lost.culprit_of_abort(run_dir, 2, time.time() - 2, poll_s=0.1) == lost.Culprit(1, "n2", "recorded")


def culprit_while_beating(run_dir: Path, rank: int, every_s: float, clock_behind_s: float = 0.0, **fields):
    """Rank 0's culprit_of_abort while `rank` keeps beating every `every_s` (its host's clock `clock_behind_s`
    behind)."""
    import threading

    stop = threading.Event()

    def alive() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            beat(run_dir, rank, time=time.time() - clock_behind_s, beat=n, **fields)
            time.sleep(every_s)

    writer = threading.Thread(target=alive)
    writer.start()
    try:
        return lost.culprit_of_abort(run_dir, 0, time.time(), poll_s=0.1)
    finally:
        stop.set()
        writer.join()


def test_a_silent_rank_next_to_one_that_still_beats_keeps_its_host(run_dir, monkeypatch):
    """Rank 2 on rank 1's host still beats (it moved within half the silence that calls a rank gone): the host lives."""
    monkeypatch.setattr(lost, "SCHEDULER_GRACE_S", 2.0)
    monkeypatch.setattr(lost, "ABORT_GRACE_S", 5.0)
    beat(run_dir, 1, time=time.time() - 60)
    found = culprit_while_beating(run_dir, 2, 0.05, host="n2")
    assert found == lost.Culprit(1, "n2", "lost")


@pytest.mark.slow
def test_with_no_peer_to_blame_the_first_rank_to_abort_is_the_lost_one(run_dir, asked, monkeypatch):
    """Every rank died of SIGABRT and no peer was lost or failed: the first to abort (its own error, such as a GPU
    fault) is the lost rank; the others were aborted after it."""
    died = time.time() - 2
    beat(run_dir, 2, ended=lost.ABORTED, aborted_at=died)
    survivor = run_task(run_dir, 0, -signal.SIGABRT, monkeypatch)
    assert survivor == (f"rank 0 on {socket.gethostname()} was aborted (SIGABRT, NCCL's error handling) because rank 2 "
                        "on n3 aborted first")
    assert asked == [] and lines(run_dir) == []
    assert lost.culprit_of_abort(run_dir, 2, died) is None  # rank 2's own task: its abort was its own
    assert lost.culprit_of_abort(run_dir, 1, time.time()) == lost.Culprit(2, "n3", "aborted first")


def test_the_local_backend_names_the_killed_rank_not_an_aborted_survivor():
    """A survivor that NCCL aborted before the launcher looked again, seen ending at the same moment as its killed
    peer, must not be reported first."""
    failures = {0: local.Failure(-signal.SIGABRT, 1000.0), 1: local.Failure(-signal.SIGKILL, 1000.0),
                2: local.Failure(-signal.SIGABRT, 999.0)}
    assert local.root_failure(failures) == (1, -signal.SIGKILL)
    assert local.root_failure({0: local.Failure(3, 1000.5), 1: local.Failure(-signal.SIGKILL, 1000.0)}) == (1, -9)


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_local_run_whose_survivors_abort_records_the_killed_rank_once(tmp_path, data_overrides):
    """The CPU mirror of NCCL's abort: rank 1 kills itself at step 5, and ranks 0 and 2, whose collective then fails,
    abort (debug.abort_on_collective_error). The run fails naming rank 1, with one attempts line naming it."""
    proc = launch("model=tiny", "strategy=ddp", "cluster.tasks_per_node=3", "train.max_steps=50",
                  "train.eval_interval=0", "checkpoint.interval_steps=0", *data_overrides, "debug.kill_rank=1",
                  "debug.kill_step=5", "debug.abort_on_collective_error=true", "preemption.in_job_restarts=0",
                  run_dir=tmp_path, check=False)
    assert proc.returncode != 0
    assert "error: rank 1 was killed by SIGKILL" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("debug.abort_on_collective_error: a collective failed; aborting") >= 1, proc.stderr[-3000:]
    (line,) = lines(tmp_path)
    assert (line["lost_rank"], line["ended"], line["requeued"]) == (1, "rank 1 was killed by SIGKILL", False), line


@pytest.mark.slow
def test_a_live_peer_whose_clock_is_behind_is_not_taken_for_lost(run_dir, monkeypatch):
    """Rank 1's host clock is a minute behind, but its heartbeat keeps moving: alive. Rank 2 aborted first."""
    monkeypatch.setattr(lost, "SCHEDULER_GRACE_S", 1.0)
    monkeypatch.setattr(lost, "ABORT_GRACE_S", 3.0)
    beat(run_dir, 2, ended=lost.ABORTED, aborted_at=time.time() - 2)
    found = culprit_while_beating(run_dir, 1, 0.2, clock_behind_s=60)
    assert found == lost.Culprit(2, "n3", "aborted first")
