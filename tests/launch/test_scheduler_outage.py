"""A Slurm outage (its client commands time out or fail: slurmctld down, overloaded, a network cut) is not "no job":
the verbs say that Slurm does not answer. launch.cancel cancels and signals nothing and exits 1; launch.status and
launch.list call a run whose job cannot be asked about unknown (status exits 4), not failed. Slurm's commands are
stood in for by subprocess.run as commands.run calls it: the error path is the real one."""
from __future__ import annotations

import io
import json
import subprocess

import pytest

from gpt.config import schema
from helpers import compose
from launch import launch_config
from launch.backends.slurm import commands
from launch.cancel import cancel
from launch.list import listing
from launch.logs import still_running
from launch.status import status

EXIT_UNKNOWN = 4  # launch.status: the scheduler does not answer for a run that has not finished


def slurm(calls: list[list[str]], answers: dict[str, str] | None = None):
    """subprocess.run for commands.run: the commands named in `answers` answer so, every other one times out."""
    def run(cmd, **kw):
        calls.append(cmd)
        if cmd[0] in (answers or {}):
            return subprocess.CompletedProcess(cmd, 0, answers[cmd[0]], "")
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))
    return run


def run_folder(path, job_id: str = "5", finished: bool = False):
    path.mkdir(parents=True)
    schema.save(launch_config.parse(compose("train.max_steps=3")), path / "config.yaml")
    (path / "run.json").write_text("{}")
    (path / "slurm_job.json").write_text(json.dumps({"job_id": job_id}))
    if finished:
        (path / "summary.json").write_text("{}")
    return path


@pytest.fixture
def calls(monkeypatch) -> list[list[str]]:
    asked: list[list[str]] = []
    monkeypatch.setattr(commands.subprocess, "run", slurm(asked))
    return asked


def test_cancel_says_slurm_does_not_answer_and_cancels_nothing(tmp_path, calls, capsys):
    run = run_folder(tmp_path / "run")
    assert cancel(run, wait_s=0) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Slurm does not answer (squeue --me ") and "timed out after" in err, err
    assert err.endswith("nothing was cancelled or signalled; run this command again once it answers\n")
    assert err.count("\n") == 1 and not (run / "cancel.json").exists()
    assert not [c for c in calls if c[0] == "scancel"]


def test_status_and_list_say_unknown_not_failed(tmp_path, calls):
    sweep = tmp_path / "sweep"
    run_folder(sweep / "a")
    run_folder(sweep / "b", "6", finished=True)  # its folder says so: no scheduler needed
    out = io.StringIO()
    assert status(sweep, out) == EXIT_UNKNOWN
    lines = dict(line.split(": ", 1) for line in out.getvalue().splitlines())
    assert lines["a"].startswith("job 5 UNKNOWN (Slurm does not answer: squeue --me "), lines["a"]
    assert lines["a"].endswith(", unknown") and "failed" not in lines["a"]
    assert lines["b"].endswith(", finished")
    listed = io.StringIO()
    listing(sweep, listed)
    assert "a: unknown, step -/3, job 5 UNKNOWN" in listed.getvalue()
    assert still_running(sweep / "a")  # launch.logs -f follows on: the job may still write


def test_a_job_only_scontrol_could_tell_about_is_unknown_when_scontrol_does_not_answer(tmp_path, monkeypatch):
    """squeue answers without the job, sacct (read as no accounting) and scontrol time out: unknown, not GONE."""
    monkeypatch.setattr(commands.subprocess, "run", slurm([], {"squeue": "9|RUNNING|None\n"}))
    run = run_folder(tmp_path / "run")
    out = io.StringIO()
    assert status(run, out) == EXIT_UNKNOWN and "job 5 UNKNOWN (Slurm does not answer: scontrol " in out.getvalue()
