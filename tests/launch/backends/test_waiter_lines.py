"""What the login-node waiter says while a job runs: one line per attempt that requeued the job, once."""
from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

from launch import launch_config
from gpt.run_folder import STEP_COUNTS, AttemptLine, RunFolder
from launch.backends import Point
from launch.backends.slurm.submitted import Submitted
from launch.backends.slurm.wait import Watch


def attempt(job_id: str, restart: int, **fields) -> str:
    return json.dumps({"job_id": job_id, "restart": restart, **fields}) + "\n"


def test_each_requeue_of_this_job_is_told_once(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    point = Point(label="nodes=3", run_dir=run_dir, job_name="gptlaunch", resources=None)
    job = Submitted(point, "19", tmp_path)
    log = run_dir / "attempts.jsonl"
    log.write_text(attempt("7", 0, ended="finished", requeued=False)  # an earlier job of the same run
                   + attempt("19", 0, ended="excluded gl-n2", last_step=None, requeued=True,
                             note="requeued job 19 (restart 1 of at most 10), without gl-n2 (ExcNodeList)"))
    watch = Watch()
    watch.tell_requeues([job])
    with open(log, "a") as f:
        f.write(attempt("19", 1, ended="preempted:SIGUSR2", last_step=40, requeued=True,
                        note="requeued job 19 (restart 2 of at most 10)") + '{"job_id": "19", "rest')  # being written
    watch.tell_requeues([job])
    watch.tell_requeues([job])
    assert capsys.readouterr().err.splitlines() == [
        "job 19 (nodes=3): attempt 0 ended (excluded gl-n2) before its first step: requeued job 19 (restart 1 of "
        "at most 10), without gl-n2 (ExcNodeList)",
        "job 19 (nodes=3): attempt 1 ended (preempted:SIGUSR2) at step 40: requeued job 19 (restart 2 of at most 10)",
    ]


def test_a_job_cancelled_while_pending_names_no_log_it_never_wrote(tmp_path: Path, monkeypatch):
    from launch.backends.slurm import commands
    from launch.backends.slurm.wait import collect

    monkeypatch.setattr(commands, "scontrol_job", lambda job: commands.JobInfo(  # recorded: scancel of a held job
        job, "CANCELLED", "JobHeldUser", (("ExitCode", "0:0"), ("Reason", "JobHeldUser"))))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    resources = SimpleNamespace(allocated_nodes=2, tasks_per_node=1)  # what collect reads of them
    job = Submitted(Point(label="nodes=2", run_dir=run_dir, job_name="gptlaunch", resources=resources), "23", tmp_path)
    assert collect(job, "CANCELLED").message().splitlines() == [
        "job 23 (nodes=2) ended CANCELLED:",
        "  it never started (no job log): it was cancelled or failed while pending (ExitCode=0:0, Reason=JobHeldUser)"]
    job.paths(0).stderr.parent.mkdir(parents=True, exist_ok=True)
    job.paths(0).stderr.write_text("started\n")
    said = collect(job, "CANCELLED").message().splitlines()
    assert said[1].startswith("  the job ended before any rank reported") and said[-1].startswith("  job log: ")


def test_a_preemption_that_came_while_the_tasks_started_leads_the_jobs_line(tmp_path: Path, monkeypatch):
    """PreemptMode=CANCEL before any rank reported: the batch step recorded the attempt
    (launch.backends.slurm.start_preempted), and the waiter's line leads with it and says how to go on."""
    from gpt.run_folder import RunFolder
    from launch.backends.slurm import commands
    from launch.backends.slurm.wait import collect

    monkeypatch.setattr(commands, "scontrol_job", lambda job: commands.JobInfo(
        job, "FAILED", "NonZeroExitCode", (("ExitCode", "1:0"), ("Reason", "NonZeroExitCode"), ("Restarts", "0"))))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    by = "preempted by another job (Slurm, at 2026-11-26T16:50:36; partition lowcancel, PreemptMode=CANCEL)"
    note = "not requeued: Slurm's preemption cancels job 23; the same command continues the run from the start"
    resources = SimpleNamespace(allocated_nodes=2, tasks_per_node=1)
    job = Submitted(Point(label="nodes=2", run_dir=run_dir, job_name="gptlaunch", resources=resources), "23", tmp_path)
    job.paths(0).stderr.parent.mkdir(parents=True, exist_ok=True)
    job.paths(0).stderr.write_text("srun: error: gl-n2: task 1: Terminated\n")
    plain = collect(job, "FAILED").message().splitlines()[1]
    assert plain.startswith("  the job ended before any rank reported (ExitCode=1:0"), plain  # no line: as before
    RunFolder(run_dir).attempts.append("22", 0, {"ended": by, "preempted_by": by, "requeued": False, "note": note})
    RunFolder(run_dir).attempts.append("23", 0, {"ended": "hang", "requeued": False, "note": "a rank hung"})
    assert collect(job, "FAILED").message().splitlines()[1] == plain  # another job's line, or no preemption's
    RunFolder(run_dir).attempts.append("23", 0, {"ended": by, "preempted_by": by, "requeued": False, "note": note})
    assert collect(job, "FAILED").message().splitlines()[1:3] == [
        f"  {by}, while its tasks started: the job ended before any rank reported (ExitCode=1:0, "
        f"Reason=NonZeroExitCode); {note}; its error output ends:", "    srun: error: gl-n2: task 1: Terminated"]


def test_a_timeout_names_what_the_run_folder_shows(tmp_path: Path):
    from gpt.config import schema
    from helpers import compose
    from launch.backends.slurm.wait import timeout_line

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save = lambda *o: schema.save(launch_config.parse(compose("cluster=slurm", "cluster.time_min=5", *o)),  # noqa: E731
                                  run_dir / "config.yaml")
    save("checkpoint.interval_steps=5000")
    assert timeout_line(run_dir, "31", None) == (
        "it reached its time limit (cluster.time_min=5) before its first checkpoint, and no time-limit warning "
        "reached the ranks: raise cluster.time_min, or save more often (checkpoint.interval_steps=5000)")
    save("preemption.enabled=false")
    assert "with preemption.enabled=false: nothing saved it" in timeout_line(run_dir, "31", 100)
    (run_dir / "attempts.jsonl").write_text(attempt("31", 0, ended="preempted:SIGUSR2", requeued=False))
    assert timeout_line(run_dir, "31", 100).startswith("it was warned before its time limit, but the save and the "
                                                       "requeue did not finish in time: raise cluster.signal_delay_s")


def test_a_hang_report_from_before_the_wait_is_not_told_again(tmp_path):
    """Which reports are new is decided by the files there when the waiter began, not by comparing the report's
    time (another host's clock) with the waiter's."""
    import json

    from launch.recovery.hang import newest_hang
    from gpt.run_folder import RunFolder

    folder = RunFolder(tmp_path)
    (tmp_path / "hang-1.json").write_text(json.dumps({"summary": "old hang", "time": 4e9}))  # a clock far ahead
    earlier = set(folder.hang_records())
    assert newest_hang(tmp_path) == "old hang" and newest_hang(tmp_path, earlier) is None
    (tmp_path / "hang-2.json").write_text(json.dumps({"summary": "new hang", "time": 1.0}))  # a clock far behind
    assert newest_hang(tmp_path, earlier) == "new hang"


def test_the_waiter_backs_off_while_nothing_changes_and_is_fast_again_when_something_does():
    from launch.backends.slurm.wait import FAST_FOR_S, SLOW_POLL_S, Backoff

    backoff = Backoff(0.5, since=0.0)
    backoff.observe(("1 running", 1), now=0.0)
    assert backoff.interval(now=FAST_FOR_S - 1) == 0.5  # a minute at its own pace after a change
    assert backoff.interval(now=100.0) == 10.0  # then a tenth of the quiet time: a job's end is seen <= 10% late
    assert backoff.interval(now=3600.0) == SLOW_POLL_S
    backoff.observe(("1 running", 1), now=3600.0)  # the same: still slow
    assert backoff.interval(now=3601.0) == SLOW_POLL_S
    backoff.observe(("1 pending (Resources)", 1), now=3602.0)
    assert backoff.interval(now=3603.0) == 0.5


def test_only_running_jobs_and_jobs_that_just_changed_have_their_run_folders_read(tmp_path: Path, monkeypatch):
    from launch.backends.slurm import wait
    from launch.backends.slurm.commands import JobInfo

    jobs = {j: Submitted(Point(label=j, run_dir=tmp_path / j, job_name="g", resources=None), j, tmp_path)
            for j in ("1", "2", "3")}
    states = {"1": "RUNNING", "2": "PENDING", "3": "PENDING"}
    monkeypatch.setattr(wait.slurm_commands, "job_infos", lambda ids: {j: JobInfo(j, states[j]) for j in ids})
    watch = Watch()
    watch.poll(list(jobs))
    assert [s.job_id for s in watch.active(jobs)] == ["1", "2", "3"]  # the first poll: every state is news
    watch.poll(list(jobs))
    assert [s.job_id for s in watch.active(jobs)] == ["1"]  # a queued point costs the file system nothing
    states["1"] = "PENDING"  # requeued: its attempt's line is read once, at the change
    watch.poll(list(jobs))
    assert [s.job_id for s in watch.active(jobs)] == ["1"]
    watch.poll(list(jobs))
    assert watch.active(jobs) == []


def test_an_in_job_restart_is_told_with_the_nodes_it_ran_on_counted_past_eight(tmp_path: Path, capsys):
    from launch.run.attempts import ran_on

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    point = Point(label="run", run_dir=run_dir, job_name="gptlaunch", resources=None)
    (run_dir / "attempts.jsonl").write_text(attempt(
        "9", 0, ended="node failure: gl-n2 down", last_step=5, in_job_restart=1, replaced={"gl-n2": "gl-n3"},
        nodes=["gl-n1", "gl-n2"], note="restarting inside the allocation (in-job restart 1 of at most 3, gl-n3 "
                                        "replaces gl-n2)"))
    Watch().tell_requeues([Submitted(point, "9", tmp_path)])
    assert capsys.readouterr().err.splitlines() == [
        "job 9 (run): attempt 0 ended (node failure: gl-n2 down) at step 5: restarting inside the allocation "
        "(in-job restart 1 of at most 3, gl-n3 replaces gl-n2) (ran on gl-n1, gl-n2)"]
    assert ran_on(AttemptLine(nodes=tuple(f"n{i}" for i in range(1024)))) == " (ran on 1024 nodes)"
    assert ran_on(AttemptLine()) == ""


def test_a_chain_stands_where_its_link_in_flight_stands(tmp_path: Path, monkeypatch):
    """A chain's later links wait on its first (Dependency): while the first runs, the chain is running, and its run
    folder is read for news (a hang, a requeue); once the first has ended, the next link is the one in flight."""
    from launch.backends.slurm import wait
    from launch.backends.slurm.commands import JobInfo

    chain = Submitted(Point(label="run", run_dir=tmp_path / "run", job_name="g", resources=None), "11", tmp_path,
                      links=("10", "11"))
    states = {"10": JobInfo("10", "RUNNING"), "11": JobInfo("11", "PENDING", reason="Dependency")}
    monkeypatch.setattr(wait.slurm_commands, "job_infos", lambda ids: {j: states[j] for j in ids})
    watch, pending = Watch(), {"11": chain}
    watch.poll(list(chain.job_ids))
    watch.poll(list(chain.job_ids))
    assert watch.status(pending) == "1 running" and watch.active(pending) == [chain]
    states.update({"10": JobInfo("10", "TIMEOUT"), "11": JobInfo("11", "PENDING", reason="BeginTime")})
    watch.poll(list(chain.job_ids))
    assert watch.status(pending) == "1 pending (BeginTime)" and watch.active(pending) == [chain]  # it just changed


def test_a_job_completed_on_the_hosts_that_ran_ranks_not_on_its_idle_spare(tmp_path: Path):
    from launch.backends.slurm.wait import JobOutcome

    point = Point(label="run", run_dir=tmp_path / "run", job_name="g",
                  resources=SimpleNamespace(nodes=3, world_size=2))
    outcome = JobOutcome(Submitted(point, "5", tmp_path), "COMPLETED",
                      results=[{"rank": 0, "host": "n1", "summary": {}}, {"rank": 1, "host": "n2"},
                               {"rank": None, "host": "n3", "spare": True}])
    assert outcome.result["hosts"] == ["n1", "n2"]  # "COMPLETED on n1, n2"


def test_a_spare_task_that_ended_the_job_is_heard(tmp_path: Path, monkeypatch):
    """2 nodes and a spare: the training nodes' tasks were killed without a result, and the spare's task ended the job
    on its own deadline (launch.recovery.round_agent.RoundSilent). Its result file (task 2, past the world size) is
    read, and the user is told why, not only that no rank reported."""
    from submitit.core.utils import cloudpickle_dump

    from launch.backends.slurm import commands
    from launch.backends.slurm.wait import collect

    monkeypatch.setattr(commands, "scontrol_job", lambda job: None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    point = Point(label="run", run_dir=run_dir, job_name="g",
                  resources=SimpleNamespace(allocated_nodes=3, tasks_per_node=1, world_size=2))
    job = Submitted(point, "7", tmp_path)
    why = "n3 waited as a spare in round 0 of job 7 (restart 0), which showed no sign of life for 270 s"
    cloudpickle_dump(("error", f"Traceback ...\nlaunch.backends.slurm.task.RankFailed: {why}\n"),
                     job.paths(2).result_pickle)
    assert collect(job, "FAILED").message().splitlines()[:2] == ["job 7 (run) ended FAILED:", f"  {why}"]


def test_a_job_that_trained_on_past_refused_saves_says_so_beside_completed(tmp_path: Path):
    """checkpoint.on_save_error=continue: storage refused interval saves in two attempts, each attempt's line keeps
    their steps, and the job's last line names them all, not a plain COMPLETED."""
    from launch.backends.slurm.wait import JobOutcome, print_outcome

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "attempts.jsonl").write_text(attempt("5", 0, ended="preempted:SIGUSR2", requeued=True,
                                                    failed_saves=[40])
                                            + attempt("5", 1, ended="finished", failed_saves=[80, 120]))
    point = Point(label="run", run_dir=run_dir, job_name="g", resources=SimpleNamespace(nodes=1, world_size=1))
    out = io.StringIO()
    print_outcome(JobOutcome(Submitted(point, "5", tmp_path), "COMPLETED", results=[{"rank": 0, "host": "n1",
                                                                                   "summary": {}}]), out)
    assert out.getvalue().strip().endswith(
        "COMPLETED on n1; run folder: " + str(run_dir) + "; checkpoint saves failed at step(s) 40, 80, 120 "
        "(checkpoint.on_save_error=continue: the run trained on; see logs/rank0.log)")


def test_a_refused_save_is_told_while_the_job_runs_once_and_not_from_before_the_wait(tmp_path: Path, capsys):
    """A disk that fills during the run: rank 0's record of each refused save (RunFolder.note_save_failure) is one
    waiter line as it happens; a record from an earlier submission is not told again, nor is one told twice."""
    from gpt.run_folder import RunFolder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    folder = RunFolder(run_dir)
    folder.note_save_failure(40, "cannot write checkpoint .tmp-step_00000040: the disk is full")  # before the wait
    job = Submitted(Point(label="lr=0.1", run_dir=run_dir, job_name="g", resources=None), "8", tmp_path)
    watch = Watch(saves_told={run_dir: len(folder.read_save_failures())})
    watch.tell_failed_saves([job])
    assert capsys.readouterr().err == ""
    folder.note_save_failure(80, "cannot write checkpoint .tmp-step_00000080: the disk is full")
    with open(folder.save_failures, "a") as f:
        f.write('{"step": 120, "err')  # being written
    watch.tell_failed_saves([job])
    watch.tell_failed_saves([job])
    assert capsys.readouterr().err.splitlines() == [
        "job 8 (lr=0.1): checkpoint save at step 80 failed: cannot write checkpoint .tmp-step_00000080: the disk is "
        "full (checkpoint.on_save_error=continue: training goes on)"]


def finished_on_a_spare(run_dir: Path, job_id: str) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "attempts.jsonl").write_text(
        attempt(job_id, 0, ended="hang", in_job_restart=1, replaced={"n2": "n3"})
        + attempt(job_id, 0, round=1, ended="finished"))


def test_srun_outlives_a_run_finished_on_spares_after_linger_s_not_before(tmp_path: Path, monkeypatch):
    """A cut node's task cannot tell srun it ended: srun would wait for Slurm to declare the node down. It is ended
    LINGER_S after the run finished on spares; never for another job's run, nor for a run that lost no node."""
    from launch.backends.slurm import spare_exit
    from launch.backends.slurm.spare_exit import LINGER_S, Linger

    clock = [100.0]
    monkeypatch.setattr(spare_exit.time, "monotonic", lambda: clock[0])
    finished_on_a_spare(tmp_path / "run", "5")
    linger, other = Linger(tmp_path / "run", "5"), Linger(tmp_path / "run", "6")
    assert not linger.over() and not other.over()  # seen finished at 100
    clock[0] += LINGER_S - 1
    assert not linger.over()
    clock[0] += 1
    assert linger.over() and not other.over()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "attempts.jsonl").write_text(attempt("5", 0, ended="finished"))
    plain = Linger(tmp_path / "plain", "5")
    clock[0] += 1000
    assert not plain.over()


def test_a_completing_job_whose_run_finished_on_spares_has_ended(tmp_path: Path):
    """Slurm keeps a job COMPLETING while a node it cannot reach has not answered (SlurmdTimeout): once its run
    finished on spares (the batch script then exits 0), the waiter reports it COMPLETED, not after five minutes."""
    from launch.backends.slurm.commands import JobInfo
    from launch.backends.slurm.wait import ended

    finished_on_a_spare(tmp_path / "run", "5")
    point = Point(label="run", run_dir=tmp_path / "run", job_name="g", resources=None)
    job = [Submitted(point, "5", tmp_path)]
    assert ended(JobInfo("5", "COMPLETING", "None"), job) == "COMPLETED"
    assert ended(JobInfo("5", "RUNNING", "None"), job) is None
    assert ended(JobInfo("5", "FAILED", "None"), job) == "FAILED"
    (tmp_path / "run" / "attempts.jsonl").write_text(attempt("5", 0, ended="finished"))  # no node was replaced
    assert ended(JobInfo("5", "COMPLETING", "None"), job) is None


def test_an_attempt_killed_past_its_last_save_says_what_it_trained_and_where_the_run_resumes(tmp_path: Path):
    """Killed outright after 430 steps without a checkpoint: not 'at step 0', but the step it trained to and the step
    the run resumes from; with a checkpoint at 400, the same."""
    from launch.backends.slurm.wait import requeue_line
    from launch.run.attempts import log_killed

    metrics = RunFolder(tmp_path).metrics_file(0)
    metrics.parent.mkdir(parents=True)
    records = (json.dumps({"kind": "train", "step": s, STEP_COUNTS: "done", "time": 100.0 + s}) + "\n"
               for s in range(1, 431))
    metrics.write_text("".join(records))
    mark = {"job_id": "7", "restart": 0, "round": 0, "started": 100.0, "first_step": 0}
    log_killed(tmp_path, mark, 0, {"ended": "killed outright", "note": "requeued job 7", "requeued": True})
    log_killed(tmp_path, {**mark, "restart": 1}, 400, {"ended": "killed outright", "note": "requeued job 7"})
    first, second = RunFolder(tmp_path).attempts.read()
    assert requeue_line(first) == ("attempt 0 ended (killed outright) after step 430 (the run resumes from the start: "
                                   "no checkpoint yet): requeued job 7")
    assert requeue_line(second).startswith("attempt 1 ended (killed outright) after step 430 (the run resumes from "
                                           "step 400)")


def test_a_ranks_refusal_is_told_whole_and_the_same_command_is_not_said_to_continue(tmp_path: Path):
    """A rank that stops the run on its own error (exit code 2: here the data prepared again under it) is told with
    its whole message, not its first sentence, and the waiter does not promise that the same command continues."""
    from launch.backends.slurm.task import describe_failure
    from launch.backends.slurm.wait import JobOutcome

    run_dir = tmp_path / "run"
    log_file = RunFolder(run_dir).log(0)
    log_file.parent.mkdir(parents=True)
    log_file.write_text("[rank0 12:00:01 INFO] starting\n"
                        f"[rank0 12:00:02 ERROR] {run_dir} holds a run with other settings (step 760); it cannot "
                        "continue with these. Differing keys:\n"
                        "  data.text_md5: input.txt changed (1,115,394 -> 1,115,400 bytes) since the run trained on it\n"
                        "Run it with its own settings, or start a new run under another name (run=NAME).\n")
    line = describe_failure(0, "gl-n1", 2, run_dir)
    assert line == (f"rank 0 on gl-n1 stopped the run: {run_dir} holds a run with other settings (step 760); it cannot "
                    "continue with these. Differing keys: data.text_md5: input.txt changed (1,115,394 -> 1,115,400 "
                    "bytes) since the run trained on it; Run it with its own settings, or start a new run under "
                    f"another name (run=NAME). (its log: {log_file})")
    (RunFolder(run_dir).checkpoints / "step_00000760").mkdir(parents=True)
    for name in ("meta.json", ".metadata"):
        (RunFolder(run_dir).checkpoints / "step_00000760" / name).write_text("{}")
    point = Point(label="run", run_dir=run_dir, job_name="gptlaunch", resources=None)
    said = JobOutcome(Submitted(point, "19", tmp_path), "FAILED", errors=[line]).message()
    assert "  once that is put right, the same command continues the run from its newest checkpoint (step 760)" in said
    assert "\n  the same command continues" not in said
