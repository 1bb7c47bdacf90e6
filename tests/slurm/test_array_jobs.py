"""A sweep that hydra-submitit-launcher submits is one Slurm array, one task per point, and the array's id is
also the job id of one of its tasks: a rank that requeues its own point must requeue that task alone."""
from __future__ import annotations

import sys
import time

import pytest

from slurm_helpers import REPO

pytestmark = pytest.mark.slurm

REQUEUE_TASK_1 = f"""#!/bin/bash
if [ "$SLURM_ARRAY_TASK_ID" = 1 ] && [ -z "$SLURM_RESTART_COUNT" ]; then
  cd {REPO} && {sys.executable} -c 'import os, signal; from launch.backends.slurm.job import SlurmJob; \\
signal.signal(signal.SIGTERM, signal.SIG_IGN); print(SlurmJob(os.environ).requeue(max_restarts=3), flush=True)'
fi
sleep 300
"""


@pytest.mark.timeout(200)
def test_a_task_of_an_array_requeues_itself_and_no_other(slurm_cluster, tmp_path):
    array = slurm_cluster.sbatch(REQUEUE_TASK_1, "--array=0-1", "--requeue", "--time=5", "--open-mode=append",
                                 f"--output={tmp_path}/%a.out", f"--chdir={tmp_path}")
    try:
        slurm_cluster.wait_state(f"{array}_0", {"RUNNING"}, timeout=60)
        out, deadline = tmp_path / "1.out", time.monotonic() + 90
        while "requeue" not in (said := out.read_text() if out.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"requeued job {array}_1" in said, said
        first, second = slurm_cluster.job_info(f"{array}_0"), slurm_cluster.job_info(f"{array}_1")
        assert (first["JobState"], first["Restarts"]) == ("RUNNING", "0"), first
        assert second["Restarts"] == "1", second
        assert slurm_cluster.job_info(array)["JobId"] == array  # the record of the task that holds the id
    finally:
        slurm_cluster.run("scancel", array, check=False)
