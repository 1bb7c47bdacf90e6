"""The sweep's waiter never lies: a held job is shown as held with the command that releases it, and a Slurm
outage (the client commands fail for a few seconds) leaves every job tracked and correctly reported."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slurm_helpers import REPO, SLURM, TINY, launch_cmd

pytestmark = pytest.mark.slurm
SLOW = [o for o in TINY if not o.startswith("train.max_steps")] + ["train.max_steps=300", "debug.delay_rank=0",
                                                                    "debug.delay_s=0.1"]
# A client command retries a controller it cannot reach for about 9 s before it fails (longer on a loaded machine):
# the outage lasts until the waiter has seen a command fail, at most this long.
OUTAGE_MAX_S = 90


def job_id(run_dir: Path, deadline: float) -> str:
    while time.monotonic() < deadline:
        f = run_dir / "slurm_job.json"
        if f.exists():
            return json.loads(f.read_text())["job_id"]
        time.sleep(0.2)
    raise AssertionError("the job was never submitted")


@pytest.mark.timeout(300)
def test_a_held_job_is_shown_held_with_its_release_command(slurm_cluster, tmp_path, data_overrides):
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    cmd = launch_cmd("-m", "nodes=1", *SLURM, *TINY, *data_overrides, "+cluster.sbatch.hold=true",
                     f"hydra.sweep.dir={sweep}")
    with out.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=slurm_cluster.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            job = job_id(sweep / "nodes=1", time.monotonic() + 120)
            hint = f"job {job} is pending (JobHeldUser) and will not start by itself: scontrol release {job}"
            deadline = time.monotonic() + 60
            while hint not in out.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert hint in out.read_text(), out.read_text()[-3000:]
            slurm_cluster.run("scontrol", "release", job)
            assert proc.wait(timeout=180) == 0, out.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert f"job {job} (nodes=1) COMPLETED" in out.read_text()


def controller_back(cluster, timeout: float = 60) -> None:
    """The rest of the suite needs the controller: wait for it, or start the cluster again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.run("sinfo", check=False).returncode == 0:
            return
        time.sleep(1)
    cluster.script("up", str(cluster.nodes))  # this worker's own instance


@pytest.mark.timeout(480)
def test_a_slurm_outage_leaves_every_job_tracked(slurm_cluster, tmp_path, data_overrides):
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    cmd = launch_cmd("-m", "nodes=1,2", *SLURM, *SLOW, *data_overrides, f"hydra.sweep.dir={sweep}")
    pid_file = slurm_cluster.conf.parent / "run" / "slurmctld.pid"
    with out.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=slurm_cluster.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            jobs = [job_id(sweep / point, deadline) for point in ("nodes=1", "nodes=2")]
            # Every rank must be up: a job step that starts during the outage fails in srun itself (it cannot
            # confirm its allocation), which is Slurm's behaviour, not the waiter's.
            ranks = [sweep / f"nodes={n}" / "environment" / f"rank{r}.json" for n in (1, 2) for r in range(n)]
            while not (all(slurm_cluster.job_state(j) == "RUNNING" for j in jobs) and all(f.exists() for f in ranks)):
                assert time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.2)
            os.kill(int(pid_file.read_text()), signal.SIGTERM)  # the controller is gone: every client command fails
            outage_end = time.monotonic() + OUTAGE_MAX_S
            while "Slurm does not answer" not in out.read_text() and time.monotonic() < outage_end:
                time.sleep(0.5)
            subprocess.Popen(["setsid", "slurmctld", "-D", "-i"], env=slurm_cluster.env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            assert proc.wait(timeout=300) == 0, out.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
            controller_back(slurm_cluster)
    text = out.read_text()
    assert "Slurm does not answer" in text and "Slurm answers again" in text, text[-3000:]
    assert text.count("COMPLETED") == 2 and "GONE" not in text
