"""Rank 0's collective failed and Slurm already holds one of the attempt's nodes down: the attempt ends on the
scheduler's word at once (launch.recovery.lost), in a spare's round or a requeue, without waiting for heartbeats to
go silent. Slurm's commands are stood in for here; tests/slurm/test_in_job_restart.py sets a real node down."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt.config import schema
from launch import launch_config
from helpers import compose
from launch.backends.slurm import commands
from launch.recovery import lost
from launch.rank.job_env import ROUND_VAR, job_environment
from launch.run.attempts import Attempt

DOWN = "n2 down (set down by a test)"


def attempt_on(run_dir: Path, nodes: list[str], *overrides: str) -> Attempt:
    schema.save(launch_config.parse(compose("cluster=srun", *overrides)), run_dir / "config.yaml")
    return Attempt(run_dir, job=job_environment(), lease=object(), nodes=nodes)


@pytest.fixture(autouse=True)
def slurm_job(monkeypatch, asked) -> list[str]:
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-3]")
    monkeypatch.setenv(ROUND_VAR, "0")  # a task wrapper runs the ranks: in-job restarts are possible
    monkeypatch.setattr(commands, "hostnames", {"n[1-3]": ["n1", "n2", "n3"], "n[1,3]": ["n1", "n3"]}.get)
    monkeypatch.setattr(commands, "lost_nodes", lambda nodelist: DOWN)
    monkeypatch.setattr(lost, "REQUEUE_WAIT_S", 0.0)
    return asked


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]


def test_a_node_slurm_holds_down_is_replaced_by_the_spare_at_once(tmp_path, slurm_job):
    attempt = attempt_on(tmp_path, ["n1", "n2"], "cluster.spare_nodes=1")
    (tmp_path / "attempt.json").write_text(json.dumps({"job_id": "42", "restart": 0, "started": 1.0, "first_step": 0,
                                                       "nodes": ["n1", "n2"]}))  # rank 0's mark of the attempt
    assert lost.end_for_lost_node(attempt, max_restarts=5)
    (line,) = lines(tmp_path)
    assert (line["ended"], line["in_job_restart"], line["replaced"], line["requeued"], line["nodes"]) == (
        f"node failure: {DOWN}", 1, {"n2": "n3"}, False, ["n1", "n2"]), line
    assert not (tmp_path / "attempt.json").exists()  # recorded: the next round does not record it again
    request = json.loads((tmp_path / "rounds" / "job42-restart0" / "round-1.json").read_text())
    assert (request["hosts"], request["spares"]) == (["n1", "n3"], [])
    assert slurm_job == []  # no requeue
    assert lost.end_for_lost_node(attempt, max_restarts=5) and len(lines(tmp_path)) == 1  # recorded once


def test_without_a_spare_the_job_requeues_on_the_schedulers_word(tmp_path, slurm_job):
    attempt = attempt_on(tmp_path, ["n1", "n2"], "preemption.in_job_restarts=0")
    assert lost.end_for_lost_node(attempt, max_restarts=5)
    (line,) = lines(tmp_path)
    assert line["ended"] == f"node failure: {DOWN}" and line["requeued"] is True, line
    assert set(line["detection_s"]) == {"lost node"}, line  # the wait to see it: goodput's "lost node detection"
    assert slurm_job == ["42"]


def test_a_lost_node_that_runs_no_rank_of_the_attempt_is_not_its_end(tmp_path, slurm_job):
    """The node down is a spare (n2 runs nothing here): the collective failed for another reason, which the rank's
    task or watchdog records."""
    attempt = attempt_on(tmp_path, ["n1", "n3"], "cluster.spare_nodes=1")
    assert not lost.end_for_lost_node(attempt, max_restarts=5)
    assert not (tmp_path / "attempts.jsonl").exists() and slurm_job == []


def test_only_rank_0_asks_the_scheduler(tmp_path, monkeypatch):
    """Rank 0 alone holds the run folder's lease; the other ranks never ask (thousands of calls at once)."""
    monkeypatch.setattr(commands, "lost_nodes", lambda nodelist: pytest.fail("asked the scheduler"))
    attempt = attempt_on(tmp_path, ["n1", "n2"], "cluster.spare_nodes=1")
    attempt.lease = None
    assert not lost.end_for_lost_node(attempt, max_restarts=5)


def test_a_node_slurm_took_out_of_the_job_counts_though_sinfo_shows_it_back_in_service(tmp_path, monkeypatch):
    """With --no-kill, Slurm takes a node set down out of the job and may return it to service at once: the job's
    NodeList, not the node's state, then says it is lost."""
    monkeypatch.setattr(commands, "lost_nodes", lambda nodelist: "")  # sinfo: idle again
    monkeypatch.setattr(commands, "scontrol_job", lambda job: commands.JobInfo(
        job, "RUNNING", "", (("JobState", "RUNNING"), ("NodeList", "n[1,3]"))))
    attempt = attempt_on(tmp_path, ["n1", "n2"], "cluster.spare_nodes=1")
    assert lost.end_for_lost_node(attempt, max_restarts=5)
    (line,) = lines(tmp_path)
    assert (line["ended"], line["replaced"]) == ("node failure: n2 down (taken out of job 42 by Slurm)", {"n2": "n3"})
