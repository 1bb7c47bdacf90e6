"""Site profiles on the local cluster: a profile from a folder outside the repository (GPTLAUNCH_SITE_DIR) with an
account, --gres, an srun flag, an environment variable and a setup line, each seen from inside every rank; and the
two example profiles (examples/site/), each running a short job.

The ranks' environment is read by a `sitecustomize` module put on the ranks' PYTHONPATH through the profile's own
cluster.env: it runs inside each rank process (python -m launch.rank.worker) and writes that process's environment.
The local cluster has no accounting (AccountingStorageType=accounting_storage/none): Slurm takes any --account
name unchecked and shows it to the job as SLURM_JOB_ACCOUNT."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_helpers import REPO, SLURM, TINY, environments, launch_cmd, output, run_launch, train_records

pytestmark = pytest.mark.slurm

SHORT = [*TINY, "train.max_steps=2", "train.warmup_steps=1", "train.device=cpu", "nodes=2"]
PROBE = '''import json, os
if b"launch.rank.worker" in open("/proc/self/cmdline", "rb").read().split(b"\\0"):
    with open(os.path.join({out!r}, "rank%s.json" % os.environ.get("SLURM_PROCID")), "w") as f:
        json.dump(dict(os.environ), f)
'''
PROFILE = """# @package _global_
defaults:
  - override /cluster: slurm
cluster:
  account: site_probe_account
  tasks_per_node: 2
  gres: gpu:2
  srun_args: ["--export=ALL,SITE_SRUN_ARG=from_srun"]
  env:
    SITE_ENV: from_env
    MASTER_PORT: "29517"
    PYTHONPATH: {probe}
  setup:
    - export SITE_SETUP=from_setup
"""


def probe(tmp_path: Path) -> tuple[Path, Path]:
    """A sitecustomize folder, and the folder where it writes each rank's environment."""
    folder, out = tmp_path / "probe", tmp_path / "rank_env"
    folder.mkdir(parents=True)
    out.mkdir()
    (folder / "sitecustomize.py").write_text(PROBE.format(out=str(out)))
    return folder, out


def rank_envs(out: Path, world: int) -> list[dict]:
    files = sorted(out.glob("rank*.json"))
    assert [f.name for f in files] == [f"rank{r}.json" for r in range(world)], files
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.timeout(300)
def test_a_site_profile_from_outside_the_repository_reaches_every_rank(slurm_cluster, tmp_path, data_overrides):
    sites = tmp_path / "my_sites"
    (sites / "site").mkdir(parents=True)
    probe_dir, out = probe(tmp_path)
    (sites / "site" / "probe.yaml").write_text(PROFILE.format(probe=probe_dir))
    # the submitting shell has the same MASTER_PORT: the site's must not be dropped as one inherited from it
    env = {**slurm_cluster.env, "GPTLAUNCH_SITE_DIR": str(sites), "MASTER_PORT": "29517"}
    run_dir = tmp_path / "run"
    proc = run_launch(env, "site=probe", *SLURM, *SHORT, *data_overrides, f"hydra.run.dir={run_dir}", timeout=240)
    assert proc.returncode == 0, output(proc)
    for rank_env in rank_envs(out, 4):
        assert rank_env["SLURM_JOB_ACCOUNT"] == "site_probe_account"  # --account
        assert rank_env["SITE_SRUN_ARG"] == "from_srun"  # the srun flag
        assert rank_env["SITE_ENV"] == "from_env"  # cluster.env
        assert rank_env["SITE_SETUP"] == "from_setup"  # the setup line, run by the batch script before srun
        assert rank_env["CUDA_VISIBLE_DEVICES"] == "0,1" and rank_env["SLURM_GPUS_ON_NODE"] == "2"  # --gres=gpu:2
    assert [e["gpu_plan"]["visible"] for e in environments(run_dir)] == ["0,1"] * 4
    assert {e["master"].rpartition(":")[2] for e in environments(run_dir)} == {"29517"}  # the site's port
    assert len(train_records(run_dir)) == 2


@pytest.mark.timeout(300)
def test_the_example_profiles_run_on_the_local_cluster(slurm_cluster, tmp_path, data_overrides):
    """Both examples as shipped but for the partition (the local cluster has one, `debug`), at the same time."""
    env = {**slurm_cluster.env, "GPTLAUNCH_SITE_DIR": str(REPO / "examples")}
    runs = {}
    for site in ("gpu_cluster", "cpu_cluster"):
        probe_dir, out = probe(tmp_path / site)
        run_dir = tmp_path / site / "run"
        cmd = launch_cmd(f"site={site}", *SLURM, *SHORT, *data_overrides, "cluster.partition=null",
                         f"+cluster.env.PYTHONPATH={probe_dir}", f"hydra.run.dir={run_dir}")
        runs[site] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True), out, run_dir)
    for site, (proc, out, run_dir) in runs.items():
        text = proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, text[-6000:]
        for rank_env in rank_envs(out, 4):
            assert rank_env["SLURM_JOB_ACCOUNT"] == "my_project" and rank_env["GPTLAUNCH_SITE"] == site
            assert rank_env.get("SLURM_GPUS_ON_NODE") == ("2" if site == "gpu_cluster" else None)  # --gres=gpu:2
        assert len(train_records(run_dir)) == 2


USERS_SCRIPT = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=10
#SBATCH --signal=USR1@90
exec {python} -m launch cluster=srun "$@"
"""


@pytest.mark.timeout(300)
def test_a_users_own_batch_script_sets_the_signal_the_ranks_save_on(slurm_cluster, tmp_path, data_overrides):
    """Lightning's habit, --signal=USR1@90 in the user's own script: the ranks save on USR1 and allow 90 s. The
    site's srun flag and environment reach every rank under cluster=srun too."""
    script, run_dir, log = tmp_path / "mine.sh", tmp_path / "run", tmp_path / "job.out"
    script.write_text(USERS_SCRIPT.format(python=sys.executable))
    probe_dir, out = probe(tmp_path)
    site = ['cluster.srun_args=["--export=ALL,SITE_SRUN_ARG=from_srun"]', "+cluster.env.SITE_ENV=from_env",
            f"+cluster.env.PYTHONPATH={probe_dir}"]
    submit = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(script), *SHORT, *data_overrides, *site,
                             f"hydra.run.dir={run_dir}"], cwd=REPO, env=slurm_cluster.env, capture_output=True,
                            text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        assert slurm_cluster.wait_state(job, timeout=240) == "COMPLETED", log.read_text()
    finally:
        slurm_cluster.run("scancel", job, check=False)
    config = (run_dir / "config.yaml").read_text()
    assert "- SIGUSR1\n" in config and "signal_delay_s: 90\n" in config, config
    assert "the ranks save on it too" in log.read_text()
    for rank_env in rank_envs(out, 2):
        assert (rank_env["SITE_SRUN_ARG"], rank_env["SITE_ENV"]) == ("from_srun", "from_env")
    assert len(train_records(run_dir)) == 2
