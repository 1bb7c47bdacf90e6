"""Which job preempts a run's job (launch.backends.slurm.preemptor), on what the local cluster's Slurm 22.05 showed
during a preemption's grace time: job 7 in `low` on gl22-n[1-2] (scontrol: PreemptTime, no word of the preemptor);
squeue's pending jobs: job 10 of user gl-other in `urgent` (PriorityTier 10), planned on gl22-n[1-3], and job 9 of
`low`, planned on every node, which waits for them and preempts nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch.backends.slurm import commands, preemptor
from launch.backends.slurm.job import SlurmJob
from launch.backends.slurm.preemptor import (UNNAMED, expand_nodelist, named, parse_pending, preempted_after,
                                             preempting, preemptors)

OUTPUTS = Path(__file__).parent / "slurm_outputs"
PENDING = (OUTPUTS / "squeue_pending_22.05.txt").read_text()
VICTIM = (OUTPUTS / "scontrol_o_22.05_preempted.txt").read_text()


def victim(**changes: str) -> commands.JobInfo:
    fields = {**commands.parse_scontrol_job(VICTIM, "7"), **changes}
    return commands.JobInfo("7", fields["JobState"], fields["Reason"], tuple(fields.items()))


@pytest.mark.parametrize("text, hosts", [
    ("gl22-n[1-3]", ["gl22-n1", "gl22-n2", "gl22-n3"]),
    ("gpu[08-10,3],login1", ["gpu08", "gpu09", "gpu10", "gpu3", "login1"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("(null)", []), ("", []), ("n[a-b]", [])])
def test_slurms_hostlists_expand_as_scontrol_show_hostnames_does(text, hosts):
    assert expand_nodelist(text) == hosts


def test_the_higher_tier_job_planned_on_the_victims_nodes_is_named_and_its_own_partitions_job_is_not():
    pending = parse_pending(PENDING)
    assert [(p.job_id, p.partition, p.user, len(p.nodes)) for p in pending] == [
        ("9", "low", "root", 4), ("10", "urgent", "gl-other", 3)]
    found = preemptors(pending, "7", ["gl22-n1", "gl22-n2"], "low", "normal")
    assert named(found, "normal") == "by job 10 (partition urgent, user gl-other)"
    assert preemptors(pending, "7", ["gl22-n4"], "low", "normal") == []  # planned elsewhere: not this job's preemptor
    assert named([], "normal") == UNNAMED == "by another job (Slurm did not say which)"


def test_under_qos_preemption_the_job_of_another_qos_in_the_same_partition_is_named_with_its_qos():
    pending = parse_pending(PENDING.replace("|urgent|normal|", "|low|urgent|"))
    found = preemptors(pending, "7", ["gl22-n2"], "low", "normal")
    assert named(found, "normal") == "by job 10 (partition low, QOS urgent, user gl-other)"


def test_one_squeue_at_a_preemption_names_the_preemptor_and_an_unanswered_one_says_slurm_did_not(monkeypatch):
    asked = []
    monkeypatch.setattr(commands, "run", lambda *cmd, **kw: asked.append(cmd) or PENDING)
    assert preempting(victim()) == "by job 10 (partition urgent, user gl-other)"
    assert len(asked) == 1 and asked[0][0] == "squeue" and "%Y" in asked[0][-1], asked

    # Slurm sets the victim's PreemptTime a moment before the preemptor's SchedNodes: a lookup then asks once more
    answers = [PENDING.replace("gl22-n[1-3]", "(null)"), PENDING]
    asked.clear()
    monkeypatch.setattr(commands, "run", lambda *cmd, **kw: asked.append(cmd) or answers[len(asked) - 1])
    monkeypatch.setattr(preemptor, "PLAN_WAIT_S", 0.0)
    assert preempting(victim()) == "by job 10 (partition urgent, user gl-other)" and len(asked) == 2

    def down(*cmd, **kw):
        raise commands.SlurmUnavailable("squeue: Unable to contact slurm controller")

    monkeypatch.setattr(commands, "run", down)
    assert preempting(victim()) == UNNAMED


def test_the_line_names_the_preemptor_then_the_runs_own_policy_asking_squeue_once_per_preemption(monkeypatch):
    asked = []
    monkeypatch.setattr(commands, "scontrol_job", lambda job: victim(Partition="low"))
    monkeypatch.setattr(commands, "controller_config", lambda: {"PreemptType": "preempt/partition_prio"})
    monkeypatch.setattr(commands, "partition_field", lambda p, key: {"PreemptMode": "REQUEUE", "GraceTime": "20"}[key])
    monkeypatch.setattr(commands, "run", lambda *cmd, **kw: asked.append(cmd) or PENDING)
    job = SlurmJob({"SLURM_JOB_ID": "7"})
    said = job.preemption().said
    assert said == ("preempted by job 10 (partition urgent, user gl-other) at 2026-11-27T18:29:24; the run's "
                    "partition low: PreemptMode=REQUEUE, GraceTime=20 s"), said
    assert job.preemption().said == said and len(asked) == 1  # the requeue asks again: Slurm is not


def test_an_attempt_killed_at_the_end_of_its_grace_time_is_told_by_accounting_who_started_on_its_nodes(monkeypatch):
    """The next attempt asks sacct: job 7's PREEMPTED record (its end, its nodes), then the jobs that ran on those
    nodes in the window after it: job 10 of `urgent` started first; job 7's own next attempt is not its preemptor."""
    [(state, ended, nodes), _] = commands.parse_sacct_attempts(
        (OUTPUTS / "sacct_attempts_22.05_preempted.txt").read_text())
    assert (state, ended, nodes) == ("PREEMPTED", "2026-11-27T18:29:54", "gl22-n[1-2]")
    asked = []
    monkeypatch.setattr(commands, "run", lambda *cmd, **kw: asked.append(cmd) or (
        OUTPUTS / "sacct_started_22.05.txt").read_text())
    assert preempted_after("7", ended, nodes, "low", "normal") == "by job 10 (partition urgent, user gl-other)"
    assert len(asked) == 1 and asked[0][asked[0].index("-S") + 1] == ended, asked
    assert asked[0][asked[0].index("-E") + 1] == "2026-11-27T18:31:54", asked
    assert preempted_after("7", "2026-11-27T18:30:00", nodes, "low", "normal") == UNNAMED  # started before that
    assert preempted_after("7", "Unknown", nodes, "low", "normal") == UNNAMED
