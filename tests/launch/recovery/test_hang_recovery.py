"""How a hang ends on the scheduler's side: liveness by heartbeat sequence numbers on the observer's own clock, one
rank that acts (the report's claim, or the lowest surviving rank where nobody can claim it), and the progress rule
with the named hosts left out."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from gpt.config.sections import WatchdogConfig
from gpt.collectives.process_group import DistEnv
from launch.recovery.hang import Hang
from launch.recovery.heartbeat import Liveness, read_heartbeats
from launch.recovery.watchdog import Watchdog
from gpt.run_folder import RunFolder
from launch.rank.job_env import JobEnvironment, job_environment
from launch.recovery.endings import end_hung_attempt, start_watchdog
from launch.run.attempts import Attempt
from launch.run.startup import ATTEMPT_START


def beat(rank: int, n: int, clock_offset_s: float, restart: int = 0) -> dict:
    return {"rank": rank, "host": f"n{rank}", "beat": n, "restart": restart, "time": time.time() + clock_offset_s,
            "seq": 3, "collective": "all_reduce", "what": "step 5", "step": 5, "idle_s": 20.0}


def test_liveness_is_the_sequence_moving_on_the_observers_clock_not_the_writers_time():
    """Rank 0's host clock is an hour behind, rank 1's an hour ahead; rank 1's write stalls 8 s on a busy metadata
    server. Neither is gone; a rank is gone once its sequence has not moved for stale_s of the observer's time."""
    live = Liveness()
    live.observe([beat(0, 1, -3600), beat(1, 7, +3600)], now=100.0)
    live.observe([beat(0, 9, -3600), beat(1, 7, +3600)], now=108.0)
    silent = [live.silent_s(r, now=108.0) for r in (0, 1)]
    assert silent == [0.0, 8.0]
    assert Hang.from_heartbeats([beat(0, 9, -3600), beat(1, 7, +3600)], silent, stale_s=10).lost == []
    later = [live.silent_s(r, now=115.0) for r in (0, 1)]
    hang = Hang.from_heartbeats([beat(0, 9, -3600), beat(1, 7, +3600)], later, stale_s=10)
    assert hang.lost == [1] and "rank 1 on n1 is gone (no heartbeat for 15 s" in hang.summary()
    assert hang.hosts_to_exclude() == ["n1"]
    live.observe([beat(0, 9, -3600), beat(1, 1, 0, restart=1)], now=116.0)  # a new attempt's first beat moves
    assert live.silent_s(1, now=116.0) == 0.0


@pytest.fixture
def dogs(tmp_path) -> Iterator[list[Watchdog]]:
    """Two ranks' watchdogs on one run folder, beating (their own threads would end the test process once one
    claims the report: the other rank's thread fires and exits, as it should in a rank)."""
    cfg, stop = WatchdogConfig(interval_s=0.05), threading.Event()
    pair = [Watchdog(cfg, tmp_path, r, 2, f"n{r}", 1, lambda report: False) for r in range(2)]
    RunFolder(tmp_path).watchdog.mkdir(exist_ok=True)  # the watchdogs made it for the run's secret

    def beat():
        while not stop.wait(cfg.interval_s):
            for dog in pair:
                dog.beat()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    yield pair
    stop.set()
    thread.join()


@pytest.mark.slow
def test_one_rank_acts_the_one_that_claims_the_report(dogs):
    first, second = dogs
    report = first.decide("watchdog.step_s", 5.0, 6.0)
    assert report is not None and report["detected_by"] == 0 and report["exclude"] == []
    assert second.decide("watchdog.step_s", 5.0, 6.0) is None  # the claim is taken: rank 1 leaves it to rank 0


@pytest.mark.slow
def test_where_nobody_can_claim_the_report_the_lowest_surviving_rank_acts(dogs):
    first, second = dogs
    first.report.json_path.mkdir()  # nobody can create the report
    assert second.decide("watchdog.step_s", 5.0, 6.0) is None
    report = first.decide("watchdog.step_s", 5.0, 6.0)
    assert report is not None and report["surviving"] == [0, 1]


class Scheduler(JobEnvironment):
    """A scheduler stand-in that records what the rank asked (tests/slurm asks the real one)."""

    scheduler = "stand-in"

    def __init__(self, restart: int = 0):
        super().__init__({})
        self.asked: list[tuple] = []
        self._restart = restart

    @property
    def job_id(self) -> str:
        return "77"

    @property
    def restart(self) -> int:
        return self._restart

    def requeue(self, max_restarts: int) -> tuple[bool, str]:
        self.asked.append(("requeue",))
        return True, "requeued job 77"

    def requeue_excluding(self, hosts: list[str], max_restarts: int) -> tuple[bool, str]:
        self.asked.append(("requeue_excluding", hosts))
        return True, f"requeued job 77, without {','.join(hosts)}"


REPORT = {"summary": "watchdog: rank 1 on n2 cannot reach the master over the network (cut off)",
          "report": "hang-2.txt", "exclude": ["n2"], "idle_s": 61.5}


def test_a_hang_requeues_without_the_host_it_names(tmp_path):
    job = Scheduler()
    assert end_hung_attempt(Attempt(tmp_path, 1, job), 3, REPORT)
    assert job.asked == [("requeue_excluding", ["n2"])]
    (line,) = RunFolder(tmp_path).attempts.read()
    assert (line.ended, line.requeued, line.note) == ("hang", True, "requeued job 77, without n2")
    assert line.detection_s == {"hang": 61.5}  # the wait to see it: goodput's "hang detection"


def test_a_second_hang_without_a_newer_checkpoint_is_not_requeued(tmp_path):
    job = Scheduler(restart=1)
    RunFolder(tmp_path).attempts.append("77", 0, {"ended": "hang", "first_step": 0, "last_step": 0,
                                                  "requeued": True})
    assert not end_hung_attempt(Attempt(tmp_path, 2, job), 3, REPORT)
    assert job.asked == []
    line = RunFolder(tmp_path).attempts.read()[-1]
    assert line.requeued is False and line.extra["hang"] == REPORT["summary"]  # the host named, in the one line
    assert line.note.startswith("not requeued: the attempt before hung too, and no checkpoint newer than the "
                                   "start was saved since"), line


def test_an_orphan_of_an_earlier_restart_is_not_taken_for_a_peer(tmp_path):
    """Both restarts of a job write the same attempt number: an orphan's heartbeat (restart 0, its node cut off
    while the job was requeued) must not stand in for rank 1 of restart 1."""
    from launch.recovery.heartbeat import read_heartbeats, write_heartbeat

    RunFolder(tmp_path).watchdog.mkdir()
    write_heartbeat(tmp_path, 0, {**beat(0, 3, 0, restart=1), "attempt": 2})
    write_heartbeat(tmp_path, 1, {**beat(1, 90, 0, restart=0), "attempt": 2})
    assert [b is not None for b in read_heartbeats(tmp_path, 2, 2, restart=1)] == [True, False]


@pytest.mark.parametrize("killed, later, named", [
    ({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}, {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2"},
     "hang-job7-restart2.json"),
    ({ATTEMPT_START: "100.000"}, {ATTEMPT_START: "200.000"}, "hang-started200.000.json")])  # no scheduler
def test_a_hang_report_left_without_its_attempts_line_is_not_the_next_attempts(tmp_path, monkeypatch, killed,
                                                                              later, named):
    """An attempt killed while it handled its hang leaves its report and no attempts line: the attempt after it
    counts as many lines as it did, but a report is named by its attempt's own id, so the later attempt does not
    take that report for a hang of its own (which it would within a second, and every attempt after it)."""
    monkeypatch.setattr(Watchdog, "start", lambda self: self)  # built as the worker builds it; its thread not run
    folder = RunFolder(tmp_path)
    folder.attempts.append("7", 0, {"ended": "preempted"})

    def watchdog_of(environ: dict[str, str]) -> Watchdog:
        attempt = Attempt(tmp_path, job=job_environment(environ))
        attempt.number = len(folder.attempts.read()) + 1  # as launch.rank.worker counts it
        start_watchdog(attempt, DistEnv(), WatchdogConfig(), restarts=3)
        return attempt.watchdog

    assert watchdog_of(killed).report.claim() is True  # then killed: no line
    report = watchdog_of(later).report
    assert not report.reported_elsewhere() and report.json_path.name == named
    assert report.claim() is True


def test_a_rank_that_dies_just_after_its_fence_is_in_its_nodes_record(tmp_path, monkeypatch):
    """A beat written before the fence carries no generation, and the node's writer drops it as an earlier
    attempt's: each rank beats again as its fence is installed, so that one that dies before its next beat (a fast
    start, a crash at the first steps) is still in its node's record, where its peers look for the lost."""
    from launch.recovery import watchdog as watchdog_module
    from launch.rank import worker

    generation = {"now": None}
    monkeypatch.setattr(watchdog_module, "fenced_generation", lambda: generation["now"])
    monkeypatch.setattr(worker, "install_fence", lambda run_dir, g: generation.update(now=g))
    (tmp_path / "watchdog").mkdir()
    ranks = [Attempt(tmp_path, 1, watchdog=Watchdog(WatchdogConfig(), tmp_path, r, 2, "n1", 1, lambda report: False))
             for r in (0, 1)]
    for attempt in ranks:
        attempt.watchdog.beat()  # as it starts, before the rendezvous
    for attempt in ranks:
        worker.write_for(attempt, 1)
    ranks[0].watchdog.beat()  # rank 1 is dead by now; rank 0, the node's writer, beats on
    beats = read_heartbeats(tmp_path, 2, 1)
    assert beats[1] is not None and beats[1]["generation"] == 1, beats
