"""Code snapshots (launch.snapshot) and the verbs' reading of run folders, without Slurm."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest

from gpt.config import schema
from gpt.run_folder import STEP_COUNTS
from launch import launch_config
from helpers import REPO, compose
from launch import snapshot
from launch.run_status import read_status, run_folders


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_snapshot_holds_head_plus_uncommitted_and_new_files_and_records_dirty(tmp_path):
    root = tmp_path / "checkout"
    (root / "gpt").mkdir(parents=True)
    (root / "gpt" / "a.py").write_text("A = 1\n")
    (root / ".gitignore").write_text("*.log\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = snapshot.take(tmp_path / "sub", root)
    assert clean.commit and clean.dirty is False
    (root / "gpt" / "a.py").write_text("A = 2\n")
    (root / "gpt" / "new.py").write_text("B = 1\n")  # not added yet: still what the job must run
    (root / "gpt" / "noise.log").write_text("ignored")
    taken = snapshot.take(tmp_path / "sub", root)
    assert taken.dirty is True and taken.path != clean.path
    assert (taken.path / "gpt" / "a.py").read_text() == "A = 2\n" and (taken.path / "gpt" / "new.py").is_file()
    assert not (taken.path / "gpt" / "noise.log").exists()
    assert "+A = 2" in (taken.path / "uncommitted.diff").read_text()
    assert json.loads((taken.path / "code.json").read_text())["dirty"] is True
    (root / "gpt" / "a.py").write_text("A = 3\n")  # the checkout moves on; the snapshot does not
    assert (taken.path / "gpt" / "a.py").read_text() == "A = 2\n"
    assert taken.setup_lines() == (f'export PYTHONPATH={taken.path}"${{PYTHONPATH:+:$PYTHONPATH}}"',
                                   "export PYTHONSAFEPATH=1")


@pytest.mark.parametrize("folder", ["a b", "x$(touch pwned)", "it's `touch pwned`; *"])
def test_the_snapshot_lines_put_the_snapshot_on_the_path_in_a_real_shell_whatever_its_folder(tmp_path, folder):
    """The batch script's lines, run by bash: the snapshot's path whole (a space split it, and the job ran the live
    checkout), and nothing in it run (a run name is part of the path)."""
    root = tmp_path / "plain"
    (root / "launch").mkdir(parents=True)
    (root / "launch" / "x.py").write_text("X = 1\n")
    taken = snapshot.take(tmp_path / folder, root)
    script = "\n".join(taken.setup_lines()) + '\nprintf "%s|%s" "$PYTHONPATH" "$PYTHONSAFEPATH"\n'
    for before, after in (({}, ""), ({"PYTHONPATH": "/earlier"}, ":/earlier")):
        out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={"PATH": os.environ["PATH"], **before},
                             capture_output=True, text=True, check=True)
        assert (out.stdout, out.stderr) == (f"{taken.path}{after}|1", "")
    assert not list(tmp_path.rglob("pwned"))


def test_snapshot_without_git_copies_the_package(tmp_path):
    root = tmp_path / "plain"
    (root / "launch" / "__pycache__").mkdir(parents=True)
    (root / "launch" / "x.py").write_text("X = 1\n")
    (root / "launch" / "__pycache__" / "x.pyc").write_text("")
    taken = snapshot.take(tmp_path / "sub", root)
    assert taken.commit is None and (taken.path / "launch" / "x.py").is_file()
    assert not (taken.path / "launch" / "__pycache__").exists()


def test_snapshots_taken_in_the_same_second_by_two_launches_each_get_a_folder_of_their_own(tmp_path, monkeypatch):
    """Two sweeps submitted into one folder at once: each claims its own name; one part-way (its temporary folder
    there, as a launch killed while copying leaves it) stops neither."""
    import threading

    root = tmp_path / "plain"
    (root / "launch").mkdir(parents=True)
    (root / "launch" / "x.py").write_text("X = 1\n")
    monkeypatch.setattr(snapshot.time, "strftime", lambda fmt: "20261129-053526")
    (tmp_path / "sub" / "code" / ".20261129-053526.tmp").mkdir(parents=True)
    taken, start = [], threading.Barrier(3)

    def take():
        start.wait()
        taken.append(snapshot.take(tmp_path / "sub", root))

    threads = [threading.Thread(target=take) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(t.path.name for t in taken) == ["20261129-053526", "20261129-053526.1", "20261129-053526.2"]
    assert all(json.loads((t.path / "code.json").read_text())["path"] == str(t.path) for t in taken)
    assert all((t.path / "launch" / "x.py").is_file() for t in taken)


def test_a_snapshot_of_this_checkout_is_fast(tmp_path):
    import time

    started = time.perf_counter()
    taken = snapshot.take(tmp_path, REPO)
    assert time.perf_counter() - started < 1.0
    assert (taken.path / "launch" / "snapshot.py").is_file() and (taken.path / "configs" / "config.yaml").is_file()


@pytest.mark.parametrize("counted", [{STEP_COUNTS: "done"}, {}], ids=["steps-done", "older-folder"])
def test_status_of_a_finished_run_folder_reads_steps_attempts_and_goodput(tmp_path, counted):
    """An older folder's train records counted their steps from 0: its last, step 4, was the 5th."""
    run = tmp_path / "sweep" / "nodes=1"
    (run / "metrics").mkdir(parents=True)
    schema.save(launch_config.parse(compose("train.max_steps=5")), run / "config.yaml")
    first = 1 if counted else 0
    (run / "metrics" / "rank0.jsonl").write_text("".join(
        json.dumps({"kind": "train", "step": s, **counted, "tokens_per_s": t, "step_time_s": 0.5}) + "\n"
        for s, t in enumerate((10.0, 100.0, 110.0, 90.0, 40.0), first)))  # status says the report's figure: the
    # median after the first window (compiling), not the last one
    (run / "attempts.jsonl").write_text(json.dumps({"ended": "finished", "goodput": {
        "allocated_s": 4.0, "train_s": 2.0, "steps": 5}}) + "\n")
    (run / "summary.json").write_text("{}")
    (run / "run.json").write_text("{}")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "config.yaml").write_text("defaults: []\n")  # Hydra's, not a run
    (tmp_path / "again").symlink_to(tmp_path / "sweep")
    assert run_folders(tmp_path) == [run]
    status = read_status(run, {})
    assert (status.step, status.max_steps, status.attempts, status.goodput, status.verdict) == (5, 5, 1, 0.5, "finished")
    proc = subprocess.run([sys.executable, "-m", "launch.status", str(tmp_path / "sweep")], capture_output=True,
                          text=True, cwd=REPO, env={"PATH": "/nonexistent"})  # no Slurm here: the files tell
    assert proc.returncode == 0, proc.stderr
    assert "nodes=1: no job, step 5/5, 95 tokens/s, 1 attempt(s), 0 restart(s), goodput 50%, finished" \
        in proc.stdout
    # continued to 6 steps, its next attempt failed: the summary of the first is no longer where the run stands
    schema.save(launch_config.parse(compose("train.max_steps=6")), run / "config.yaml")
    with (run / "attempts.jsonl").open("a") as f:
        f.write(json.dumps({"first_step": None, "last_step": None, "ended": "failed: RuntimeError"}) + "\n")
    assert read_status(run, {}).verdict == "failed"


def test_status_names_the_nodes_a_requeue_left_out_as_the_reports_nodes_table_does(tmp_path):
    from launch.status import line

    run = tmp_path / "slow"
    (run / "metrics").mkdir(parents=True)
    schema.save(launch_config.parse(compose("train.max_steps=3")), run / "config.yaml")
    (run / "attempts.jsonl").write_text("".join(json.dumps(a) + "\n" for a in [
        {"job_id": "7", "restart": 0, "ended": "preempted:SIGUSR2", "requeued": True, "straggler": {"host": "gl6-n4"},
         "note": "requeued job 7 (restart 1 of at most 10), without gl6-n2,gl6-n4 (ExcNodeList)"},
        {"job_id": "7", "restart": 1, "ended": "finished"}]))
    said = line(read_status(run, {}), tmp_path)
    assert "2 attempt(s), 1 restart(s) (last interrupted: preempted:SIGUSR2), excluded gl6-n2, gl6-n4," in said, said


@pytest.mark.slow  # seconds of CPU: out of make test-fast's slice
def test_status_prints_one_line_per_in_job_restart(tmp_path):
    run = tmp_path / "run"
    (run / "metrics").mkdir(parents=True)
    schema.save(launch_config.parse(compose("train.max_steps=3")), run / "config.yaml")
    (run / "run.json").write_text("{}")
    restart = {"job_id": "7", "restart": 0, "ended": "hang", "last_step": 20, "in_job_restart": 1,
               "note": "restarting inside the allocation (in-job restart 1 of at most 3, n3 replaces n2)"}
    halved = "rank 1 ran out of device memory at step 30 with micro-batch 8: the requeued job trains with micro-batch 4"
    requeued = {"job_id": "7", "restart": 0, "round": 1, "ended": "out of memory", "requeued": True, "note": halved,
                "out_of_memory": {"rank": 1, "step": 30, "micro_batch": 8, "next_micro_batch": 4}}
    (run / "attempts.jsonl").write_text("".join(json.dumps(a) + "\n" for a in [
        restart, requeued, {"job_id": "7", "restart": 1, "ended": "finished"}]))
    proc = subprocess.run([sys.executable, "-m", "launch.status", str(run)], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": "/nonexistent"})
    assert "\n  in-job restart 1 of job 7: hang at step 20; restarting inside the allocation (in-job restart 1 of " \
           f"at most 3, n3 replaces n2)\n  out of memory in job 7: {halved}\n" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_detach_is_refused_where_no_job_is_submitted(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch", "hydra.launcher.detach=true", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "hydra.launcher.detach" in proc.stderr and "only cluster=slurm jobs" in proc.stderr


def test_eval_jobs_are_refused_where_no_job_is_submitted(tmp_path):
    from helpers import launch
    proc = launch("eval.after_save=job", run_dir=tmp_path, check=False)
    assert proc.returncode == 2 and "eval.after_save='job' is not valid: none with cluster=local: evaluation jobs are " \
        "Slurm jobs (cluster=slurm); python -m gpt.evaluate RUN --step N scores a checkpoint here" in proc.stderr, \
        proc.stderr


def test_status_waits_for_the_report_job_of_a_sweep_whose_runs_finished(tmp_path, monkeypatch):
    """A script polling status reads the report once status exits 0: while the report job runs, the report is half
    written (3 of its 8 files), so status exits 3 as it does for a detached search's job."""
    from launch import status as status_verb
    from launch.backends.job_state import JobStanding, JobState

    run = tmp_path / "nodes=1"
    run.mkdir()
    schema.save(launch_config.parse(compose("train.max_steps=3")), run / "config.yaml")
    (run / "attempts.jsonl").write_text(json.dumps({"ended": "finished", "last_step": 2}) + "\n")
    (run / "summary.json").write_text("{}")
    (run / "run.json").write_text("{}")
    (tmp_path / "report_job.json").write_text(json.dumps({"job_id": "7"}))
    for state, code in ((JobState.RUNNING, 3), (JobState.ENDED, 0)):
        monkeypatch.setattr(status_verb, "standings", lambda ids, state=state: {"7": JobStanding("7", state, "X")})
        assert status_verb.status(tmp_path, out=io.StringIO()) == code, state


def test_waiting_for_a_live_job_needs_the_config_it_trains_with(tmp_path):
    """The same command picks a live job up (it waits for it); another setting would be silently ignored by the
    job, which reads the folder's config.yaml, so it is refused naming the job and the keys. The launcher section
    is the command's own (what a sweep judges its points by)."""
    import pytest

    from gpt.config.schema import save
    from launch import launch_config
    from gpt.errors import UserError
    from helpers import compose
    from launch.planning.plan import check_same_config

    run = launch_config.parse(compose("model=tiny", "train.lr=1e-3"))
    save(run, tmp_path / "config.yaml")
    check_same_config(launch_config.parse(compose("model=tiny", "train.lr=1e-3", "launcher.objective=train_loss")),
                      tmp_path, "42")
    with pytest.raises(UserError, match=r"belongs to job 42.*train\.lr: 0\.001 in the folder, 0\.0003 here.*"
                       r"python -m launch\.cancel "):
        check_same_config(launch_config.parse(compose("model=tiny", "train.lr=3e-4")), tmp_path, "42")
    with pytest.raises(UserError, match=r"\(cluster\.name: 'local' in the folder, 'srun' here; nodes: 1 in the folder, 'auto' here\)"):
        check_same_config(launch_config.parse(compose("model=tiny", "train.lr=1e-3", "cluster=srun")), tmp_path, "42")


def test_the_verbs_see_the_job_a_run_recorded_from_inside_beside_its_submissions(tmp_path):
    """A run started inside a job it did not submit (`sbatch slurm/multi_node.sh`, a stock launcher, `salloc`) has no
    slurm_job.json: its ranks record the job they run in, and status, list and cancel ask about it, in the order the
    records were written."""
    import os

    from launch.rank.job_env import JobEnvironment
    from launch.run.job_record import record_job
    from launch.run_status import job_ids

    class InJob(JobEnvironment):
        scheduler = "some"

        @property
        def job_id(self) -> str | None:
            return self.environ["JOB"]

    record_job(tmp_path, JobEnvironment({}))  # no job: nothing to record
    assert job_ids(tmp_path) == ()
    record_job(tmp_path, InJob({"JOB": "42"}))
    assert job_ids(tmp_path) == ("42",)
    (tmp_path / "slurm_job.json").write_text(json.dumps({"job_id": "43"}))  # submitted after it
    assert job_ids(tmp_path) == ("42", "43")
    os.utime(tmp_path / "slurm_job.json", (1, 1))
    assert job_ids(tmp_path) == ("43", "42")
    record_job(tmp_path, InJob({"JOB": "43"}))  # the submitted job itself: listed once
    assert job_ids(tmp_path) == ("43",)


def test_a_run_that_failed_inside_a_live_allocation_is_not_shown_running(tmp_path):
    """`salloc`, then a launch that fails (cluster=local or srun): the allocation still runs, but the run does not;
    a new launch in the allocation (it records the job again) runs it once more."""
    from launch.backends.job_state import JobStanding, JobState
    from launch.run_status import FAILED, WAITING
    from gpt.run_folder import RunFolder

    def job_json(at: float) -> None:
        (tmp_path / "job.json").write_text(json.dumps({"job_id": "42", "scheduler": "slurm", "time": at}))

    allocation = {"42": JobStanding("42", JobState.RUNNING, "RUNNING")}
    job_json(1.0)
    assert read_status(tmp_path, allocation).verdict == WAITING  # the launch's first attempt trains
    RunFolder(tmp_path).attempts.append("42", 0, {"first_step": 0, "last_step": 3, "ended": "failed: RuntimeError"})
    assert read_status(tmp_path, allocation).verdict == FAILED
    job_json(time.time() + 1)  # launched again inside the allocation
    assert read_status(tmp_path, allocation).verdict == WAITING


def test_a_run_stopped_by_a_signal_or_a_preemption_is_stopped_not_failed(tmp_path):
    """A run whose newest attempt saved after Ctrl-C, a signal, or a preemption that cancels (not requeued) is
    stopped, and says how: the same command continues it. One that requeued and whose job is gone, or that failed,
    is failed; status says how the newest interrupted attempt ended either way."""
    from launch.run_status import FAILED, STOPPED
    from launch.status import line
    from gpt.run_folder import RunFolder

    attempts = RunFolder(tmp_path).attempts
    attempts.append("7", 0, {"first_step": 0, "last_step": 9, "ended": "preempted by another job (Slurm, at 12:00; "
                             "partition lowcancel, PreemptMode=CANCEL, GraceTime=20 s)", "requeued": False})
    saved = tmp_path / "checkpoints" / "step_00000009"  # the save at the stop, after the last logged step (5)
    saved.mkdir(parents=True)
    (saved / ".metadata").write_bytes(b"")
    (saved / "meta.json").write_text(json.dumps({"files": {}, "save_index": 0}))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "rank0.jsonl").write_text(json.dumps({"kind": "train", "step": 5, STEP_COUNTS: "done"})
                                                      + "\n")
    stopped = read_status(tmp_path, {})
    assert stopped.verdict == STOPPED and stopped.interrupted.startswith("preempted by another job"), stopped
    assert stopped.step == 9, stopped
    status_line = line(stopped, tmp_path)
    assert "(last interrupted: preempted by another job (Slurm" in status_line and status_line.endswith(STOPPED)
    attempts.append("8", 0, {"first_step": 9, "last_step": 12, "ended": "failed: RuntimeError"})
    assert read_status(tmp_path, {}).verdict == FAILED


def test_logs_of_a_rank_the_run_does_not_have_says_which_it_has(tmp_path, capsys):
    from launch import logs

    (tmp_path / "logs").mkdir()
    (tmp_path / "config.yaml").write_text("nodes: 2\ncluster:\n  tasks_per_node: 1\n")
    (tmp_path / "logs" / "rank1.log").write_text("[rank1] step 1\n")
    (tmp_path / "logs" / "rank3.log").write_text("[rank3] an earlier attempt on 4 ranks\n")
    with pytest.raises(SystemExit) as ended:
        logs.main([str(tmp_path), "--rank", "5"])
    assert ended.value.code == 2 and capsys.readouterr().err == f"error: --rank 5: {tmp_path} runs ranks 0 to 1\n"
    for rank in (1, 3):
        logs.main([str(tmp_path), "--rank", str(rank)])
        assert capsys.readouterr().out.startswith(f"[rank{rank}]")
