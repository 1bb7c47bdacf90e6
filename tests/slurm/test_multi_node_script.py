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
