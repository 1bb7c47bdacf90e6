"""Two users of one cluster: neither's jobs are taken for the other's, and the verbs never act on another user's job.
Slurm's client commands answer here as they do for a second user (squeue --me lists only that user's jobs);
tests/slurm/test_second_user.py runs a second Unix user's jobs beside the first's on the local cluster."""
from __future__ import annotations

import io
import json

from launch.backends.slurm import commands
from launch.cancel import cancel
from launch.list import listing


def _answers(calls: list[tuple[str, ...]]):
    """Job 7 is another user's and runs; job 8 is this user's and waits."""
    def run(*cmd: str, **_) -> str:
        calls.append(cmd)
        if cmd[0] == "squeue":
            assert "--me" in cmd
            return "8|PENDING|Priority\n"
        if cmd[0] == "sacct":
            return "7|RUNNING\n"
        raise AssertionError(f"nothing else is asked: {cmd}")
    return run


def _run_folder(path, job_id: str):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("{}\n")
    (path / "run.json").write_text("{}\n")
    (path / "slurm_job.json").write_text(json.dumps({"job_id": job_id}))
    return path


def test_cancel_refuses_another_users_job_before_writing_or_signalling_anything(tmp_path, monkeypatch):
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(commands, "run", _answers(calls))
    theirs = _run_folder(tmp_path / "theirs", "7")
    assert cancel(theirs, wait_s=0) == 2
    assert not (theirs / "cancel.json").exists()  # a request there would stop their ranks' next requeue
    assert not any(c[0] == "scancel" for c in calls)


def test_cancel_refusal_names_the_job_and_whose_it_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(commands, "run", _answers([]))
    assert cancel(_run_folder(tmp_path / "theirs", "7"), wait_s=0) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "job(s) 7 of" in err and "another user" in err


def test_list_shows_whose_live_job_a_run_folder_names(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "run", _answers([]))
    _run_folder(tmp_path / "theirs", "7")
    _run_folder(tmp_path / "mine", "8")
    out = io.StringIO()
    listing(tmp_path, out)
    lines = dict(line.split(": ", 1) for line in out.getvalue().splitlines())
    assert "RUNNING (another user's job)" in lines["theirs"]
    assert "PENDING" in lines["mine"] and "another user" not in lines["mine"]
