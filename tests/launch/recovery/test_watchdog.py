"""The watchdog in every rank: a rank that hangs (in a step, or before it joins the others) is reported within its
budget plus a margin, naming who waited in which collective and who never arrived; the attempt ends and says so
in one line. Its budgets and its reading of heartbeats, checked on their own."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from launch.recovery.hang import Hang
from gpt.resilience.progress import Progress
from gpt.config.sections import WatchdogConfig
from launch.recovery.watchdog import Watchdog
from gpt.run_folder import RunFolder
from helpers import launch

# A hang ends the run here (the watchdog's report and line are the subject), not an in-job restart (tested in
# test_in_job_restart_local.py).
RUN = ["model=tiny", "strategy=ddp", "cluster.tasks_per_node=2", "train.max_steps=200", "train.log_interval=5",
       "train.eval_interval=0", "checkpoint.interval_steps=0", "preemption.in_job_restarts=0"]


def hang_path(run_dir) -> Path:
    """The run's one hang report, named by its attempt's own id (launch.run.attempts.hang_report_name)."""
    (path,) = run_dir.glob("hang-*.json")
    return path


def hang_report(run_dir) -> dict:
    return json.loads(hang_path(run_dir).read_text())


def test_start_up_budget_bounds_each_phase_not_their_sum(tmp_path):
    """A large model's start (the join, its checkpoint's load, the first compile) may take longer than startup_s in
    all: each phase is bounded, so a hang in any of them is still seen within startup_s of its last mark."""
    progress = Progress()
    dog = Watchdog(WatchdogConfig(startup_s=600), tmp_path, 0, 1, "h", 1, lambda r: None, progress)
    progress.phase("startup", "choosing and loading a checkpoint")
    now = time.monotonic()
    progress.started, progress.since = now - 1000, now - 400  # up 1,000 s, loading for 400 s
    assert dog.budget(now) == ("watchdog.startup_s", 600, 400)
    progress.phase("step", "step 0", 0)  # the first step, its compile: start-up's last phase, a budget of its own
    assert dog.budget(progress.since + 500)[:2] == ("watchdog.startup_s", 600)
    assert dog.budget(progress.since + 500)[2] == pytest.approx(500)


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_hang_in_a_step_is_reported_within_step_s(tmp_path, data_overrides):
    step_s = 8
    proc = launch(*RUN, *data_overrides, "debug.hang_rank=1", "debug.hang_step=12", f"watchdog.step_s={step_s}",
                  run_dir=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    report = hang_report(tmp_path)
    hung = report["ranks"][1]
    detected_after = report["time"] - (hung["time"] - hung["idle_s"])  # since rank 1 stopped
    print(f"hang in a step reported {detected_after:.1f} s after rank 1 stopped (watchdog.step_s={step_s})")
    assert step_s <= detected_after < step_s + 30, detected_after
    line = report["summary"]
    # the flight recorder's dumps (gloo records into it too) are the evidence: rank 1 never entered the all_reduce
    assert line.startswith("watchdog: flight recorder: rank 1 on ") and " never entered gloo:all_reduce #" in line, line
    assert "of group 0 (default_pg), rank 0 on " in line and " waits in it; rank 1 on " in line, line
    assert "was in debug.hang_rank: hanging at step 12" in line
    assert (report["waiting"], report["never_arrived"], report["lost"]) == ([0], [1], [])
    # the default group's all_reduce
    assert [(s["desc"], s["missing"], s["waiting"]) for s in report["flight_recorder"]] == [
        ("default_pg", [1], [0])]  # the step's flags travel point to point (gpt.collectives.flag_sum): no collective to miss
    assert f"error: {line}" in proc.stderr  # the launcher's one line, naming the report
    text = hang_path(tmp_path).with_suffix(".txt").read_text()
    assert text.startswith(line)
    for rank in (0, 1):
        assert f"=== rank {rank} on " in text
    assert "in _hang" in text  # rank 1's own stack shows where it is stuck
    ended = [json.loads(x) for x in (tmp_path / "attempts.jsonl").read_text().splitlines()][-1]
    assert (ended["ended"], ended["last_step"], ended["hang"]) == ("hang", 12, line)


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_hang_before_the_first_step_names_the_missing_rank(tmp_path, data_overrides):
    startup_s = 15
    start = time.time()
    proc = launch(*RUN, *data_overrides, "debug.hang_rank=1", f"watchdog.startup_s={startup_s}",
                  run_dir=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    report = hang_report(tmp_path)
    waiting = report["ranks"][0]
    detected_after = report["time"] - (waiting["time"] - waiting["up_s"])  # since rank 0 started
    print(f"hang before the first step reported {detected_after:.1f} s after rank 0 started "
          f"(watchdog.startup_s={startup_s})")
    assert startup_s <= detected_after < startup_s + 30, detected_after
    assert report["time"] - start < startup_s + 60  # the whole command, launcher start-up included
    assert report["budget"] == "watchdog.startup_s"
    assert report["never_arrived"] == [1]
    assert " in rendezvous (joining the process group); rank 1 on " in report["summary"]
    assert "never arrived; it was in debug.hang_rank: hanging before joining the other ranks" in report["summary"]


def beat(rank: int, seq: int, collective: str | None, what: str, age: float = 0.5) -> dict:
    return {"rank": rank, "host": f"n{rank}", "time": time.time() - age, "seq": seq, "collective": collective,
            "what": what, "step": 50, "idle_s": 20.0}


def test_a_rank_whose_heartbeat_stopped_is_gone_and_the_others_survive():
    beats = [beat(0, 9, "all_reduce", "step 50"), beat(1, 9, "all_reduce", "step 50"),
             beat(2, 8, None, "step 50", age=40), None]
    hang = Hang.from_heartbeats(beats, [0.5, 0.5, 40.0, None], stale_s=10)
    assert (hang.waiting, hang.behind, hang.lost) == ([0, 1], [], [2, 3])
    line = hang.summary()
    assert line.startswith("ranks 0 on n0, 1 on n1 waited 20 s in all_reduce at step 50")
    assert "rank 2 on n2 is gone (no heartbeat for 40 s; it was in step 50)" in line
    assert "rank 3 never arrived (no heartbeat this attempt" in line
    assert line.endswith("surviving: ranks 0 on n0, 1 on n1")


def test_auto_step_budget_follows_the_measured_p99(tmp_path):
    progress = Progress()
    dog = Watchdog(WatchdogConfig(step_floor_s=5, step_factor=10), tmp_path, 0, 1, "h", 1, lambda r: None, progress)
    assert dog.budget()[0] == "watchdog.startup_s"
    progress.phase("step", "step 0", 0)
    progress.phase("step", "step 1", 1)  # the first step is done: from now on the step budget
    assert dog.budget()[:2] == ("watchdog.step_s (auto)", 5)  # no step timed yet: the floor
    progress.step_times.extend([0.1] * 98 + [2.0, 2.0])
    assert dog.budget()[:2] == ("watchdog.step_s (auto)", 20.0)  # 10 x p99
    progress.phase("save", "checkpoint save at step 1", 1)
    assert dog.budget()[:2] == ("watchdog.save_first_s", 600)  # no save measured yet


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_a_healthy_run_raises_no_alarm(tmp_path, data_overrides):
    """Steps, evaluations and saves under a tight step floor: no report, and the margin is recorded."""
    launch(*RUN, *data_overrides, "train.max_steps=60", "train.eval_interval=20", "checkpoint.interval_steps=20",
           "watchdog.step_floor_s=5", run_dir=tmp_path)
    assert not list(tmp_path.glob("hang-*"))
    for rank in (0, 1):
        beat = json.loads((tmp_path / "watchdog" / f"rank{rank}.json").read_text())
        assert beat["ended"] == "finished"
        closest = beat["closest"]  # per budget, the largest share of it the rank used
        assert {"watchdog.startup_s", "watchdog.step_s (auto)", "watchdog.save_s (auto)", "watchdog.save_first_s",
                "watchdog.eval_s"} <= set(closest)
        assert max(closest.values()) < 0.5, closest  # at least twice the time it needed


def test_heartbeats_written_from_two_threads_at_once_never_lose_their_file(tmp_path):
    """The watchdog thread beats while the main thread ends the heartbeat: neither may take the other's file."""
    import threading

    from launch.recovery.heartbeat import write_heartbeat

    errors = []

    def beat(n):
        try:
            for i in range(300):
                write_heartbeat(tmp_path, 0, {"n": n, "i": i})
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=beat, args=(n,)) for n in range(2)]
    (tmp_path / "watchdog").mkdir(exist_ok=True)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]


@pytest.mark.slow
def test_a_progressing_rank_never_looks_for_a_hang_report_and_a_stuck_one_finds_it(tmp_path, monkeypatch):
    """Steady state makes no lookup of the hang report (it was one per rank per beat on the shared file system); a
    rank stuck past half its budget still finds the report another rank claimed, and ends its attempt with it."""
    (tmp_path / "watchdog").mkdir()
    progress = Progress()
    dog = Watchdog(WatchdogConfig(interval_s=0.05, step_s=10), tmp_path, 1, 2, "h", 1, lambda r: None, progress)
    report = RunFolder(tmp_path).hang_report(1)
    names, looked = {str(p) for p in report}, []
    for name in ("stat", "lstat", "access"):  # what Path.exists, is_file and os.path.exists come down to
        def counted(path, *args, real=getattr(os, name), **kwargs):
            if str(path) in names:
                looked.append(str(path))
            return real(path, *args, **kwargs)
        monkeypatch.setattr(os, name, counted)
    fired: list[tuple] = []
    monkeypatch.setattr(dog, "fire", lambda *budget: fired.append(budget))
    dog.thread.start()
    step, deadline = 0, time.monotonic() + 30
    while dog.beats_sent < 20 and time.monotonic() < deadline:  # a step every 20 ms, over 20 beats
        progress.phase("step", f"step {step}", step)
        step += 1
        time.sleep(0.02)
    assert dog.beats_sent >= 20 and not fired
    assert looked == [], looked
    report[0].write_text("")  # another rank claimed the report; this one is stuck waiting for it from now on
    deadline = time.monotonic() + 20
    while not fired and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fired and fired[0][0] == "watchdog.step_s" and fired[0][2] < 10, fired  # before its own budget ran out
    assert looked, "a stuck rank looks for the report"


FROZEN_RANK = """
import sys, time
from pathlib import Path
from gpt.config.sections import WatchdogConfig
from gpt.resilience.progress import Progress
from launch.recovery.watchdog import Watchdog

progress = Progress()
def hang(report):
    print("hang", flush=True)
    return False
Watchdog(WatchdogConfig(step_s=8), Path(sys.argv[1]), 0, 1, "here", 1, hang, progress).start()
for step in range(4):
    progress.phase("step", f"step {step}", step)
    print(f"step {step}", flush=True)
    for _ in range(40):  # 4 s of the step's work, however long the process is stopped in it
        time.sleep(0.1)
print("done", flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_a_rank_stopped_past_its_budget_and_continued_is_no_hang(tmp_path):
    """Ctrl-Z (SIGSTOP) holds the watchdog too: woken past its step budget, it does not count the stop as a
    hang, whichever of its threads runs first."""
    import os
    import signal
    import subprocess
    import sys

    from helpers import REPO

    proc = subprocess.Popen([sys.executable, "-c", FROZEN_RANK, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "step 0\n"
    assert proc.stdout.readline() == "step 1\n"
    os.kill(proc.pid, signal.SIGSTOP)  # early in step 1: 3 s of its work are left when it wakes
    time.sleep(15)
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.split() == ["step", "2", "step", "3", "done"], out + err[-2000:]


@pytest.mark.slow
def test_a_stop_that_lands_during_a_heartbeat_is_credited_not_taken_for_a_hang(tmp_path, monkeypatch):
    """Ctrl-Z can land while the watchdog thread writes its heartbeat (file writes are slow on a busy node): the
    time stopped there is a gap in the watchdog's turns like any other, and the step's budget is not spent by it.
    Here the beat itself takes the stopped time; the process's main thread makes no progress meanwhile."""
    from launch.recovery import watchdog

    monkeypatch.setattr(watchdog, "FROZEN_S", 0.3)
    (tmp_path / "watchdog").mkdir()
    progress = Progress()
    progress.phase("step", "step 0", 0)
    progress.first_step_done = True
    dog = Watchdog(WatchdogConfig(interval_s=0.05, step_s=1), tmp_path, 0, 1, "h", 1, lambda r: None, progress)
    beat, turns, fired = dog.beat, [], []

    def stopped_in_the_third_beat(last: bool = False) -> None:
        turns.append(time.monotonic())
        beat(last)
        if len(turns) == 3:
            time.sleep(2.0)  # stopped here, past the 1 s step budget

    monkeypatch.setattr(dog, "beat", stopped_in_the_third_beat)
    monkeypatch.setattr(dog, "fire", lambda *budget: fired.append((time.monotonic(), budget)))
    dog.thread.start()
    deadline = time.monotonic() + 30
    while not fired and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fired and len(turns) >= 3, (turns, fired)
    # no progress after the stop either: the hang is still seen, a budget after the thread woke, not at once
    assert fired[0][0] - (turns[2] + 2.0) > 0.5 and fired[0][1][0] == "watchdog.step_s", (fired, turns)



def saver(tmp_path: Path, rank: int, longest_save_s: float, fired: list) -> tuple[Watchdog, Progress]:
    """Rank `rank` of 2, on a host of its own, in a save; its save budget 10x `longest_save_s`, at least 1 s (a
    heartbeat's fdatasync stalls for tenths of a second on a busy disk)."""
    progress = Progress()
    progress.phase("step", "step 0", 0)
    progress.phase("step", "step 1", 1)
    progress.save_times.append(longest_save_s)
    progress.phase("save", "checkpoint save at step 1", 1)
    cfg = WatchdogConfig(interval_s=0.05, save_floor_s=1.0, step_factor=10)
    dog = Watchdog(cfg, tmp_path, rank, 2, f"h{rank}", 1, lambda r: None, progress)
    dog.fire = lambda key, seconds, used: fired.append((rank, key, round(used, 2)))
    return dog, progress


@pytest.mark.parametrize("peer", [pytest.param("slower", marks=pytest.mark.slow),  # seconds of budgets each
                                  pytest.param("hung", marks=pytest.mark.slow), "frozen", "waiting"])
def test_a_rank_past_its_save_budget_waits_for_a_slower_peer_saving_within_its_own(tmp_path, monkeypatch, peer):
    """Rank 0 saves fast (budget 1 s) and waits in the save's collective; rank 1 saves slower (budget 4 s). A
    slower save is no hang: rank 0 waits while rank 1 beats, works (in no collective) and has budget left. A peer
    hung in its save is reported by its own watchdog at its budget, and rank 0 waits until then; a frozen peer (no
    heartbeat) or one waiting in a collective itself gives rank 0 nothing to wait for: its own budget applies."""
    from launch.recovery import watchdog

    monkeypatch.setattr(watchdog, "SILENT_S", 1.0)  # a frozen peer is gone after 1 s without a beat
    (tmp_path / "watchdog").mkdir()
    fired: list[tuple] = []
    dog0, progress0 = saver(tmp_path, 0, 0.02, fired)
    dog1, progress1 = saver(tmp_path, 1, 0.4, fired)
    dog0.start(), dog1.start()
    start = time.monotonic()
    with progress0.collective("all_gather"):  # rank 0 is done with its shards and waits for rank 1
        if peer == "waiting":
            barrier = progress1.collective("barrier")  # a collective of its own: both wait
            barrier.__enter__()
        if peer == "frozen":
            monkeypatch.setattr(dog1, "beat", lambda last=False: time.sleep(3600))
        deadline = start + (2.5 if peer == "slower" else 15)
        while time.monotonic() < deadline and not (peer != "slower" and any(r == 0 for r, *_ in fired)):
            time.sleep(0.05)  # rank 1 works on its shards meanwhile
        if peer == "slower":
            with progress1.collective("all_gather"):
                pass
    took = time.monotonic() - start
    by_rank = {r: (key, used) for r, key, used in fired}
    if peer == "slower":
        assert fired == [], fired  # 2.5 s into rank 0's save of budget 1 s: rank 1's (4 s) was not spent
    elif peer == "hung":
        assert by_rank[1][0] == "watchdog.save_s (auto)" and 4 <= by_rank[1][1] < 6, fired
        # waited for rank 1's own budget (counted from rank 1's last mark, a moment before rank 0's), not its own 1 s
        assert 3 < by_rank[0][1] < 8, fired
    else:
        assert 1 <= by_rank[0][1] < 3 and took < 6, (fired, took)  # its own budget: nothing to wait for
