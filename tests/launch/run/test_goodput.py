"""Goodput: the share of a run's allocated time that trained steps it kept, from its attempts log."""
from __future__ import annotations

import json

import pytest

from gpt.resilience.goodput import interruption_rate as rate_of, run_goodput as goodput_of, young_daly_minutes
from gpt.run_folder import STEP_COUNTS, AttemptLine
from helpers import launch

RUN = ["model=tiny", "train.max_steps=40", "train.log_interval=5", "train.eval_interval=0",
       "checkpoint.interval_steps=10"]


def run_goodput(attempts: list[dict]):
    return goodput_of([AttemptLine.from_json(a) for a in attempts])


def interruption_rate(attempts: list[dict]):
    return rate_of([AttemptLine.from_json(a) for a in attempts])


def test_goodput_counts_replayed_steps_as_lost():
    attempts = [
        {"ended": "preempted:SIGUSR2", "last_step": 25,
         "goodput": {"allocated_s": 100.0, "startup_s": 10.0, "train_s": 50.0, "eval_s": 5.0, "save_s": 5.0,
                     "steps": 25, "saves": 2}},
        {"ended": "finished", "last_step": 40,
         "goodput": {"allocated_s": 60.0, "startup_s": 10.0, "train_s": 40.0, "eval_s": 0.0, "save_s": 2.0,
                     "steps": 20, "saves": 2, "steps_replayed": 5}},
    ]
    g = run_goodput(attempts)
    assert g.attempts == 2 and g.allocated_s == 160.0
    assert g.kept_train_s == pytest.approx(50 - 5 * 2 + 40)  # 5 steps of 2 s each trained again
    assert g.losses["steps trained again"] == pytest.approx(10.0) and g.losses["start-up"] == 20.0
    assert g.goodput == pytest.approx(80 / 160) and "goodput 50.0%" in g.describe()


def test_goodput_counts_the_steps_a_rollback_undid_as_lost():
    """divergence.policy=rollback restored step 10 at step 15: steps 10..14 were trained, then trained again."""
    g = run_goodput([{"ended": "finished", "last_step": 30,
                      "goodput": {"allocated_s": 100.0, "startup_s": 10.0, "train_s": 70.0, "eval_s": 0.0,
                                  "save_s": 0.0, "steps": 35, "steps_undone": 5, "saves": 3}}])
    assert g.kept_train_s == pytest.approx(70 - 5 * 2) and g.losses["steps trained again"] == pytest.approx(10.0)


def test_goodput_splits_restarts_in_the_job_from_requeues():
    def line(startup_s: float, **how) -> dict:
        return {"ended": "hang", "last_step": 10, **how,
                "goodput": {"allocated_s": 50.0, "startup_s": startup_s, "train_s": 20.0, "eval_s": 0.0,
                            "save_s": 0.0, "steps": 10, "saves": 1}}

    g = run_goodput([line(9.0, in_job_restart=1), line(3.0, requeued=True), line(12.0), line(4.0)])
    assert (g.losses["start-up"], g.losses["restart in job"], g.losses["requeue"]) == (13.0, 3.0, 12.0)
    assert "restart in job 3.0 s, requeue 12.0 s" in g.describe(), g.describe()


def test_an_attempt_without_a_time_record_still_counts_as_an_attempt():
    """A hang's or a killed attempt's line may carry no goodput record: the run still ended over two attempts."""
    attempts = [{"ended": "hang", "last_step": 10},
                {"ended": "finished", "last_step": 40,
                 "goodput": {"allocated_s": 60.0, "startup_s": 10.0, "train_s": 40.0, "eval_s": 0.0, "save_s": 2.0,
                             "steps": 30, "saves": 2}}]
    said = run_goodput(attempts).describe()
    assert "s allocated over 2 attempt(s) (1 of them recorded no time); lost to" in said, said


def test_young_daly_interval_and_its_inputs():
    assert young_daly_minutes(save_s=30, mtbi_s=6 * 3600) == pytest.approx((2 * 30 * 6 * 3600) ** 0.5 / 60)
    rate, why = interruption_rate([{"ended": "preempted:SIGUSR2", "goodput": {"allocated_s": 3600}},
                                   {"ended": "finished", "goodput": {"allocated_s": 3600}}])
    assert rate == 7200 and "1 interruption(s)" in why
    assert "prior" in interruption_rate([])[1]


@pytest.mark.slow
def test_a_stopped_and_continued_run_reports_its_goodput(tmp_path, data_overrides):
    run = tmp_path / "run"
    launch(*RUN, "debug.signal_at_step=25", *data_overrides, run_dir=run, check=False)
    done = launch(*RUN, "checkpoint.interval_minutes=auto", *data_overrides, run_dir=run)
    said = done.stdout + done.stderr
    assert "run finished: goodput" in said and "over 2 attempt(s)" in said
    assert "checkpoint.interval_minutes=auto: every" in said and "1 interruption(s)" in said
    records = [json.loads(x)["goodput"] for x in (run / "attempts.jsonl").read_text().splitlines()]
    assert records[1]["steps_replayed"] == 0 and records[0]["steps"] == 25 and records[1]["steps"] == 15
    total = sum(r["startup_s"] + r["train_s"] + r["eval_s"] + r["save_s"] for r in records)
    assert total <= sum(r["allocated_s"] for r in records) + 0.5  # no second counted twice
    from launch.report import write_report

    text = (write_report(run) / "scaling.md").read_text()
    assert "## Goodput" in text and f"| {run.name} | 2 | " in text
    health = json.loads((run / "health-2.json").read_text())  # the last attempt's node health, in the report
    assert "## Nodes" in text and f"| {run.name} | {health['nodes'][0]['host']} " in text


@pytest.mark.slow
def test_a_warning_window_too_short_for_a_save_is_named(tmp_path, data_overrides):
    """cluster.signal_delay_s is read from the config: here a window of 1 s, far less than a save and a requeue."""
    run = launch(*RUN, "cluster.signal_delay_s=1", *data_overrides, run_dir=tmp_path / "run")
    said = run.stdout + run.stderr
    assert "cluster.signal_delay_s=1 may be too short" in said and "set cluster.signal_delay_s=30" in said


def test_an_attempt_killed_outright_counts_its_time_up_to_its_last_record_not_the_queue_after_it(tmp_path):
    """The next attempt records it (begin_attempt): it holds the lease by then, and its fresh heartbeat must not
    stretch the killed attempt over the time the job waited in the queue."""
    import time

    from gpt.run_folder import RunFolder
    from launch.rank.job_env import JobEnvironment
    from launch.run.attempts import begin_attempt
    from launch.run.take_lease import take_lease

    folder = RunFolder(tmp_path)
    folder.metrics.mkdir(parents=True)
    started = time.time() - 1000  # killed 950 s ago, 50 s after it started; then the queue
    folder.attempts.mark({"job_id": None, "restart": 0, "started": started, "first_step": 0})
    folder.metrics_file(0).write_text("".join(json.dumps({"kind": "train", "step": s, STEP_COUNTS: "done",
                                                          "time": started + 5 * s, "step_time_s": 1.0}) + "\n"
                                              for s in range(1, 11)))
    lease = take_lease(tmp_path, None, 0)  # the next attempt holds the folder, with a fresh heartbeat
    try:
        begin_attempt(tmp_path, JobEnvironment({}), time.time(), first_step=10, nodes=["here"])
    finally:
        lease.release()
    killed = folder.attempts.read()[0]
    assert killed.goodput["allocated_s"] == pytest.approx(50.0, abs=0.01), killed
    assert killed.goodput["estimated"] == "rank 0's last metrics record", killed


@pytest.mark.parametrize("counted", [{STEP_COUNTS: "done"}, {}], ids=["steps-done", "older-folder"])
def test_a_hung_attempt_is_timed_from_its_metrics_and_the_goodput_line_says_so(tmp_path, counted):
    """A hang's (or a failure's) line is written before the trainer returns, with no time of its own: its steps
    are timed from rank 0's metrics and its allocated time runs to the line, and the goodput line says so, rather
    than leaving out an attempt that trained hundreds of steps. An older folder's train records counted their steps
    from 0: its last, step 299, was the 300th."""
    import time

    from gpt.resilience.goodput import run_goodput as goodput
    from gpt.run_folder import RunFolder
    from launch.rank.job_env import JobEnvironment
    from launch.run.attempts import log_attempt

    folder = RunFolder(tmp_path)
    folder.metrics.mkdir(parents=True)
    started = time.time() - 400
    folder.attempts.mark({"job_id": None, "restart": 0, "round": 0, "started": started, "first_step": 0})
    first = 1 if counted else 0
    folder.metrics_file(0).write_text("".join(json.dumps({"kind": "train", "step": s, **counted, "time": started + 11 + s,
                                                          "step_time_s": 1.0}) + "\n"
                                              for s in range(first, first + 300)))
    log_attempt(tmp_path, JobEnvironment({}), {"first_step": 0, "last_step": None, "ended": "hang"})
    [hung] = folder.attempts.read()
    assert hung.goodput["steps"] == 300 and hung.goodput["train_s"] == pytest.approx(300.0), hung.goodput
    assert hung.goodput["allocated_s"] == pytest.approx(400.0, abs=5.0), hung.goodput
    said = goodput(folder.attempts.read()).describe()
    assert "300.0 s of training kept" in said and "recorded no time" not in said, said
    assert "(1 of them timed from what it left: its last metrics record or beat)" in said, said


@pytest.mark.parametrize("writer", ["the launcher", "rank 0's watchdog"])
def test_an_attempt_ended_by_a_killed_rank_keeps_its_start_up_its_saves_and_its_lost_steps(tmp_path, writer):
    """A rank killed by SIGKILL at step 8 (saved at step 5) ends attempt 0, whose line another process writes from
    what the attempt left as it went: its mark and rank 0's metrics. Its start-up is the run's, its save is counted,
    and the steps 6-8 that round 1 trains again after resuming from step 5 are lost, not "other"."""
    import time
    from types import SimpleNamespace

    from gpt.resilience.goodput import Spent, run_goodput as goodput
    from gpt.run_folder import RunFolder
    from gpt.train.summary import FitSummary
    from launch.rank.job_env import JobEnvironment
    from launch.run.attempts import Attempt, BeginAttempt, begin_attempt, goodput_record, log_attempt, log_killed

    folder, job = RunFolder(tmp_path), JobEnvironment({})
    folder.metrics.mkdir(parents=True)
    started = time.time() - 15  # its loop begins (the mark) 15 s after the attempt started
    begin_attempt(tmp_path, job, started, first_step=0, nodes=["here"])
    loop = SimpleNamespace(first_step=0, step=6, startup={}, spent=Spent(train_s=5.0, save_s=0.5, saves=1, steps=5))
    BeginAttempt(Attempt(tmp_path, job=job, loop=loop), is_main=True, data_dir="").after_step(6)  # saved at 5
    # eight steps trained: records of steps 1-8
    folder.metrics_file(0).write_text("".join(json.dumps({"kind": "train", "step": s, STEP_COUNTS: "done",
                                                          "time": started + 15 + s, "step_time_s": 1.0}) + "\n"
                                              for s in range(1, 9)))
    ended = {"ended": "rank 1 was killed by SIGKILL", "in_job_restart": 1}
    if writer == "the launcher":
        log_killed(tmp_path, folder.attempts.read_mark(), 5, ended)
    else:  # its line written from the watchdog's thread: the loop's steps, no start-up breakdown
        log_attempt(tmp_path, job, {"first_step": 0, "last_step": 8, **ended})
    resumed = FitSummary(first_step=5, last_step=16, spent={"train_s": 11.0, "eval_s": 0.0, "save_s": 1.0,
                                                            "saves": 2, "steps": 11})
    folder.attempts.append(None, 0, {"first_step": 5, "last_step": 16, "ended": "finished", "goodput": goodput_record(
        tmp_path, time.time() - 20, {"to_first_step_s": 3.0, "first_step_s": 1.0}, resumed)}, 1)
    killed, _ = folder.attempts.read()
    assert 15.0 <= killed.goodput["startup_s"] < 60.0, killed.goodput
    assert (killed.goodput["saves"], killed.goodput["save_s"]) == (1, 0.5), killed.goodput
    g = goodput(folder.attempts.read())
    assert g.losses["start-up"] >= 15.0 and g.losses["restart in job"] == pytest.approx(2.0), g.losses
    assert g.losses["steps trained again"] == pytest.approx(3.0), g.losses  # steps 6-8, 1 s each
    assert g.losses["saving"] == pytest.approx(1.5), g.losses


def test_the_wait_to_see_a_hang_or_a_lost_node_is_a_cause_of_its_own_not_other():
    """A hung attempt trained 30 s of its 100, started in 5 and waited 62 s for its watchdog (watchdog.step_s=60)
    to report the hang; the next lost a node, seen 40 s after its last step. Those waits are named, not "other",
    and a wait longer than what nothing else explains is cut to it (its steps are timed by their median)."""
    def line(seen: dict, train_s: float = 30.0) -> dict:
        return {"ended": "hang", "requeued": True, "last_step": 10, "detection_s": seen,
                "goodput": {"allocated_s": 100.0, "startup_s": 5.0, "train_s": train_s, "eval_s": 0.0,
                            "save_s": 0.0, "steps": 10, "saves": 1, "estimated": "rank 0's metrics"}}

    g = run_goodput([line({"hang": 62.0}), line({"lost node": 40.0}), line({"hang": 80.0}, train_s=50.0)])
    assert g.losses["hang detection"] == pytest.approx(62.0 + 45.0), g.losses
    assert g.losses["lost node detection"] == pytest.approx(40.0), g.losses
    assert g.losses["other"] == pytest.approx(3.0 + 25.0), g.losses
    assert "hang detection 107.0 s, lost node detection 40.0 s, other 28.0 s" in g.describe(), g.describe()


def test_a_hang_report_says_how_long_the_hang_went_unseen():
    """From the last progress of the rank that saw it (its last beat at t=1060 had made none for 58 s: since
    t=1002) to the report at t=1064: 62 s, more than the budget it used when it fired; a "lost node" where the report
    names a rank gone."""
    from launch.recovery.hang import detection_s

    beat = {"rank": 1, "time": 1060.0, "idle_s": 58.0}
    report = {"time": 1064.0, "detected_by": 1, "idle_s": 60.5, "ranks": [None, beat], "lost": []}
    assert detection_s(report) == {"hang": 62.0}
    assert detection_s({**report, "lost": [0]}) == {"lost node": 62.0}
    assert detection_s({**report, "ranks": []}) == {"hang": 60.5}  # no beat of its own: the budget it used
