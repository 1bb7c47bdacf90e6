"""The Slurm command layer's parsers, fed recorded outputs (Slurm 22.05 from the local cluster, 24.05 from a
production cluster's format) with every job state the launcher must tell apart."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch.backends.slurm.commands import (FINAL, GONE, PENDING, RUNNING, STATES, JobInfo, parse_sacct, parse_scontrol_job,
                                   parse_squeue, parse_squeue_scripts, state_of)

OUTPUTS = Path(__file__).parent / "slurm_outputs"
# What a state means to the waiter: still to come (pending), under way, or over for good.
EXPECTED = {
    "PENDING": PENDING, "REQUEUED": PENDING, "REQUEUE_HOLD": PENDING, "SUSPENDED": PENDING,
    "RUNNING": RUNNING, "COMPLETING": RUNNING,
    "COMPLETED": FINAL, "FAILED": FINAL, "CANCELLED": FINAL, "TIMEOUT": FINAL, "PREEMPTED": FINAL,
    "NODE_FAIL": FINAL, "OUT_OF_MEMORY": FINAL, "DEADLINE": FINAL, "BOOT_FAIL": FINAL,
}


def recorded(name: str) -> str:
    return (OUTPUTS / name).read_text()


def with_state(text: str, state: str, reason: str = "None") -> str:
    fields = parse_scontrol_job(text)
    return text.replace(f"JobState={fields['JobState']}", f"JobState={state}").replace(
        f"Reason={fields['Reason']}", f"Reason={reason}")


@pytest.mark.parametrize("name", ["scontrol_o_22.05.txt", "scontrol_22.05.txt", "scontrol_o_24.05.txt"])
@pytest.mark.parametrize("state", sorted(EXPECTED))
def test_every_state_in_every_format(name, state):
    fields = parse_scontrol_job(with_state(recorded(name), state))
    assert state_of(fields["JobState"]) == state
    assert state in EXPECTED[state] and state in STATES
    assert fields["NodeList"] and fields["JobId"] and fields["Restarts"].isdigit()


def test_fields_with_colons_slashes_and_underscores():
    fields = parse_scontrol_job(recorded("scontrol_o_24.05.txt"))
    assert fields["CPUs/Task"] == "2" and fields["AllocNode:Sid"] == "login1:12345"
    assert fields["MCS_label"] == "N/A" and fields["ExcNodeList"] == "node07" and fields["Restarts"] == "2"
    assert fields["ReqTRES"] == "cpu=32,mem=64G,node=2,billing=32,gres/gpu=16"


def test_the_multi_line_format_reads_like_the_one_line_format():
    one, many = parse_scontrol_job(recorded("scontrol_o_22.05.txt")), parse_scontrol_job(recorded("scontrol_22.05.txt"))
    assert {k: one[k] for k in ("JobId", "JobState", "NodeList", "Restarts", "ExitCode")} == \
           {k: many[k] for k in ("JobId", "JobState", "NodeList", "Restarts", "ExitCode")}


def test_a_held_job_says_how_to_release_it():
    fields = parse_scontrol_job(recorded("scontrol_o_22.05_held.txt"))
    info = JobInfo(fields["JobId"], state_of(fields["JobState"]), fields["Reason"])
    assert info.state == "PENDING" and info.reason == "JobHeldUser"
    assert info.stuck_hint == f"scontrol release {fields['JobId']}"
    assert JobInfo("7", "PENDING", "Priority").stuck_hint is None


def test_squeue_rows_and_sacct_states():
    rows = parse_squeue(recorded("squeue_22.05.txt"))
    assert rows["1"] == ("FAILED", "JobLaunchFailure") and rows["5"] == ("PENDING", "JobHeldUser")
    assert parse_sacct("CANCELLED by 0\n") == "CANCELLED" and parse_sacct("RUNNING+\n") == "RUNNING"
    assert parse_sacct("") is None and GONE not in STATES


def test_squeue_scripts_keep_each_jobs_folder_and_arguments():
    # as Slurm 22.05 prints `squeue -h -o '%i|%T|%Z|%o'` (the second job's script came on stdin: no path)
    text = "1|PENDING|/home/a/gpt|/home/a/gpt/slurm/multi_node.sh model=tiny run=x|y\n2|RUNNING|/home/a|(null)\n"
    first, second = parse_squeue_scripts(text)
    assert (first.job_id, first.state, first.workdir) == ("1", "PENDING", "/home/a/gpt")
    assert first.command == ("/home/a/gpt/slurm/multi_node.sh", "model=tiny", "run=x|y")
    assert second.command == ("(null)",)


@pytest.mark.parametrize("name", ["scontrol_o_22.05_array.txt", "scontrol_22.05_array.txt"])
def test_an_array_id_reads_the_record_of_the_task_asked_for(name):
    # `scontrol show job 7` prints every task of array 7: task 7_1 (job 7) was requeued, task 7_0 (job 8) runs.
    text = recorded(name)
    for job_id in ("7", "7_1"):
        fields = parse_scontrol_job(text, job_id)
        assert (fields["ArrayTaskId"], fields["JobState"], fields["Restarts"]) == ("1", "PENDING", "1")
    for job_id in ("8", "7_0"):
        fields = parse_scontrol_job(text, job_id)
        assert (fields["ArrayTaskId"], fields["JobState"], fields["Restarts"]) == ("0", "RUNNING", "0")


def test_a_job_past_its_time_limit_is_timed_out_not_cancelled():
    """scancel and the time limit both end a job COMPLETING with SIGTERM: RunTime against TimeLimit tells them apart."""
    from launch.backends.slurm.commands import duration_s, timed_out

    assert [duration_s(t) for t in ("1-02:03:04", "02:03:04", "03:04", "UNLIMITED", "", "1-x")] == \
        [93784, 7384, 184, None, None, None]
    ending = [("JobState", "COMPLETING"), ("TimeLimit", "00:10:00")]
    assert timed_out(JobInfo("7", "COMPLETING", fields=(*ending, ("RunTime", "00:10:01"))))
    assert not timed_out(JobInfo("7", "COMPLETING", fields=(*ending, ("RunTime", "00:03:12"))))
    assert not timed_out(JobInfo("7", "COMPLETING", fields=(("RunTime", "00:03:12"), ("TimeLimit", "UNLIMITED"))))


def test_a_node_the_job_asks_for_by_name_is_not_excluded_and_the_line_says_why(monkeypatch):
    """Excluding a node of the job's own --nodelist leaves the requeued job pending for ever (BadConstraints): the
    job is requeued without the exclusion, and the line says that its nodelist is why."""
    from launch.backends.slurm import job as slurm_job

    record = {"ReqNodeList": "gl-n[1-2]", "ExcNodeList": "(null)", "Partition": "batch", "NumNodes": "2"}
    asked = []
    monkeypatch.setattr(slurm_job.commands, "scontrol_job", lambda job: record)  # what scontrol show job says
    monkeypatch.setattr(slurm_job.commands, "hostnames", {"gl-n[1-2]": ["gl-n1", "gl-n2"]}.__getitem__)
    monkeypatch.setattr(slurm_job.commands, "exclude_nodes", lambda job, nodes: asked.append(("exclude", nodes)))
    monkeypatch.setattr(slurm_job.SlurmJob, "requeue", lambda self, limit: (True, "requeued job 7"))
    job = slurm_job.SlurmJob({"SLURM_JOB_ID": "7"})
    requeued, how = job.requeue_excluding(["gl-n2"], 3)
    assert requeued and asked == []
    assert how == ("requeued job 7; not without gl-n2: the job asks for it by name (--nodelist, "
                   "cluster.sbatch.nodelist): leave it out of that list to keep the run off it")
