"""A detached sweep's report job (launch.backends.slurm.detached): one at a time. The same command again keeps the
live one that waits for its jobs; a sweep that grew gets a new one, and the one that waited for fewer is cancelled
while it still waits. The scheduler's answers are Slurm's own words (JobInfo states); sbatch and scancel recorded."""
from __future__ import annotations

import json

import pytest

from launch.backends.slurm import commands, detached
from launch.backends.slurm.commands import JobInfo
from launch.run_status import REPORT_JOB


@pytest.fixture
def slurm(monkeypatch):
    calls, states = [], {}
    monkeypatch.setattr(commands, "job_infos", lambda ids: {i: JobInfo(i, states.get(i, "COMPLETED")) for i in ids})
    monkeypatch.setattr(commands, "cancel", lambda ids: calls.append(("scancel", *ids)))

    def sbatch(*args, **kwargs):
        calls.append(("sbatch", next(a for a in args if a.startswith("--dependency="))))
        return f"{900 + len(calls)}\n"

    monkeypatch.setattr(commands, "run", sbatch)
    return calls, states


@pytest.mark.parametrize("state, same, cancelled", [("PENDING", True, False), ("PENDING", False, True),
                                                   ("RUNNING", False, False), ("COMPLETED", True, False)])
def test_one_report_job_at_a_time(slurm, tmp_path, state, same, cancelled):
    calls, states = slurm
    (tmp_path / REPORT_JOB).write_text(json.dumps({"job_id": "500", "after": ["11", "12"]}))
    states["500"] = state
    jobs = ["11", "12"] if same else ["11", "12", "13"]
    job = detached.submit_report_job(tmp_path, jobs, None, None)
    if state != "COMPLETED" and same:  # the same command again while it waits or runs: kept
        assert job == "500" and calls == []
        return
    assert calls[-1] == ("sbatch", f"--dependency=afterany:{':'.join(jobs)}") and job != "500"
    assert (("scancel", "500") in calls) is cancelled  # a running one builds its report; the new one comes after
    assert json.loads((tmp_path / REPORT_JOB).read_text()) == {"job_id": job, "after": jobs}
