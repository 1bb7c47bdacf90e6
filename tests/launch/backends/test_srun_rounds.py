"""cluster=srun's launcher after in-job restarts (launch.recovery.rounds): how the job ended is the newest round's
line, not the first round's. srun is stood in for; tests/slurm/test_in_job_restart.py restarts real ranks."""
from __future__ import annotations

import json
from pathlib import Path

from gpt.config import schema
from launch import launch_config
from helpers import compose
from launch.backends import srun
from launch.rank.job_env import LAUNCH_VAR
from launch.run.attempts import requeued


def test_a_job_requeued_in_a_later_round_is_not_taken_for_done(tmp_path: Path, monkeypatch):
    """Round 0 lost a rank and restarted inside the allocation; round 1 lost one too and requeued the job. srun
    exits 0 before Slurm stops the batch step: the launcher must see the requeue (else it says 'done')."""
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n1")
    schema.save(launch_config.parse(compose("cluster=srun")), tmp_path / "config.yaml")

    class Srun:
        """Its ranks ran two rounds, the second of which requeued the job."""

        def __init__(self, cmd, env, **kwargs):
            launch = env[LAUNCH_VAR]
            (tmp_path / "rounds" / f"launch-{launch}").mkdir(parents=True)
            (tmp_path / "rounds" / f"launch-{launch}" / "round-1.json").write_text("{}")
            key = {"job_id": "42", "restart": 0, "launch": launch}
            (tmp_path / "attempts.jsonl").write_text(
                json.dumps({**key, "round": 0, "ended": "rank 1 was killed by SIGKILL", "in_job_restart": 1}) + "\n"
                + json.dumps({**key, "round": 1, "ended": "rank 1 was killed by SIGKILL", "requeued": True}) + "\n")
            self.pid = 0

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(srun.subprocess, "Popen", Srun)
    job = srun.run_srun(tmp_path, 1, 1)
    assert job.round == 1 and requeued(tmp_path, job)  # what launch.app asks before saying "done"
