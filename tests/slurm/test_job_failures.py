"""A job that fails reaches the user as an error naming the rank, its host and a log path within seconds;
nothing hangs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from slurm_helpers import REPO, SLURM, TINY, launch_cmd, output, run_launch

pytestmark = pytest.mark.slurm


@pytest.mark.timeout(240)
def test_failing_jobs_report_their_error_and_log(slurm_cluster, tmp_path, data_overrides):
    """Three broken jobs in one sweep: the batch script fails before any rank starts; every rank crashes
    (a Python error in its start-up); the ranks cannot reach their rendezvous."""
    sweep = tmp_path / "sweep"
    nowhere = slurm_cluster.address(99)  # in the cluster's subnet, but no node has it
    start = time.monotonic()
    proc = run_launch(
        slurm_cluster.env, "-m", "nodes=2", *SLURM, *TINY, *data_overrides, f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}", "rendezvous.timeout_s=3",
        f'cluster.setup=["exit 3"],["export MASTER_PORT=notaport"],["export MASTER_ADDR={nowhere}"]')
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, output(proc)
    jobs = re.findall(r"submitted job (\d+) for (\d)", proc.stdout)
    assert len(jobs) == 3, output(proc)
    ids = {point: jid for jid, point in jobs}
    err = proc.stderr
    assert "error: 3 of 3 job(s) failed" in err and "Traceback" not in err

    # the batch script itself failed: Slurm's exit code and the job's log
    assert f"error: job {ids['0']} (0) ended FAILED:" in err
    assert "the job ended before any rank reported (ExitCode=3:0" in err
    assert f"job log: {sweep / 'slurm' / (ids['0'] + '_0_log.err')}" in err
    # a crash in every rank: rank, host, the exception, where its traceback is
    crash = re.search(rf"rank \d on {slurm_cluster.node_re} exited with code 1: ValueError: invalid literal for int\(\).*'notaport' "
                      rf"\(its log: {re.escape(str(sweep / 'slurm'))}/{ids['1']}_\d_log.err\)", err)
    assert crash, err
    # the rendezvous could not be reached: the rank says so, with its host, within the timeout
    assert re.search(rf"rank \d on {slurm_cluster.node_re} could not (open|reach) the rendezvous at {re.escape(nowhere)}:\d+ "
                     r"within 3 s", err), err
    assert elapsed < 150, f"took {elapsed:.0f} s\n{output(proc)}"


def _worker_pid(env_file) -> int | None:
    try:
        pid = json.loads(env_file.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
    try:  # only ever kill the process this test's job started
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return None
    return pid if b"launch.rank.worker" in cmdline else None


@pytest.mark.timeout(240)
def test_killed_rank_ends_the_job_and_the_wait_within_seconds(slurm_cluster, tmp_path, data_overrides):
    """With no restarts left, a killed rank's task does not requeue: the job fails and the launcher says so."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        launch_cmd("-m", "nodes=2", *SLURM, *TINY, *data_overrides, f"hydra.sweep.dir={sweep}",
                   "train.max_steps=100000", "preemption.max_restarts=0",
                   "preemption.in_job_restarts=0"),  # trains until killed
        cwd=REPO, env=slurm_cluster.env, stdout=(tmp_path / "out").open("w"), stderr=(tmp_path / "err").open("w"))
    run_dir = sweep / "nodes=2"
    try:
        deadline = time.monotonic() + 150
        pid = None
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = run_dir / "metrics" / "rank1.jsonl"
            if metrics.exists() and metrics.read_text().count("\n") >= 2:  # training is under way
                pid = _worker_pid(run_dir / "environment" / "rank1.json")
                if pid:
                    break
            time.sleep(0.3)
        assert pid, "rank 1 never started training"
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=60)
        waited = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"] if (run_dir / "slurm_job.json").exists() else None
        if job:
            slurm_cluster.run("scancel", job, check=False)
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 1, f"{stdout}\n{stderr}"
    assert re.search(rf"rank 1 on {slurm_cluster.node_re} was killed by SIGKILL \(its log: {re.escape(str(run_dir))}/logs/rank1.log\)",
                     stderr), stderr
    assert f"error: job {job} (nodes=2) ended FAILED" in stderr
    assert "restart limit reached (0 of preemption.max_restarts=0); the same command continues the run" in stderr
    assert waited < 40, f"the launcher took {waited:.1f} s to report the dead rank"  # not its 60 s wait
    assert slurm_cluster.job_state(job) in {"FAILED", "CANCELLED"}
