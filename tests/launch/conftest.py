"""Fixtures shared by the tests of tests/launch."""
from __future__ import annotations

import pytest

from launch.backends.slurm import commands


@pytest.fixture
def asked(monkeypatch) -> list[str]:
    """The jobs a rank asked Slurm to requeue, with the job shown RUNNING on its first run: scontrol stood in for
    where the code under test only decides (tests/slurm asks a real cluster)."""
    requeues: list[str] = []
    monkeypatch.setattr(commands, "scontrol_job", lambda job: commands.JobInfo(job, "RUNNING", "", (("Restarts", "0"),)))
    monkeypatch.setattr(commands, "requeue", requeues.append)
    return requeues
