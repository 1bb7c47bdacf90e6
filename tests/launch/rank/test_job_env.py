"""Inside a rank, the job environment is the only thing that knows the scheduler."""
from __future__ import annotations

import subprocess

import pytest
from pathlib import Path

from helpers import REPO
from launch.backends.slurm.job import SlurmJob
from launch.rank.job_env import JobEnvironment, job_environment


def test_the_scheduler_is_detected_from_its_variables():
    assert type(job_environment({})) is JobEnvironment
    job = job_environment({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "3", "SLURM_NNODES": "2", "HOME": "/h"})
    assert isinstance(job, SlurmJob) and (job.job_id, job.restart) == ("42", 3)
    assert job.variables() == {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "3", "SLURM_NNODES": "2"}


def test_requeue_stops_at_the_restart_limit_without_asking_slurm():
    job = SlurmJob({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"})
    assert job.requeue(max_restarts=2) == (False, "restart limit reached (2 of preemption.max_restarts=2)")
    requeued, why = JobEnvironment({}).requeue(max_restarts=5)
    assert not requeued and "run the same command" in why


def test_requeue_without_slurm_commands_says_how_to_resume(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    requeued, why = SlurmJob({"SLURM_JOB_ID": "42"}).requeue(max_restarts=5)
    assert not requeued and "submit the same command again" in why


def test_gpt_knows_no_scheduler():
    # the cluster section of the config's schema (the launcher's keys: cluster.sbatch) is the one exception
    found = subprocess.run(["grep", "-rnE", "--exclude=cluster.py", "scontrol|SLURM_|squeue|sbatch",
                            str(REPO / "gpt")], capture_output=True, text=True).stdout
    assert found == "", found
    assert not list(Path(REPO / "gpt").rglob("*slurm*"))


def test_a_late_requeue_leaves_the_next_attempt_alone(monkeypatch):
    """A rank of attempt 0 that asks only after its job runs again (it was cut off) must not requeue restart 1."""
    from launch.backends.slurm import commands

    asked = []
    monkeypatch.setattr(commands, "scontrol_job", lambda job: commands.JobInfo(job, "RUNNING", "",
                                                                               (("Restarts", "1"),)))
    monkeypatch.setattr(commands, "requeue", asked.append)
    requeued, why = SlurmJob({"SLURM_JOB_ID": "42"}).requeue(max_restarts=5)
    assert (requeued, why, asked) == (True, "requeued by Slurm or by another rank already (job 42 is on restart 1)", [])


@pytest.mark.parametrize("state, reason", [("COMPLETING", "None"), ("TIMEOUT", "TimeLimit"), ("FAILED", "NonZeroExitCode"),
                                           ("CANCELLED", "None")])
def test_a_job_that_ends_without_a_requeue_is_never_said_to_be_requeued(monkeypatch, state, reason):
    """scancel, the time limit and a failure all show COMPLETING first (Requeue=1 is only the job's policy)."""
    from launch.backends.slurm import commands

    asked = []
    monkeypatch.setattr(commands, "scontrol_job", lambda job: commands.JobInfo(
        job, state, reason, (("Restarts", "0"), ("Requeue", "1"))))
    monkeypatch.setattr(commands, "requeue", asked.append)
    requeued, why = SlurmJob({"SLURM_JOB_ID": "42"}).requeue(max_restarts=5)
    assert (requeued, asked) == (False, []) and "not requeued" in why and "requeued by" not in why, why


def test_a_job_slurm_signals_in_a_preemptions_grace_time_is_requeued(monkeypatch):
    """A job Slurm preempts shows JobState=SIGNALING (a flag on RUNNING) while it signals it: still running, and the
    requeue is asked (else the batch step's own requeue after a killed task start is refused, and the job fails)."""
    from launch.backends.slurm import commands

    asked = []
    monkeypatch.setattr(commands, "scontrol_job", lambda job: commands.JobInfo(job, "SIGNALING", "None",
                                                                               (("Restarts", "0"),)))
    monkeypatch.setattr(commands, "requeue", asked.append)
    requeued, why = SlurmJob({"SLURM_JOB_ID": "42"}).requeue(max_restarts=5)
    assert (requeued, asked) == (True, ["42"]) and why.startswith("requeued job 42"), why


def test_lost_nodes_are_the_down_failed_and_unresponsive_ones_with_slurms_reason():
    from launch.backends.slurm.commands import parse_lost_nodes

    rows = ["n1|allocated|none", "n2|down*|Not responding", "n3|idle*|none", "n2|down*|Not responding"]
    assert parse_lost_nodes(rows) == ["n2 down, not responding (Not responding)", "n3 idle, not responding"]


# `scontrol -o show node`, as slurmd 22.05 prints it (shortened): Reason= with the user and time Slurm adds, then
# the optional Comment=; a node back in service has no Reason=
SHOW_NODE = ("NodeName=n2 Arch=x86_64 CoresPerSocket=4 State=IDLE+DRAIN ThreadsPerCore=1 ExtSensorsTemp=n/s "
             "Reason=Kill task failed [root@2026-11-27T21:30:01] Comment=rack 4\n"
             "NodeName=n3 Arch=x86_64 State=DOWN* ExtSensorsTemp=n/s Reason=Not responding [slurm@2026-11-27T21:30:02]\n"
             "NodeName=n4 Arch=x86_64 State=IDLE ExtSensorsTemp=n/s\n")


def stand_in_slurm(monkeypatch, answers: dict[tuple[str, ...], str]) -> list[tuple[str, ...]]:
    """commands.run answering each command that begins with a key of `answers`; '' for every other."""
    from launch.backends.slurm import commands

    asked: list[tuple[str, ...]] = []

    def run(*cmd, **kw):
        asked.append(cmd)
        return next((out for start, out in answers.items() if cmd[:len(start)] == start), "")
    monkeypatch.setattr(commands, "run", run)
    return asked


def test_slurms_reason_for_a_node_is_scontrols_without_who_and_when():
    from launch.backends.slurm.commands import parse_node_reasons

    assert parse_node_reasons(SHOW_NODE) == {"n2": "Kill task failed", "n3": "Not responding"}


def test_a_node_slurm_took_out_of_the_job_is_named_with_slurms_reason(monkeypatch):
    """sinfo no longer lists it down (--no-kill: Slurm took it out of the job), but scontrol still holds its reason."""
    asked = stand_in_slurm(monkeypatch, {
        ("sinfo",): "n1|allocated|none\nn2|idle|none\n",
        ("scontrol", "-o", "show", "job"): "JobId=42 JobState=RUNNING NodeList=n1\n",
        ("scontrol", "show", "hostnames", "n1"): "n1\n",
        ("scontrol", "show", "hostnames", "n[1-2]"): "n1\nn2\n", ("scontrol", "-o", "show", "node"): SHOW_NODE})
    job = SlurmJob({"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert job.lost_nodes() == "n2 down (Kill task failed; taken out of job 42 by Slurm)", asked
    assert ("scontrol", "-o", "show", "node", "n2") in asked


def test_a_node_failure_slurm_requeued_names_the_node_and_slurms_reason(monkeypatch):
    """The attempt ended without a word (the batch host failed): accounting's NODE_FAIL, the attempt's nodes, and
    Slurm's reason for the one it holds down."""
    stand_in_slurm(monkeypatch, {
        ("sacct",): "NODE_FAIL|2026-11-27T21:30:05|n[2-3]\nRUNNING|Unknown|n[1-2]\n",
        ("sinfo",): "n2|idle|none\nn3|down*|Not responding\n"})
    job = SlurmJob({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"})
    assert job.requeued_why() == ("requeued by Slurm after a node failure (accounting: NODE_FAIL at "
                                  "2026-11-27T21:30:05; n3 down, not responding (Not responding))")
    stand_in_slurm(monkeypatch, {  # back in service by sinfo, its reason still held (drained)
        ("sacct",): "NODE_FAIL|2026-11-27T21:30:05|n[2-3]\nRUNNING|Unknown|n[1-2]\n",
        ("scontrol", "-o", "show", "node"): SHOW_NODE})
    assert job.requeued_why().endswith("NODE_FAIL at 2026-11-27T21:30:05; n2 (Kill task failed), n3 (Not responding))")


def test_ranks_are_up_when_every_record_carries_this_steps_token(tmp_path):
    """srun's wrapper passes signals on once every rank wrote its environment record: records of an earlier step
    (an earlier attempt's, whatever their file times say) do not count."""
    import json

    from gpt.run_folder import RunFolder
    from launch.backends.srun import ranks_up

    folder = RunFolder(tmp_path)
    folder.environment.mkdir(parents=True)
    for rank, token in ((0, "this"), (1, "earlier")):
        folder.environment_record(rank).write_text(json.dumps({"rank": rank, "step": token}))
    assert not ranks_up(folder, 2, "this")
    folder.environment_record(1).write_text(json.dumps({"rank": 1, "step": "this"}))
    assert ranks_up(folder, 2, "this") and not ranks_up(folder, 3, "this")


@pytest.mark.parametrize("by", ["partition_prio", "qos"])
@pytest.mark.parametrize("mode, requeued", [("REQUEUE", True), ("CANCEL", False)])
def test_slurms_requeue_preemption_requeues_past_the_restart_limit_and_cancel_never(monkeypatch, mode, requeued, by):
    """preemption.max_restarts bounds the job's own requeues: a job Slurm preempts with REQUEUE would be requeued by
    Slurm at the end of its grace time, so the rank that saved inside it requeues it at once, at the limit too. The
    mode is the partition's, or the job's QOS's where the cluster preempts by QOS (a QOS may defer to the cluster's)."""
    from launch.backends.slurm import commands, preemptor

    asked = []
    monkeypatch.setattr(commands, "scontrol_job", lambda job: commands.JobInfo(job, "RUNNING", "", (
        ("Restarts", "2"), ("Partition", "low"), ("QOS", "low"), ("PreemptTime", "2026-11-24T14:00:00"))))
    config = {"PreemptType": f"preempt/{by}", "PreemptMode": mode}
    monkeypatch.setattr(commands, "controller_config", lambda: config)
    monkeypatch.setattr(commands, "partition_field", lambda p, key: {"PreemptMode": mode, "GraceTime": "20"}[key])
    monkeypatch.setattr(commands, "qos_fields", lambda q: ("cluster" if mode == "REQUEUE" else mode.lower(), "00:00:20"))
    monkeypatch.setattr(commands, "run", lambda *cmd, **kw: "")  # squeue lists no pending job
    monkeypatch.setattr(preemptor, "PLAN_WAIT_S", 0.0)
    assert SlurmJob({"SLURM_JOB_ID": "42"}).preemption().said == (
        "preempted by another job (Slurm did not say which) at 2026-11-24T14:00:00; the run's "
        f"{'partition' if by == 'partition_prio' else 'QOS'} low: PreemptMode={mode}, GraceTime=20 s")
    monkeypatch.setattr(commands, "requeue", asked.append)
    done, why = SlurmJob({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"}).requeue(max_restarts=2)
    assert (done, asked) == (requeued, ["42"] if requeued else []), why
    assert why == ("requeued job 42 after Slurm's preemption (restart 3; preemption.max_restarts=2 does not stop "
                   "PreemptMode=REQUEUE)" if requeued else "not requeued: Slurm's preemption cancels job 42")
