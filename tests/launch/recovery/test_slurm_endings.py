"""How an attempt's end reads Slurm, with the real SlurmJob over a stand-in for Slurm's commands: a host the
partition cannot spare (the run goes on with it), a time limit (named, not a preemption), a requeue that an old,
mended node failure does not explain, a host whose ranks all went silent (a lost node, not a hang)."""
from __future__ import annotations

import subprocess

import pytest

from gpt.config import schema
from gpt.run_folder import Next, RunFolder
from gpt.train.summary import FitSummary
from helpers import compose
from launch import launch_config
from launch.backends.slurm import commands
from launch.backends.slurm.job import SlurmJob
from launch.rank.job_env import ROUND_VAR
from launch.recovery.decision import Cause, Ending, recover
from launch.recovery.endings import end_hung_attempt, why_stopped
from launch.run.attempts import Attempt

FULL = "keeping gl-n4: partition debug cannot spare it (3 node(s) would remain for a 4-node job)"


class Slurm:
    """Slurm's commands as the job sees them: `scontrol show job` says `job`, sinfo lists the partition's nodes
    (`down`: sinfo -n's rows of nodes it holds down); every command asked is kept."""

    def __init__(self, job: str, partition: str = "gl-n1\ngl-n2\ngl-n3\ngl-n4", down: str = ""):
        self.job, self.partition, self.down, self.asked = job, partition, down, []

    def __call__(self, cmd, **kw):
        self.asked.append(cmd)
        out = ""
        if cmd[:3] == ["scontrol", "-o", "show"]:
            out = f"JobId=22 {self.job}\n"
        elif cmd[:3] == ["scontrol", "show", "hostnames"]:
            out = "\n".join(HOSTNAMES.get(cmd[3], cmd[3].split(","))) + "\n"
        elif cmd[:4] == ["sinfo", "-h", "-N", "-p"]:
            out = self.partition
        elif cmd[:4] == ["sinfo", "-h", "-N", "-n"]:
            out = self.down
        return subprocess.CompletedProcess(cmd, 0, out, "")

    def commands(self, *head: str) -> list[list[str]]:
        return [c for c in self.asked if c[:len(head)] == list(head)]


HOSTNAMES = {"gl-n[1-4]": ["gl-n1", "gl-n2", "gl-n3", "gl-n4"], "gl-n[1,3-4]": ["gl-n1", "gl-n3", "gl-n4"]}
RUNNING = ("JobState=RUNNING Reason=None Restarts=0 NodeList=gl-n[1-4] NumNodes=4 Partition=debug "
           "ExcNodeList=(null) ReqNodeList=(null) RunTime=00:05:00 TimeLimit=01:00:00")


@pytest.fixture
def run_dir(tmp_path):
    schema.save(launch_config.parse(compose("cluster=srun", "cluster.signal_delay_s=30")), tmp_path / "config.yaml")
    return tmp_path


def job_of(monkeypatch, slurm: Slurm, **environ: str) -> SlurmJob:
    monkeypatch.setattr(commands.subprocess, "run", slurm)
    return SlurmJob({"SLURM_JOB_ID": "22", "SLURM_JOB_NODELIST": "gl-n[1-4]", "SLURM_JOB_NUM_NODES": "4",
                     "SLURM_NTASKS": "4", "SLURM_RESTART_COUNT": "0", **environ})


def ending(run_dir, job, cause: Cause, hosts=("gl-n4",)) -> Ending:
    return Ending(run_dir, job, cause, cause.value, 10, hosts, {"first_step": 0, "last_step": 50}, began=0)


def test_a_hang_on_a_host_the_partition_cannot_spare_restarts_inside_the_allocation_with_it(run_dir, monkeypatch):
    slurm = Slurm(RUNNING)
    got = recover(ending(run_dir, job_of(monkeypatch, slurm, **{ROUND_VAR: "0"}), Cause.HANG))
    assert got.next is Next.RESTART and got.restart.hosts == ["gl-n1", "gl-n2", "gl-n3", "gl-n4"]
    assert got.note == f"restarting inside the allocation (in-job restart 1 of at most 3); {FULL}"
    assert slurm.commands("scontrol", "requeue") == []


@pytest.mark.parametrize("cause, environ", [(Cause.HANG, {ROUND_VAR: "3"}), (Cause.STRAGGLER, {}),
                                            (Cause.LOST_RANK, {})])
def test_past_the_in_job_restarts_a_host_the_partition_cannot_spare_is_requeued_with(run_dir, monkeypatch, cause,
                                                                                    environ):
    """The run goes on: requeued onto the host (ExcNodeList left as it was), the line says why it stays."""
    slurm = Slurm(RUNNING)
    got = recover(ending(run_dir, job_of(monkeypatch, slurm, **environ), cause))
    assert got.next is Next.REQUEUE and got.note.endswith(f"requeued job 22 (restart 1 of at most 10); {FULL}")
    assert slurm.commands("scontrol", "requeue") == [["scontrol", "requeue", "22"]]
    assert slurm.commands("scontrol", "update") == []


def test_what_the_job_excludes_already_counts_against_the_partition(run_dir, monkeypatch):
    slurm = Slurm(RUNNING.replace("NumNodes=4", "NumNodes=2").replace("ExcNodeList=(null)", "ExcNodeList=gl-n2"))
    job = job_of(monkeypatch, slurm)
    assert job.cannot_spare(["gl-n3"]) == ""
    assert job.cannot_spare(["gl-n3", "gl-n4"]) == ("keeping gl-n3, gl-n4: partition debug cannot spare it (1 node(s) "
                                                    "would remain for a 2-node job)")


def test_a_flagged_node_the_partition_cannot_spare_is_kept_and_training_goes_on(run_dir, monkeypatch):
    slurm = Slurm(RUNNING)
    got = recover(ending(run_dir, job_of(monkeypatch, slurm), Cause.HEALTH))
    assert (got.next, got.note) == (Next.CONTINUE, FULL) and slurm.commands("scontrol", "requeue") == []


def stopped(run_dir, job: SlurmJob, signalled: str) -> Ending:
    attempt = Attempt(run_dir, 1, job, nodes=["gl-n1", "gl-n2"])
    return why_stopped(attempt, 10, FitSummary(0, 100, preempted=signalled), {"first_step": 0, "last_step": 100})


def test_the_time_limit_is_named_not_called_a_preemption_and_says_how_to_continue(run_dir, monkeypatch):
    at_limit = RUNNING.replace("RUNNING Reason=None", "COMPLETING Reason=TimeLimit").replace("01:00:00", "00:05:00")
    end = stopped(run_dir, job_of(monkeypatch, Slurm(at_limit)), "SIGTERM")
    assert end.ended == "preempted:time limit"
    got = recover(end)
    assert got.next is Next.STOP and got.note == (
        "stopped by Slurm: job 22 ended TIMEOUT (its time limit, 00:05:00): not requeued; the same command continues "
        "the run from the start (no checkpoint yet)")
    assert RunFolder(run_dir).attempts.read()[-1].ended == "preempted:time limit"


@pytest.mark.parametrize("run_time, ended", [("00:59:10", "preempted:time limit"), ("00:05:00", "preempted:SIGUSR2")])
def test_a_warning_signal_is_the_time_limits_only_near_it(run_dir, monkeypatch, run_time, ended):
    """cluster.signal_delay_s=30, and Slurm may warn up to a minute early: 50 s before the limit is its warning;
    an hour before, the same SIGUSR2 is someone's (scancel --signal=USR2)."""
    end = stopped(run_dir, job_of(monkeypatch, Slurm(RUNNING.replace("00:05:00", run_time))), "SIGUSR2")
    assert end.ended == ended and recover(end).next is Next.REQUEUE


def test_a_requeue_is_not_blamed_on_a_node_dropped_long_ago_and_back_in_service(run_dir, monkeypatch):
    """A spare replaced gl-n2 in round 1; minutes later an admin requeues the job: gl-n2 is up again."""
    slurm = Slurm(RUNNING.replace("Restarts=0", "Restarts=1").replace("NodeList=gl-n[1-4]", "NodeList=gl-n[1,3-4]"))
    requeued, how = job_of(monkeypatch, slurm).requeue(10)
    assert requeued and how == "requeued by Slurm or by another rank already (job 22 is on restart 1)"
    slurm.down = "gl-n2|down|Not responding\n"
    assert "node failure (gl-n2 down" in job_of(monkeypatch, slurm).requeue(10)[1]


def beat(host: str) -> dict:
    return {"host": host, "seq": 4, "beat": 9}


@pytest.mark.parametrize("ranks, lost, ended", [
    (["gl-n1", "gl-n2"], [1], "node failure: gl-n2 gone (no heartbeat from any of its ranks)"),
    (["gl-n1", "gl-n2", "gl-n2"], [1], "hang"),  # rank 2 lives on gl-n2: its host is there
])
def test_a_host_whose_every_rank_went_silent_is_recorded_as_a_lost_node(run_dir, monkeypatch, ranks, lost, ended):
    slurm = Slurm(RUNNING.replace("NumNodes=4", "NumNodes=1"), partition="gl-n1\ngl-n2\ngl-n3")
    attempt = Attempt(run_dir, 1, job_of(monkeypatch, slurm))
    surviving = [r for r in range(len(ranks)) if r not in lost]
    report = {"summary": "watchdog: rank 1 on gl-n2 is gone", "report": "hang.txt", "exclude": ["gl-n2"],
              "ranks": [beat(h) for h in ranks], "lost": lost, "surviving": surviving}
    end_hung_attempt(attempt, 10, report)
    assert RunFolder(run_dir).attempts.read()[-1].ended == ended
