"""`sbatch slurm/multi_node.sh`: a 2-node job trains the tiny model on two hosts, with the same losses as the
same run under cluster=local."""
from __future__ import annotations

import subprocess

import pytest

from slurm_helpers import REPO, TINY, environments, losses, output, run_launch

pytestmark = pytest.mark.slurm


@pytest.mark.timeout(300)
def test_sbatch_multi_node_trains_on_two_hosts_like_local(slurm_cluster, tmp_path, data_overrides):
    run_dir, log = tmp_path / "sbatch", tmp_path / "job.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--time=10", f"--output={log}", str(REPO / "slurm" / "multi_node.sh"),
         *TINY, *data_overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        # the same run on this machine while the job runs
        local = run_launch(slurm_cluster.env, "cluster=local", "nodes=2", *TINY, *data_overrides,
                           f"hydra.run.dir={tmp_path / 'local'}")
        assert local.returncode == 0, output(local)
        state = slurm_cluster.wait_state(job, timeout=240)
    finally:
        slurm_cluster.run("scancel", job, check=False)
    text = log.read_text() if log.exists() else "(no job log)"
    assert state == "COMPLETED", text
    assert f"multi_node.sh: job {job} (restart 0) on 2 node(s)" in text

    envs = environments(run_dir)
    assert [e["rank"] for e in envs] == [0, 1]
    hosts = {e["host"] for e in envs}
    assert len(hosts) == 2 and hosts <= slurm_cluster.node_names(), hosts
    assert hosts == set(slurm_cluster.hostnames(slurm_cluster.job_info(job)["NodeList"]))
    assert all(e["world_size"] == 2 and e["scheduler"]["SLURM_JOB_ID"] == job for e in envs)
    assert "name: srun" in (run_dir / "config.yaml").read_text()
    assert losses(run_dir) == pytest.approx(losses(tmp_path / "local"), rel=1e-5)
    assert len(losses(run_dir)) == 6


@pytest.mark.timeout(300)
def test_a_multi_node_job_is_seen_by_list_and_status_and_cancel_saves_it(slurm_cluster, tmp_path, data_overrides):
    """A run sbatch started has no slurm_job.json: its ranks record the job they run in, so launch.list and
    launch.status show it running (not "no job", not failed), and launch.cancel stops it, saving first."""
    import json
    import sys
    import time

    runs, log = tmp_path / "runs", tmp_path / "job.out"
    run_dir = runs / "sbatch"
    slow = [o for o in TINY if not o.startswith("train.max_steps")] + ["train.max_steps=300", "debug.delay_rank=0",
                                                                       "debug.delay_s=0.1"]
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--time=10", f"--output={log}", str(REPO / "slurm" / "multi_node.sh"),
         *slow, *data_overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]

    def verb(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", f"launch.{name}", *args], cwd=REPO, env=slurm_cluster.env,
                              capture_output=True, text=True, timeout=120)

    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics" / "rank0.jsonl").exists() and len(losses(run_dir)) >= 10):
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "(no job log)"
            time.sleep(0.5)
        listed = verb("list", str(runs))
        assert listed.stdout.startswith("sbatch: running, step ") and f"job {job} RUNNING" in listed.stdout, \
            output(listed)
        status = verb("status", str(run_dir))
        assert status.returncode == 3 and f"job {job} RUNNING" in status.stdout, output(status)
        cancel = verb("cancel", str(run_dir))
        assert cancel.returncode == 0 and f"sent the preemption signal to job(s) {job}" in cancel.stdout, \
            output(cancel)
        assert slurm_cluster.wait_state(job, timeout=60) in ("CANCELLED", "COMPLETED")
    finally:
        slurm_cluster.run("scancel", job, check=False)
    [attempt] = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert attempt["ended"] == "cancelled by the user" and not attempt["requeued"], attempt
    assert (run_dir / "checkpoints" / f"step_{attempt['last_step']:08d}").is_dir(), attempt
    status = verb("status", str(run_dir))
    assert status.returncode == 0 and status.stdout.rstrip().endswith("cancelled by the user"), output(status)
