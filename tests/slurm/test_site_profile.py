"""Site profiles on the local cluster: a profile from a folder outside the repository (GPTLAUNCH_SITE_DIR) with an
account, --gres, an srun flag, an environment variable and a setup line, each seen from inside every rank; and the
two example profiles (examples/site/), each running a short job.

The ranks' environment is read by a `sitecustomize` module put on the ranks' PYTHONPATH through the profile's own
cluster.env: it runs inside each rank process (python -m launch.rank.worker) and writes that process's environment.
The local cluster keeps accounting (slurmdbd): Slurm keeps a job's --account only for an account the user belongs
to, so the profiles' accounts are made first (`accounts`), as a site's administrator makes them; the job shows it
as SLURM_JOB_ACCOUNT."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import plan
from slurm_helpers import REPO, SLURM, TINY, environments, launch_cmd, output, run_launch, train_records

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def accounts(slurm_cluster) -> None:
    """The profiles' accounts in the cluster's books, as a site's administrator makes them: with accounting, Slurm
    keeps a job's --account only when the user belongs to it (else the job runs under the user's default)."""
    for account in ("my_project", "site_probe_account"):
        slurm_cluster.run("sacctmgr", "-i", "add", "account", account, check=False)
        slurm_cluster.run("sacctmgr", "-i", "add", "user", "root", f"account={account}", check=False)

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


# What each example profile asks sbatch for, as a user of sbatch or salloc gives it (inside an allocation only
# sbatch's own flags count); the local cluster has one partition, `debug`, so the partition is its default.
ASKED = {"cpu_cluster": ["--ntasks-per-node=2", "--cpus-per-task=1", "--account=my_project"],
         "gpu_cluster": ["--ntasks-per-node=2", "--gres=gpu:2", "--account=my_project"]}
EXAMPLE = [*TINY, "train.max_steps=2", "train.warmup_steps=1", "train.device=cpu"]


def check_example_ranks(site: str, out: Path, run_dir: Path, text: str) -> None:
    """The example's srun flag, environment and setup line reached both ranks, and the allocation agreed with it."""
    for rank_env in rank_envs(out, 2):
        assert rank_env["SLURM_JOB_ACCOUNT"] == "my_project" and rank_env["GPTLAUNCH_SITE"] == site, text
        assert rank_env.get("SLURM_GPUS_ON_NODE") == ("2" if site == "gpu_cluster" else None)
        if site == "cpu_cluster":  # the profile's srun flag, --cpu-bind=none (srun sets nothing for --gpu-bind=none)
            assert rank_env.get("SLURM_CPU_BIND_TYPE", "").startswith("none"), rank_env.get("SLURM_CPU_BIND_TYPE")
        assert rank_env.get("OMP_PROC_BIND" if site == "cpu_cluster" else "NCCL_DEBUG") == (
            "false" if site == "cpu_cluster" else "WARN")  # cluster.env
    assert "warning: this allocation is not what" not in text, text
    assert len(train_records(run_dir)) == 2


@pytest.mark.timeout(360)
def test_the_example_profiles_inside_an_allocation(slurm_cluster, tmp_path, data_overrides):
    """sbatch slurm/multi_node.sh site=gpu_cluster and salloc ... python -m launch cluster=srun site=cpu_cluster, the
    two one-node jobs at once (each example runs under the launcher too, above and below): every key of the
    profile that can still apply does (the setup lines run before srun), and those of the allocation agree with it,
    where the launcher used to refuse the profile once the job had started."""
    env = {**slurm_cluster.env, "GPTLAUNCH_SITE_DIR": str(REPO / "examples")}
    script = str(REPO / "slurm" / "multi_node.sh")
    plan(tmp_path / "prepare", *EXAMPLE, *data_overrides)  # the corpus, before two jobs could race to prepare it
    jobs = {}
    for path, site in (("sbatch", "gpu_cluster"), ("salloc", "cpu_cluster")):
        probe_dir, out = probe(tmp_path / path / site)
        run_dir, log = tmp_path / path / site / "run", tmp_path / path / site / "job.out"
        overrides = [f"site={site}", *EXAMPLE, *data_overrides, "cluster.partition=null",
                     f"+cluster.env.PYTHONPATH={probe_dir}", f"hydra.run.dir={run_dir}"]
        head = ["sbatch", "--wait", f"--output={log}", "--nodes=1", *ASKED[site], script] if path == "sbatch" else \
            ["salloc", "--nodes=1", "--time=5", *ASKED[site], *launch_cmd("cluster=srun")]
        with log.open("a") as f:
            jobs[path, site] = (subprocess.Popen([*head, *overrides], cwd=REPO, env=env, stdout=f,
                                                 stderr=subprocess.STDOUT), out, run_dir, log)
    for (path, site), (proc, out, run_dir, log) in jobs.items():
        code = proc.wait(timeout=300)
        text = log.read_text()
        assert code == 0, f"{path} {site}: {text[-6000:]}"
        check_example_ranks(site, out, run_dir, text)


@pytest.mark.timeout(360)
def test_the_example_profiles_under_the_stock_launcher(slurm_cluster, tmp_path, data_overrides):
    """python -m launch -m hydra/launcher=submitit_slurm site=NAME: the profile's keys became the stock launcher's
    before it submitted (launch.backends.slurm.stock_profile), and the job's ranks see them."""
    env = {**slurm_cluster.env, "GPTLAUNCH_SITE_DIR": str(REPO / "examples")}
    plan(tmp_path / "prepare", *EXAMPLE, *data_overrides)  # the corpus, before two jobs could race to prepare it
    runs = {}
    for site in ASKED:
        probe_dir, out = probe(tmp_path / site)
        sweep = tmp_path / site / "sweep"
        cmd = launch_cmd("-m", "hydra/launcher=submitit_slurm", f"site={site}", *EXAMPLE, *data_overrides,
                         "cluster.partition=null", "nodes=1", "hydra.launcher.timeout_min=10",
                         f"+cluster.env.PYTHONPATH={probe_dir}", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=run")
        runs[site] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True), out, sweep / "run")
    for site, (proc, out, run_dir) in runs.items():
        text = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, text[-6000:]
        check_example_ranks(site, out, run_dir, text)
