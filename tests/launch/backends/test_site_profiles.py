"""Site profiles (site=NAME from a folder on Hydra's search path) and the cluster keys a site sets, checked without a
cluster: how a profile is found, what each key becomes for the job, and the one-line refusals. The job seeing each
key is tests/slurm/test_site_profile.py; the exact sbatch and srun lines are tests/slurm/test_sbatch_golden.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import launch_config
from launch.backends.cluster_config import ClusterConfig, ContainerConfig
from gpt.errors import ConfigError
from helpers import REPO, compose, spread
from launch.backends.slurm.resources import SlurmResources
from launch.backends.slurm.step import RankStep
from launch.backends.slurm.submitted import inherited_rank_variables
from launch.backends.srun import SIGNAL_LINE, with_job_signal
from launch.backends import get_backend
from launch.planning.plan import planned_device

PROFILE = """# @package _global_
defaults:
  - override /cluster: slurm
cluster:
  partition: gpu
  account: proj42
  reservation: maint
  tasks_per_node: 4
  gres: gpu:a100:4
  srun_args: [--mpi=pmix]
  env: {NCCL_DEBUG: WARN, MASTER_PORT: 29517}
  setup: [module load cuda/12.4]
  master_host_suffix: -ib
  container: {image: /images/pt.sif, runtime: apptainer, mounts: [/scratch:/scratch]}
"""


@pytest.fixture(autouse=True)
def registered():
    launch_config.register()


@pytest.fixture
def site_dir(tmp_path, monkeypatch) -> Path:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "mysite.yaml").write_text(PROFILE)
    monkeypatch.setenv("GPTLAUNCH_SITE_DIR", str(tmp_path))
    return tmp_path


def launch_cfg(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args, "--cfg", "job"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)


def test_a_profile_from_the_site_folder_sets_the_job(site_dir):
    run = launch_config.parse(compose("site=mysite", "model=tiny", "strategy=ddp"))
    res = SlurmResources.from_run(run)
    assert (run.cluster.name, res.partition, res.account, res.reservation, res.gres) == (
        "slurm", "gpu", "proj42", "maint", "gpu:a100:4")
    assert res.step == RankStep(srun_args=("--mpi=pmix",), env=(("MASTER_PORT", "29517"), ("NCCL_DEBUG", "WARN")),
                                master_host_suffix="-ib", image="/images/pt.sif", runtime="apptainer",
                                mounts=("/scratch:/scratch",))
    params = res.executor_parameters("j", Path("/work"), Path("/logs"))
    assert params["gres"] == "gpu:a100:4" and params["additional_parameters"]["reservation"] == "maint"
    assert params["setup"][1:] == ["export MASTER_PORT=29517", "export NCCL_DEBUG=WARN",
                                   'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"-ib',
                                   "module load cuda/12.4"]
    # a command-line override still wins over the profile
    assert launch_config.parse(compose("site=mysite", "cluster.account=other")).cluster.account == "other"


def test_hydra_searchpath_finds_a_profile_too(site_dir):
    env = {k: v for k, v in os.environ.items() if k != "GPTLAUNCH_SITE_DIR"}
    proc = launch_cfg(f"hydra.searchpath=[file://{site_dir}]", "site=mysite", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "gres: gpu:a100:4" in proc.stdout and "account: proj42" in proc.stdout


@pytest.mark.slow
def test_a_missing_profile_is_one_line_naming_where_profiles_are(site_dir):
    proc = launch_cfg("site=nosuch")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: site='nosuch' is not valid: one of mysite (a profile site/NAME.yaml in the folder named by "
        "GPTLAUNCH_SITE_DIR or hydra.searchpath=[file:///DIR])"]
    env = {k: v for k, v in os.environ.items() if k != "GPTLAUNCH_SITE_DIR"}
    proc = launch_cfg("site=mysite", env=env)
    assert proc.returncode == 2 and "no site/ folder is on the search path" in proc.stderr, proc.stderr


REFUSED = {
    "two GPU forms": (["cluster.gres=gpu:2", "cluster.gpus_per_task=1"],
                      "cluster.gres='gpu:2' is not valid: unset while cluster.gpus_per_task is set"),
    "gres in sbatch and gpus_per_node": (["+cluster.sbatch.gres=gpu:2", "cluster.gpus_per_node=1"],
                                         "cluster.sbatch.gres='gpu:2' is not valid: unset while cluster.gpus_per_node"),
    "a bad gres": (["cluster.gres=4"], "cluster.gres='4' is not valid: a --gres value like gpu:4"),
    "a signal the ranks do not save on": (["cluster.signal=USR1"], "cluster.signal='USR1' is not valid: one of "
                                          "preemption.signals=['SIGTERM', 'SIGUSR2'], or add it there"),
    "a flag the launcher sets": (["+cluster.sbatch.ntasks=4"], "cluster.sbatch.ntasks=4 is not valid: set through "
                                 "cluster.tasks_per_node instead (the launcher writes --ntasks itself"),
    "a container runtime": (["cluster.container.image=x", "cluster.container.runtime=docker"],
                            "cluster.container.runtime='docker' is not valid: one of pyxis, apptainer"),
}


@pytest.mark.parametrize("overrides,message", spread("overrides,message", REFUSED.values(), 2), ids=REFUSED.keys())
def test_bad_site_keys_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        SlurmResources.from_run(launch_config.parse(compose("cluster=slurm", *overrides)))
    assert message in str(e.value)


@pytest.mark.parametrize("key,value,message", [
    ("srun_args", ["--export=ALL", "X=1"], "is not valid: srun flags, one --flag=value per item"),  # YAML split it
    ("env", {"1X": "a"}, "cluster.env.1X='a' is not valid: a variable name"),
    ("master_host_suffix", "-ib; rm", "is not valid: a hostname suffix like -ib"),
    ("container", ContainerConfig(image="x", mounts=["/a,/b"]), "cluster.container.mounts='/a,/b' is not valid"),
])
def test_bad_step_keys_are_refused(key, value, message):
    with pytest.raises(ConfigError) as e:
        ClusterConfig(name="srun", tasks_per_node="auto", **{key: value}).validate()
    assert message in str(e.value)


def test_submitits_timeout_min_is_the_time_limit():
    cluster = launch_config.parse(compose("cluster=slurm", "cluster.timeout_min=30")).cluster
    assert (cluster.time_min, cluster.timeout_min) == (30, None)
    assert SlurmResources.from_run(launch_config.parse(compose("cluster=slurm", "cluster.timeout_min=30"))).time_min == 30


def test_sbatch_passes_gres_and_other_flags_slurm_takes():
    run = launch_config.parse(compose("cluster=slurm", "+cluster.sbatch.gres=gpu:2", "+cluster.sbatch.gpu-bind=closest",
                             "cluster.tasks_per_node=2",
                             "cluster.signal=USR1", "preemption.signals=[SIGUSR1,SIGTERM]", "cluster.signal_delay_s=90"))
    extra = SlurmResources.from_run(run).executor_parameters("j", Path("/w"), Path("/logs"))["additional_parameters"]
    assert (extra["gres"], extra["gpu-bind"], extra["signal"]) == ("gpu:2", "closest", "USR1@90")


def test_master_address_and_port_the_site_sets_win():
    step = RankStep(env=(("MASTER_PORT", "29517"),), master_host_suffix="-ib")
    assert step.environ("node7") == {"MASTER_PORT": "29517", "MASTER_ADDR": "node7-ib"}
    assert RankStep(env=(("MASTER_ADDR", "10.0.0.1"),), master_host_suffix="-ib").environ("n1") == {
        "MASTER_ADDR": "10.0.0.1"}
    # a MASTER_PORT the site sets is not taken for one inherited from the submitting shell (which the job drops)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MASTER_PORT", "29517")
        m.setenv("MASTER_ADDR", "login1")
        assert inherited_rank_variables({"MASTER_PORT": "29517"}) == {"MASTER_ADDR": "login1"}


SCRIPTS = {"#SBATCH --signal=USR1@90\n": ("USR1", 90), "#SBATCH --signal=B:SIGUSR2@120\n": ("USR2", 120),
           "#SBATCH --signal=R:B:TERM\n": ("TERM", None), "# no signal\n#SBATCH --time=10\n": None}


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_signal_of_a_users_own_batch_script_is_read(script):
    found = SIGNAL_LINE.findall(script)
    assert ((found[-1][0].upper(), int(found[-1][1]) if found[-1][1] else None) if found else None) == SCRIPTS[script]


def test_the_ranks_save_on_the_signal_of_a_users_own_batch_script(monkeypatch):
    """Lightning users write --signal=USR1@90: the ranks then handle USR1 too, and allow for its 90 s."""
    import launch.backends.srun as srun

    monkeypatch.setattr(srun, "job_signal", lambda job_id: ("USR1", 90))
    run = with_job_signal(launch_config.parse(compose("cluster=srun")), "7")
    assert run.preemption.signals == ("SIGTERM", "SIGUSR2", "SIGUSR1") and run.cluster.signal_delay_s == 90


@pytest.mark.parametrize("gres,gpus", [("gpu:4", 4), ("gpu:a100:4", 4), ("gpu", 1), ("gpu:2,nvme:1", 2), ("nvme:1", 0)])
def test_gpus_asked_for_as_gres_count_as_the_nodes_gpus(gres, gpus):
    """A GPU site that takes only --gres: its ranks compute on GPUs (train.device=auto), each node's GPUs are checked
    against its tasks and the partition, and the budget counts them."""
    run = launch_config.parse(compose("cluster=slurm", f"cluster.gres='{gres}'", f"cluster.tasks_per_node={max(gpus, 1)}"))
    res = SlurmResources.from_run(run)
    device = planned_device(run, get_backend(run.cluster.name))
    assert (run.cluster.node_gpus, res.node_gpus, device) == (gpus, gpus, "cuda" if gpus else "cpu")
    assert res.gpu_hours == gpus


def test_gpus_per_task_and_gres_keep_one_rank_per_gpu():
    with pytest.raises(ConfigError, match=r"cluster.tasks_per_node=2 is not valid: equal to cluster.gres=gpu:4, "
                                          r"4 GPU\(s\) per node \(one rank per GPU\)"):
        launch_config.parse(compose("cluster=slurm", "cluster.gres=gpu:4", "cluster.tasks_per_node=2"))
    with pytest.raises(ConfigError, match="cluster.tasks_per_node=2 is not valid: equal to cluster.gpus_per_task=2"):
        launch_config.parse(compose("cluster=slurm", "cluster.gpus_per_task=2", "cluster.tasks_per_node=2"))
    run = launch_config.parse(compose("cluster=slurm", "cluster.gpus_per_task=1", "cluster.tasks_per_node=4",
                             "train.device=cuda"))
    assert SlurmResources.from_run(run).executor_parameters("j", Path("/w"), Path("/logs"))["gpus_per_task"] == 1


EXAMPLES = ("cpu_cluster", "gpu_cluster")
IN_JOB = {"SLURM_JOB_PARTITION": "debug", "SLURM_JOB_ACCOUNT": "my_project", "SLURM_CPUS_PER_TASK": "1"}


@pytest.mark.parametrize("site", EXAMPLES)
def test_an_example_profile_plans_inside_an_allocation(site, monkeypatch):
    """sbatch slurm/multi_node.sh site=NAME and salloc's cluster=srun take the profile: its allocation keys are
    compared with the allocation (one warning, naming the sbatch flag), not refused after the job started."""
    from launch.backends.slurm.allocation import warning

    monkeypatch.setenv("GPTLAUNCH_SITE_DIR", str(REPO / "examples"))
    run = launch_config.parse(compose("cluster=srun", f"site={site}", "model=tiny", "strategy=ddp"))
    cluster = run.with_cluster(nodes=2, tasks_per_node=2).cluster
    gpus = {"SLURM_GPUS_ON_NODE": "2"} if site == "gpu_cluster" else {}
    said = warning(cluster, {**IN_JOB, **gpus})
    assert said == (None if site == "cpu_cluster" else "warning: this allocation is not what the config asks sbatch "
                    "for, and inside it only sbatch's or salloc's own flags count: cluster.partition=gpu (this job's: "
                    "debug; sbatch --partition=gpu)")
    assert "cluster.gres=gpu:2 (this job's: 1 GPU(s) per node; sbatch --gres=gpu:2)" in warning(
        cluster, {**IN_JOB, "SLURM_GPUS_ON_NODE": "1"}) and warning(cluster, {**IN_JOB, "SLURM_JOB_PARTITION": "gpu"}) \
        is None \
        if site == "gpu_cluster" else warning(cluster, {**IN_JOB, "SLURM_JOB_ACCOUNT": "x"}).endswith(
            "cluster.account=my_project (this job's: x; sbatch --account=my_project)")
    with pytest.raises(ConfigError, match=r"cluster.chain=2 is not valid: cluster=srun reads"):
        launch_config.parse(compose("cluster=srun", f"site={site}", "cluster.chain=2"))


def test_the_setup_lines_run_in_the_shell_that_becomes_srun():
    from launch.backends.srun import srun_command

    cmd = srun_command(1, 1, None, RankStep(), [], Path("/run"), Path("/w"), setup=("export SITE_SETUP=from_setup",
                                                                                     "cd /"))
    shell = cmd[:cmd.index("srun")]
    proc = subprocess.run([*shell, "sh", "-c", "echo $SITE_SETUP $(pwd)"], capture_output=True, text=True, timeout=30)
    assert proc.stdout == "from_setup /\n" and cmd[cmd.index("srun"):][1] == "--nodes=1"
    assert srun_command(1, 1, None, RankStep(), [], Path("/run"), Path("/w"))[0] == "srun"  # no setup, no shell


def stock(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return hydra_compose("config", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
                                                  "model=tiny", "strategy=ddp", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("site", EXAMPLES)
@pytest.mark.slow
def test_the_stock_launcher_submits_with_an_example_profile(site, monkeypatch):
    """On the login node, before the stock launcher submits: the profile's keys become its hydra.launcher.* keys,
    as cluster=slurm's sbatch script has them; a hydra.launcher key on the command line wins."""
    from launch.backends.slurm.stock_profile import StockLauncherProfile

    monkeypatch.setenv("GPTLAUNCH_SITE_DIR", str(REPO / "examples"))
    cfg = stock(f"site={site}", "hydra.launcher.account=mine")
    StockLauncherProfile().on_multirun_start(cfg)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.account) == (2, 2, "mine")
    assert launcher.partition == (None if site == "cpu_cluster" else "gpu")
    assert f"export GPTLAUNCH_SITE={site}" in launcher.setup and launcher.additional_parameters.requeue
    assert launcher.srun_args[-1] == ("--cpu-bind=none" if site == "cpu_cluster" else "--gpu-bind=none")
    assert (launcher.gres, launcher.timeout_min) == (("gpu:2", 60) if site == "gpu_cluster" else (None, 30))


@pytest.mark.parametrize("overrides,message", [
    (["cluster=slurm", "cluster.spare_nodes=1"], "cluster.spare_nodes=1 is not valid: 0 under hydra/launcher="
                                                 "submitit_slurm, which cannot run hot spares"),
    (["cluster=srun"], "cluster.name='srun' is not valid: local, or slurm"),
    (["cluster=slurm", "cluster.gres=gpu:2", "cluster.tasks_per_node=2", "hydra.launcher.tasks_per_node=1"],
     "cluster.tasks_per_node=1 is not valid: equal to cluster.gres=gpu:2"),  # the shape the job would get
])
def test_the_stock_launcher_refuses_what_it_cannot_do_before_it_submits(overrides, message):
    from launch.backends.slurm.stock_profile import StockLauncherProfile

    cfg = stock(*overrides)
    with pytest.raises(ConfigError) as e:
        StockLauncherProfile().on_multirun_start(cfg)
    assert message in str(e.value)
    StockLauncherProfile().on_multirun_start(stock())  # cluster=local: the stock launcher's own keys, untouched
