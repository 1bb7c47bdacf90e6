"""Cells of docs/fault-tolerance.md's table of every interruption against every entry point that no scenario of their
own shows: the launcher's decision, with Slurm's commands stood in for as commands.run calls them (the error path is
the real one)."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from gpt.errors import EXIT_UNKNOWN, UserError
from gpt.run_folder import Next, RunFolder
from launch.backends import scheduler
from launch.backends.slurm import commands
from launch.rank.job_env import JobEnvironment
from launch.recovery.decision import Cause, Ending, recover
from launch.run.identity import check_queued_job


def slurm(answers: dict[str, str], asked: list[str] | None = None):
    """subprocess.run for commands.run: the commands named answer so, every other one times out (an outage);
    `asked` collects each command's name."""
    def run(cmd, **kw):
        (asked if asked is not None else []).append(cmd[0])
        if cmd[0] in answers:
            return subprocess.CompletedProcess(cmd, 0, answers[cmd[0]], "")
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))
    return run


def folder_of_job(tmp_path, job_id: str = "5"):
    (tmp_path / "slurm_job.json").write_text(json.dumps({"job_id": job_id}))
    return tmp_path


def test_a_local_launch_during_a_slurm_outage_goes_on(tmp_path, monkeypatch):
    """cluster=local asks Slurm whether the job its folder records still waits: without an answer that is no job
    (a machine without Slurm never answers either), and the folder's lease, which needs no Slurm, guards a live
    holder. The same question answered PENDING refuses the launch, naming the job."""
    run_dir, ask = folder_of_job(tmp_path), (lambda j: scheduler().job_state(j))
    monkeypatch.setattr(commands.subprocess, "run", slurm({}))
    check_queued_job(run_dir, JobEnvironment({}), ask)
    pending = "JobId=5 JobName=run JobState=PENDING Reason=Priority UserId=me(1000)\n"
    monkeypatch.setattr(commands.subprocess, "run", slurm({"scontrol": pending}))
    with pytest.raises(UserError, match="belongs to job 5, which is PENDING"):
        check_queued_job(run_dir, JobEnvironment({}), ask)


class Link(JobEnvironment):
    """A chain's link (job 77) whose next link, job 78, waits; it records what is asked of the scheduler."""
    scheduler = "stand-in"

    def __init__(self):
        super().__init__({})
        self.asked: list[str] = []

    @property
    def job_id(self) -> str:
        return "77"

    def next_link(self, run_dir) -> str | None:
        return "78"

    def requeue(self, max_restarts: int) -> tuple[bool, str]:
        self.asked.append("requeue")
        return True, "requeued job 77"


@pytest.mark.parametrize("said", ["preempted by another job (Slurm, at T; partition low, PreemptMode=REQUEUE)",
                                  "preempted by another job (Slurm, at T; partition lowcancel, PreemptMode=CANCEL)"])
def test_a_preempted_chain_link_hands_the_run_to_the_next_link_whatever_the_preemption_mode(tmp_path, said):
    """It ends inside its grace time, so Slurm requeues it under neither mode, and the next link continues the run:
    a requeue would run it again ahead of that link."""
    job = Link()
    got = recover(Ending(tmp_path, job, Cause.PREEMPTED, said, 5, record={"first_step": 0, "last_step": 4,
                                                                            "preempted_by": said}))
    assert (got.next, got.link, job.asked) == (Next.NEXT_LINK, "78", [])
    assert got.note == "ends here: job 78, the chain's next link, continues the run"
    (line,) = RunFolder(tmp_path).attempts.read()
    assert (line.ended, line.next_link, line.requeued) == (said, "78", False)


def test_a_links_hand_over_during_a_slurm_outage_trusts_the_run_folders_record(tmp_path, monkeypatch):
    """Slurm cannot say whether the next link still waits: the record of the chain's links is trusted, so the link
    ends rather than requeue itself ahead of a link that may well start."""
    from launch.backends.slurm.chain import next_link

    (tmp_path / "slurm_job.json").write_text(json.dumps({"job_id": "9", "chain": ["7", "8", "9"]}))
    monkeypatch.setattr(commands.subprocess, "run", slurm({}))
    assert next_link(tmp_path, "7") == "8" and next_link(tmp_path, "9") is None


@pytest.mark.parametrize("chain", [[], ["cluster.chain=3"]], ids=["one job", "a chain"])
@pytest.mark.parametrize("answers, unanswered", [({"sinfo": "debug*|4|8|16000|(null)|8:00:00|up\n"}, "squeue"),
                                                 ({}, "sinfo")])
def test_a_slurm_launch_during_an_outage_says_slurm_does_not_answer_and_submits_nothing(tmp_path, monkeypatch,
                                                                                        capsys, answers, unanswered,
                                                                                        chain):
    """cluster=slurm asks whether the job its folder records still waits or runs: no answer is not "no job" (the
    same command would submit a second job of the run), so it stops in one line, exit 4 as launch.status's unknown.
    An unanswered sinfo (the partitions' check, first) is the same outage, not a user's error. A chain's launch
    likewise submits none of its links."""
    from launch import app
    from launch.backends.slurm import partitions

    run_dir, asked = folder_of_job(tmp_path), []
    monkeypatch.setattr(commands.subprocess, "run", slurm(answers, asked))
    monkeypatch.setattr(partitions, "require_slurm", lambda: None)
    partitions._sinfo.cache_clear()  # one sinfo per PATH: this test's own answer
    monkeypatch.setattr(sys, "argv", ["launch", "cluster=slurm", "model=tiny", *chain, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as stop:
        app.main()
    partitions._sinfo.cache_clear()
    err = capsys.readouterr().err
    assert stop.value.code == EXIT_UNKNOWN == 4 and "sbatch" not in asked and "git" not in asked, (asked, err)
    assert err.startswith(f"error: Slurm does not answer ({unanswered} ") and err.count("\n") == 1, err
    assert err.endswith("nothing was submitted; run this command again once it answers\n"), err


CANCELS = "preempted by another job (Slurm, at T; partition lowcancel, PreemptMode=CANCEL, GraceTime=20 s)"


def stopped_point(tmp_path, monkeypatch):
    """Job 12, the point `lowcancel` of a sweep, preempted under PreemptMode=CANCEL: its attempt's line as recovery
    writes it, and the job as the waiter collects it (each task failed with the rank's line, and Slurm said FAILED)."""
    from launch.backends import Point
    from launch.backends.slurm.job import SlurmJob
    from launch.backends.slurm.submitted import Submitted
    from launch.backends.slurm.task import not_requeued
    from launch.backends.slurm.wait import JobOutcome
    from launch.rank.job_env import Preemption

    run_dir = tmp_path / "cluster.partition=lowcancel"
    run_dir.mkdir()
    job = SlurmJob({"SLURM_JOB_ID": "12"})
    monkeypatch.setattr(SlurmJob, "preemption", lambda self: Preemption(CANCELS, False))
    got = recover(Ending(run_dir, job, Cause.PREEMPTED, CANCELS, 5, record={"first_step": 0, "last_step": 7,
                                                                            "preempted_by": CANCELS}))
    assert got.next is Next.STOP and got.note.startswith("not requeued: Slurm's preemption cancels job 12; "), got
    errors = [not_requeued(r, f"n{r}", RunFolder(run_dir), job, 0) for r in (0, 1)]
    point = Point("cluster.partition=lowcancel", run_dir, "gptlaunch", SimpleNamespace(nodes=1, world_size=1))
    return JobOutcome(Submitted(point, "12", tmp_path), "FAILED", errors=errors), got.note


def test_a_point_preempted_under_cancel_is_said_once_as_preempted_and_not_requeued_not_as_failed(tmp_path,
                                                                                                 monkeypatch, capsys):
    """The site's policy ends the job: the point stopped, it did not fail. One line says how it ended, that Slurm's
    preemption does not requeue it, and how the same command continues it."""
    from launch.backends.slurm.wait import print_outcome

    outcome, note = stopped_point(tmp_path, monkeypatch)
    print_outcome(outcome, sys.stdout)
    out, err = capsys.readouterr()
    assert (out, err) == (f"job 12 (cluster.partition=lowcancel) {CANCELS}: {note}\n", "")
    assert out.count("the same command continues") == 1 and "FAILED" not in out


def test_a_sweep_with_a_point_preempted_under_cancel_exits_1_as_a_single_run_and_fails_nothing(tmp_path, monkeypatch,
                                                                                                capsys):
    """Exit 1, as a single run whose job stopped so and as launch.status's "stopped": the sweep did not finish. No
    job is said to have failed, and how to continue is not said again."""
    from hydra.core.utils import JobReturn

    from launch.backends import Point
    from launch.backends.slurm.submitted import Submitted
    from launch.backends.slurm.wait import JobOutcome
    from launch.hydra_launcher import _collect

    stopped, _ = stopped_point(tmp_path, monkeypatch)
    low = tmp_path / "cluster.partition=low"
    low.mkdir()
    one_node = SimpleNamespace(nodes=1, world_size=1)
    finished = JobOutcome(Submitted(Point("cluster.partition=low", low, "gptlaunch", one_node), "11", tmp_path),
                          "COMPLETED", results=[{"rank": 0, "host": "n1"}])
    planned = [SimpleNamespace(plan=SimpleNamespace(run_dir=o.submitted.point.run_dir),
                               run=SimpleNamespace(launcher=SimpleNamespace(objective="val_loss")))
               for o in (finished, stopped)]
    points = [(n, [], None, JobReturn()) for n in range(2)]
    with pytest.raises(SystemExit) as stop:
        _collect([finished, stopped], list(enumerate(planned)), points, [None, None], stop=True)
    assert stop.value.code == 1 and capsys.readouterr().err == ""


@pytest.mark.parametrize("cause, ended", [(Cause.LOST_RANK, "rank 1 on n2 was killed by SIGKILL"),
                                          (Cause.HANG, "hang"), (Cause.NODE_FAILURE, "node failure: n2 down")],
                         ids=["lost rank", "hang", "node failure"])
def test_a_chain_link_that_loses_a_rank_or_a_node_or_hangs_hands_the_run_to_the_next_link(tmp_path, cause, ended):
    """Detected as under cluster=slurm; with no spare to restart on inside the allocation, the next link, already
    queued, continues the run: a requeue would run this link again ahead of it. The link's line says so."""
    job = Link()
    got = recover(Ending(tmp_path, job, cause, ended, 5, record={"first_step": 0, "last_step": 4}, began=0))
    assert (got.next, got.link, job.asked) == (Next.NEXT_LINK, "78", [])
    (line,) = RunFolder(tmp_path).attempts.read()
    assert (line.ended, line.next_link, line.requeued) == (ended, "78", False)
    assert line.note.endswith("ends here: job 78, the chain's next link, continues the run"), line.note


@pytest.mark.parametrize("cause, ended, update", [
    (Cause.HANG, "hang", [["scontrol", "update", "jobid=11_1", "ExcNodeList=n2"]]),
    (Cause.NODE_FAILURE, "node failure: n2 down", [])], ids=["hang", "node failure"])  # Slurm keeps it off n2
def test_a_point_of_a_sweeps_job_array_that_hangs_or_loses_a_node_requeues_its_own_task_and_no_other_point(
        tmp_path, monkeypatch, cause, ended, update):
    """Points with equal resources are the tasks of one job array: a point that hangs (its watchdog names the host)
    or loses a node is requeued as its own array task, 11_1, without the host; `scontrol requeue 11` would requeue
    every point."""
    from launch.backends.slurm.job import SlurmJob

    asked: list[list[str]] = []

    def run(cmd, **kw):
        asked.append(cmd)
        running = "JobId=12 ArrayJobId=11 ArrayTaskId=1 JobState=RUNNING Reason=None Restarts=0 NodeList=n[1-2]\n"
        out = running if cmd[:3] == ["scontrol", "-o", "show"] else "n1\nn2\n" if "hostnames" in cmd else ""
        return subprocess.CompletedProcess(cmd, 0, out, "")
    monkeypatch.setattr(commands.subprocess, "run", run)
    job = SlurmJob({"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "11", "SLURM_ARRAY_TASK_ID": "1",
                    "SLURM_JOB_NODELIST": "n[1-2]"})
    got = recover(Ending(tmp_path, job, cause, ended, 5, hosts=("n2",), record={"first_step": 0}, began=0))
    assert got.next is Next.REQUEUE and got.note.startswith("requeued job 11_1 (restart 1 of at most 5)"), got
    told = [c for c in asked if c[0] == "scontrol" and c[1] in ("update", "requeue")]
    assert told == [["scontrol", "requeue", "11_1"], *update], asked  # the exclusion once it no longer runs


class Trials:
    """The launcher under the Optuna sweeper: each trial's run ends as `ends` says, by recovery's own decision
    (`recover`, which writes the attempt's line the sweeper then reads), and comes back as the launcher returns it."""

    def __init__(self, sweep, monkeypatch, ends):
        self.sweep, self.monkeypatch, self.ends, self.launched = sweep, monkeypatch, ends, []

    def launch(self, job_overrides, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        from launch.hydra_launcher import PointReturn

        returns = []
        for n, overrides in enumerate(job_overrides, initial_job_idx):
            self.launched.append(n)
            run_dir = self.sweep / f"trial={n},{overrides[0]}"
            run_dir.mkdir(parents=True, exist_ok=True)
            how = self.ends[n] if n < len(self.ends) else "finished"
            ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
            summary = {"val_loss": 1.0 + n} if how == "finished" else {}
            if how == "cancelled":  # scancel or launch.cancel of the trial's job
                recover(Ending(run_dir, JobEnvironment({}), Cause.CANCELLED, "cancelled by the user", 5,
                               record={"first_step": 0, "last_step": 7}))
            elif how == "preempted, cancelled":  # Slurm's PreemptMode=CANCEL
                from launch.backends.slurm.job import SlurmJob
                from launch.rank.job_env import Preemption

                self.monkeypatch.setattr(SlurmJob, "preemption", lambda self: Preemption(CANCELS, False))
                recover(Ending(run_dir, SlurmJob({"SLURM_JOB_ID": str(20 + n)}), Cause.PREEMPTED, CANCELS, 5,
                               record={"first_step": 0, "last_step": 7, "preempted_by": CANCELS}))
                ret.status = JobStatus.FAILED  # the waiter's: the job ended without its result
            ret.return_value = PointReturn({"run_dir": str(run_dir), "job_id": str(20 + n), "summary": summary},
                                           "val_loss")
            returns.append(ret)
        return returns


@pytest.mark.parametrize("how, code", [("cancelled", 0), ("preempted, cancelled", 1)])
@pytest.mark.slow
def test_an_optuna_trial_cancelled_or_stopped_by_a_preemption_is_left_running_and_the_same_command_continues_it(
        tmp_path, monkeypatch, capsys, how, code):
    """A trial is a point of gptlaunch's launcher (one job, or a packed allocation's step): its run ends by recovery's
    decision, as any point's. Cancelled by the user, or stopped by a preemption that cancels, it did not fail: the
    study keeps it running and asks nothing more, the search ends as a single run would (exit 0, 1), and the same
    command launches it again first with its number (its run then resumes from its checkpoint)."""
    import sqlite3

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from hydra_plugins.gptlaunch_optuna.gptlaunch_optuna import Direction, OptunaSweeper, TPESamplerConf

    sweep = tmp_path / "sweep"

    def search(ends):
        launcher = Trials(sweep, monkeypatch, ends)
        sweeper = OptunaSweeper(sampler=instantiate(OmegaConf.structured(TPESamplerConf(seed=0))),
                                direction=Direction.minimize, storage=None, study_name=None, n_trials=4, n_jobs=2,
                                params={"train.lr": "choice(0.01,0.1)"})
        sweeper.config, sweeper.launcher = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}), launcher
        sweeper.sweep(["model=tiny"])
        return launcher

    with pytest.raises(SystemExit) as stop:
        search(["finished", how])
    assert stop.value.code == code
    err = capsys.readouterr().err
    assert "optuna: trial 1 " in err and "left running in the study; the same command continues it" in err, err
    assert "failed" not in err, err
    with sqlite3.connect(sweep / "optuna.db") as db:
        assert db.execute("SELECT number, state FROM trials ORDER BY number").fetchall() == [(0, "COMPLETE"),
                                                                                           (1, "RUNNING")]
    assert search([]).launched == [1, 2, 3]  # the same command: trial 1 first, then the rest of the search


def packed_points(tmp_path, n: int = 2) -> list:
    from gpt.config import schema
    from helpers import compose
    from launch import launch_config

    config = launch_config.parse(compose("preemption.max_restarts=3"))
    dirs = [tmp_path / f"seed={s}" for s in range(n)]
    for d in dirs:
        d.mkdir()
        schema.save(config, RunFolder(d).config)
    return dirs


def allocation_slurm(asked: list[list[str]]):
    """Slurm as job 7, a one-node packed allocation that runs, answers: every command is recorded."""
    def run(cmd, **kw):
        asked.append(cmd)
        out = ("JobId=7 JobState=RUNNING Reason=None Restarts=0 NodeList=n1 NumNodes=1 Partition=debug\n"
               if cmd[:3] == ["scontrol", "-o", "show"] else "")
        return subprocess.CompletedProcess(cmd, 0, out, "")
    return run


def run_packer(monkeypatch, dirs, code: int) -> dict:
    """The packer's task, its points' steps ending with `code` as each rank's task did after its decision."""
    import signal

    from launch.backends.slurm import pack_task

    step = [sys.executable, "-c", f"raise SystemExit({code})"]
    monkeypatch.setattr(pack_task, "step_command", lambda d, hosts, share_mb=None, point=0: (step, {}))
    monkeypatch.setattr(pack_task, "node_groups", lambda nodes_each, per_group: [["n1"]] * per_group)
    monkeypatch.setattr(pack_task, "REQUEUE_WAIT_S", 0.0)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        return pack_task.PackTask(tuple(map(str, dirs)), per_group=1)()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


@pytest.mark.parametrize("cause, ended", [(Cause.LOST_RANK, "rank 0 on n1 was killed by SIGKILL"),
                                          (Cause.HANG, "hang")], ids=["lost rank", "hang"])
def test_a_packed_point_that_loses_a_rank_or_hangs_requeues_its_allocation_once_its_step_has_ended(
        tmp_path, monkeypatch, capsys, cause, ended):
    """The point's rank decides as any rank does (recovery's `recover`): a requeue, which for a packed point is its
    allocation's, so its rank does not wait to be stopped (no one would stop it) and its step ends. The packer reads
    that decision from the point's line, starts no waiting point, and requeues the allocation once (recovery's
    `recover_allocation`); the point resumes in the requeued allocation. It is not a failed point."""
    from launch.backends.slurm.job import PACKED_VAR, SlurmJob

    hung, waiting = packed_points(tmp_path)
    asked: list[list[str]] = []
    monkeypatch.setattr(commands.subprocess, "run", allocation_slurm(asked))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    rank_job = SlurmJob({"SLURM_JOB_ID": "7", PACKED_VAR: "1"})
    got = recover(Ending(hung, rank_job, cause, ended, 3, record={"first_step": 0, "last_step": 4}, began=0))
    assert (got.next, got.note) == (Next.REQUEUE, "job 7 (packed) requeues once every running point of it has saved")
    assert not got.ends_attempt(rank_job) and ["scontrol", "requeue", "7"] not in asked  # the rank exits at once
    capsys.readouterr()  # the rank's own line, logged
    results = run_packer(monkeypatch, [hung, waiting], 1)  # the rank's task fails after that decision
    out, err = capsys.readouterr()
    assert results == {} and out.count("point ") == 1, (results, out)  # the waiting point never started
    assert err == "packed job: requeued job 7 (restart 1 of at most 3)\n", err
    assert [c for c in asked if c[:2] == ["scontrol", "requeue"]] == [["scontrol", "requeue", "7"]]


def test_a_packed_allocation_preempted_under_cancel_stops_says_so_per_point_and_exits_1(tmp_path, monkeypatch,
                                                                                        capsys):
    """The running point's rank saves and records the site's preemption, not requeued (recovery's `recover`); its step
    ends EXIT_PREEMPTED. The packer starts no waiting point and decides once for the allocation (`recover_allocation`):
    not requeued, the same command continues its points. The waiter says of the point how it ended and how to go on,
    not that it failed; the sweep exits 1, as a single run stopped so."""
    import pickle

    from hydra.core.utils import JobReturn

    from gpt.errors import EXIT_PREEMPTED
    from launch.hydra_launcher import _collect
    from launch.backends import Point
    from launch.backends.slurm.job import PACKED_VAR, SlurmJob
    from launch.backends.slurm.submitted import Submitted
    from launch.backends.slurm.wait import collect, print_outcome
    from launch.rank.job_env import Preemption

    stopped, waiting = packed_points(tmp_path)
    asked: list[list[str]] = []
    monkeypatch.setattr(commands.subprocess, "run", allocation_slurm(asked))
    monkeypatch.setattr(SlurmJob, "preemption", lambda self: Preemption(CANCELS, False))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    got = recover(Ending(stopped, SlurmJob({"SLURM_JOB_ID": "7", PACKED_VAR: "1"}), Cause.PREEMPTED, CANCELS, 3,
                         record={"first_step": 0, "last_step": 7, "preempted_by": CANCELS}))
    assert got.next is Next.STOP and got.note.startswith("not requeued: Slurm's preemption cancels job 7; "), got
    results = run_packer(monkeypatch, [stopped, waiting], EXIT_PREEMPTED)
    out, err = capsys.readouterr()
    note = (f"{CANCELS}; not requeued: Slurm's preemption cancels job 7; the same command continues its 2 point(s), "
            "each from its newest checkpoint")
    assert results == {str(d): {"stopped": note} for d in (stopped, waiting)} and out.count("point ") == 1, (
        results, out)  # the waiting point never started
    assert err == f"packed job: {note}\n", err
    assert not [c for c in asked if c[:2] == ["scontrol", "requeue"]]
    one_rank = SimpleNamespace(nodes=1, world_size=1)
    jobs = [Submitted(Point(d.name, d, "gptlaunch", one_rank), "7", tmp_path, packed=True) for d in (stopped, waiting)]
    jobs[0].paths(0).result_pickle.parent.mkdir(parents=True, exist_ok=True)
    jobs[0].paths(0).result_pickle.write_bytes(pickle.dumps(("success", results)))
    outcomes = [collect(s, "PREEMPTED", grace_s=0) for s in jobs]
    for o in outcomes:
        print_outcome(o, sys.stdout)
    out, err = capsys.readouterr()
    assert out == (f"job 7 (seed=0) {CANCELS}: {got.note}\n"
                   f"job 7 (seed=1) did not start: {note}\n") and err == "", (out, err)
    planned = [SimpleNamespace(plan=SimpleNamespace(run_dir=d), run=SimpleNamespace(launcher=SimpleNamespace(
        objective="val_loss"))) for d in (stopped, waiting)]
    with pytest.raises(SystemExit) as stop:
        _collect(outcomes, list(enumerate(planned)), [(n, [], None, JobReturn()) for n in range(2)], [None, None],
                 stop=True)
    assert stop.value.code == 1 and capsys.readouterr().err == ""  # no job said to have failed


@pytest.mark.parametrize("before, said", [
    ([], None),  # the first hang: its rank requeued the job (the line says so), the launcher leaves the rest to Slurm
    ([{"job_id": "42", "restart": 0, "ended": "hang", "first_step": 0, "last_step": 0}],
     "hang; not requeued: the attempt before hung too, and no checkpoint newer than the start was saved since")],
    ids=["first", "again"])
def test_a_multi_node_sh_job_that_hangs_is_requeued_or_stops_with_recoverys_line(tmp_path, monkeypatch, before, said):
    """Under sbatch slurm/multi_node.sh the ranks' watchdog decides as under cluster=slurm (recovery's `recover`,
    bounded by progress); the launcher inside the job reads the attempt's line: requeued, it leaves the job to Slurm;
    hung again without a newer checkpoint, it fails with that line once (exit 1, `error: srun exited with code 1:
    hang; not requeued: ...; the same command continues the run ...`). srun is stood in for: its ranks' decision is
    the real one."""
    from launch.backends import srun
    from launch.backends.slurm.job import SlurmJob
    from launch.rank.job_env import LAUNCH_VAR
    from launch.run.attempts import requeued

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(len(before)))
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n1")
    packed_points(tmp_path, 1)
    run_dir = tmp_path / "seed=0"
    (run_dir / "attempts.jsonl").write_text("".join(json.dumps(b) + "\n" for b in before))
    monkeypatch.setattr(commands.subprocess, "run", allocation_slurm([]))

    class Srun:
        """Its ranks hung: the watchdog's rank decided (the real decision), and the tasks exited 1."""

        def __init__(self, cmd, env, **kwargs):
            job = SlurmJob({**env, "SLURM_JOB_ID": "42", LAUNCH_VAR: env[LAUNCH_VAR]})
            recover(Ending(run_dir, job, Cause.HANG, "hang", 3, record={"first_step": 0, "last_step": 0}, began=0))
            self.pid = 0

        def wait(self, timeout=None):
            return 1

        def poll(self):
            return 1

    monkeypatch.setattr(srun.subprocess, "Popen", Srun)
    if said is None:
        job = srun.run_srun(run_dir, 1, 1)
        assert requeued(run_dir, job)
        return
    with pytest.raises(srun.SrunFailed) as failed:
        srun.run_srun(run_dir, 1, 1)
    assert str(failed.value).startswith(f"srun exited with code 1: {said} (a fault that repeats would repeat on "
                                        "every restart); the same command continues the run from the start"), failed


def test_a_multi_node_sh_job_during_a_slurm_outage_is_unknown_to_status_and_cancel_cancels_nothing(tmp_path,
                                                                                                  monkeypatch, capsys):
    """A job of sbatch slurm/multi_node.sh runs without a launcher outside it; the run folder knows it only by the
    job its ranks recorded (job.json). During an outage launch.status says UNKNOWN (exit 4), not failed, and
    launch.cancel cancels and signals nothing (exit 1): no answer is not "no job"."""
    import io

    from launch.backends.slurm.job import SlurmJob
    from launch.cancel import cancel
    from launch.run.job_record import record_job
    from launch.status import status

    packed_points(tmp_path, 1)
    run_dir = tmp_path / "seed=0"
    (run_dir / "run.json").write_text("{}")
    record_job(run_dir, SlurmJob({"SLURM_JOB_ID": "5"}))  # as the launcher inside the job records it
    asked: list[str] = []
    monkeypatch.setattr(commands.subprocess, "run", slurm({}, asked))
    out = io.StringIO()
    assert status(run_dir, out) == EXIT_UNKNOWN
    assert "job 5 UNKNOWN (Slurm does not answer: " in out.getvalue() and "failed" not in out.getvalue(), out.getvalue()
    assert cancel(run_dir, wait_s=0) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Slurm does not answer (") and err.count("\n") == 1, err
    assert "scancel" not in asked and not (run_dir / "cancel.json").exists()


def test_a_packed_allocation_whose_requeue_slurm_does_not_answer_stops_and_fails_no_point(tmp_path, monkeypatch,
                                                                                         capsys):
    """During an outage a packed point trains on (its steps need no Slurm), and the waiter keeps its job; a point
    that loses a rank then is decided as any (a requeue, its allocation's), and the packer's one decision asks Slurm
    for it, tried again while Slurm fails, then stops saying so. The waiter says of each point how it ended (or that it
    did not start) and that line; no point is said to have failed, and the same command continues them."""
    import pickle

    from launch.backends import Point
    from launch.backends.slurm import job as slurm_job
    from launch.backends.slurm.job import PACKED_VAR, SlurmJob
    from launch.backends.slurm.submitted import Submitted
    from launch.backends.slurm.wait import collect, print_outcome

    lost, waiting = packed_points(tmp_path)
    asked: list[str] = []
    monkeypatch.setattr(commands.subprocess, "run", slurm({}, asked))
    monkeypatch.setattr(slurm_job, "REQUEUE_BACKOFF_S", 0.0)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    ended = "rank 0 on n1 was killed by SIGKILL"
    got = recover(Ending(lost, SlurmJob({"SLURM_JOB_ID": "7", PACKED_VAR: "1"}), Cause.LOST_RANK, ended, 3,
                         record={"first_step": 0, "last_step": 4}, began=0))
    assert got.next is Next.REQUEUE and "scancel" not in asked, got
    capsys.readouterr()
    results = run_packer(monkeypatch, [lost, waiting], 1)
    err = capsys.readouterr().err
    note = results[str(lost)]["stopped"]
    assert note.startswith("scontrol requeue 7 failed (") and note.endswith("submit the same command again to resume")
    assert results == {str(d): {"stopped": note} for d in (lost, waiting)} and err == f"packed job: {note}\n", err
    one_rank = SimpleNamespace(nodes=1, world_size=1)
    jobs = [Submitted(Point(d.name, d, "gptlaunch", one_rank), "7", tmp_path, packed=True) for d in (lost, waiting)]
    jobs[0].paths(0).result_pickle.parent.mkdir(parents=True, exist_ok=True)
    jobs[0].paths(0).result_pickle.write_bytes(pickle.dumps(("success", results)))
    for o in [collect(s, "COMPLETED", grace_s=0) for s in jobs]:
        assert o.stopped is not None, o
        print_outcome(o, sys.stdout)
    out, err = capsys.readouterr()
    assert out == f"job 7 (seed=0) {ended}: {note}\njob 7 (seed=1) did not start: {note}\n" and err == "", (out, err)


@pytest.mark.parametrize("ending, queued, then", [
    ("8", "8|RUNNING|None\n9|PENDING|Dependency\n", Next.NEXT_LINK),  # link 8, requeued by Slurm, ran first
    ("9", "8|PENDING|Dependency\n9|RUNNING|None\n", Next.REQUEUE)], ids=["requeued link first", "next link first"])
def test_a_chain_link_slurm_requeued_after_its_node_failed_and_the_next_link_both_continue_the_run(
        tmp_path, monkeypatch, ending, queued, then):
    """Link 8's node failed and Slurm requeued it: it and link 9 wait on --dependency=singleton, and either may start
    first. Whichever does resumes from the newest checkpoint and, at its time limit's warning, hands the run to a
    later link still queued, else (the last link) requeues itself: recovery's one decision, so the run goes on in
    either order and no link runs beside another."""
    from launch.backends.slurm.job import SlurmJob

    (tmp_path / "slurm_job.json").write_text(json.dumps({"job_id": "9", "chain": ["7", "8", "9"]}))
    asked: list[list[str]] = []

    def run(cmd, **kw):
        asked.append(cmd)
        out = (queued if cmd[0] == "squeue" else
               f"JobId={ending} JobState=RUNNING Reason=None Restarts=0 NodeList=n1 NumNodes=1 Partition=debug\n"
               if cmd[:3] == ["scontrol", "-o", "show"] else "")
        return subprocess.CompletedProcess(cmd, 0, out, "")
    monkeypatch.setattr(commands.subprocess, "run", run)
    job = SlurmJob({"SLURM_JOB_ID": ending, "SLURM_RESTART_COUNT": "1" if ending == "8" else "0"})
    got = recover(Ending(tmp_path, job, Cause.PREEMPTED, "preempted:SIGUSR2", 5,
                         record={"first_step": 0, "last_step": 40}))
    assert got.next is then, got
    requeues = [c for c in asked if c[:2] == ["scontrol", "requeue"]]
    if then is Next.NEXT_LINK:
        assert got.note == "ends here: job 9, the chain's next link, continues the run" and requeues == []
    else:
        assert got.note.startswith("requeued job 9 (restart 1 of at most 5)") and requeues == [["scontrol", "requeue",
                                                                                                "9"]]
