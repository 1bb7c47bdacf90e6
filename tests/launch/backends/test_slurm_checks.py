"""cluster=slurm input checks and the budget guard, without a cluster: everything a user can get wrong is one
short line naming it, before anything is submitted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from launch.backends.cluster_config import BudgetConfig
from gpt.config.names import check_run_name
from gpt.config.schema import RunConfig
from launch import launch_config
from gpt.config.parse import section
from gpt.errors import ConfigError, UserError
from launch.planning.budget import PointCost, check_budget, table
from launch.backends.slurm import partitions
from launch.backends.slurm.partitions import (check_against_cluster, parse_gpus, parse_sinfo, parse_time_min,
                                              resolve_cpus)
from launch.backends.slurm.resources import SlurmResources
from launch.backends.slurm.submit import no_filename_pattern
from helpers import REPO, SHAKESPEARE, spread

SINFO = """debug*|4|2|8000|(null)|8:00:00|up
gpu|2|64|512000|gpu:a100:8(S:0-1)|2-00:00:00|up
gpu|6|32|256000|gpu:4|2-00:00:00|up
old|3|8|16000|(null)|infinite|down
"""


def slurm_cfg(*overrides: str) -> RunConfig:
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return launch_config.parse(compose("config", overrides=["cluster=slurm", *overrides]))


def resources(*overrides: str) -> SlurmResources:
    return SlurmResources.from_run(slurm_cfg(*overrides))


def test_defaults_follow_the_top_level_node_count():
    res = resources("nodes=4")
    assert (res.nodes, res.tasks_per_node, res.gpus_per_node, res.time_min, res.requeue) == (4, 1, 0, 60, True)
    assert res.signal_delay_s == 120 and slurm_cfg().cluster.signal_delay_s is None  # the job's own warning
    params = res.executor_parameters("tiny-ddp", Path("/work"), Path("/logs"))
    assert params["nodes"] == 4 and params["time"] == 60 and params["additional_parameters"]["requeue"] is True
    assert "--kill-on-bad-exit=1" in params["srun_args"]


CONFLICTS = {
    "tasks differ from GPUs": (["cluster.gpus_per_node=4", "cluster.tasks_per_node=2"],
                               "cluster.tasks_per_node=2 is not valid: equal to cluster.gpus_per_node=4"),
    "cuda without GPUs": (["train.device=cuda"], "cluster.gpus_per_node=0 is not valid: at least 1 with train.device=cuda"),
    "sbatch flag the launcher owns": (["+cluster.sbatch.nodes=3"], "cluster.sbatch.nodes=3 is not valid: set through nodes"),
    "sbatch output flag": (["+cluster.sbatch.output=x.out"], "cluster.sbatch.output='x.out' is not valid: a flag the launcher"),
    "zero nodes": (["nodes=0"], "nodes=0 is not valid: a positive integer"),
    "bad memory": (["cluster.mem=lots"], "cluster.mem='lots' is not valid: memory per node like 64G"),
    "a chain of no jobs": (["cluster.chain=0"], "cluster.chain=0 is not valid: an integer >= 1"),
    "time limit shorter than the checkpoint interval": (
        ["cluster.time_min=30", "checkpoint.interval_minutes=45"],
        "cluster.time_min=30 is not valid: longer than checkpoint.interval_minutes=45"),
    "warning signal after the time limit": (["cluster.time_min=1", "cluster.signal_delay_s=90"],
                                            "cluster.signal_delay_s=90 is not valid: shorter than the time limit"),
    "the default warning after the time limit": (["cluster.time_min=1"],
                                                 "cluster.signal_delay_s=120 is not valid: shorter than the time limit"),
}


@pytest.mark.parametrize("overrides,message", spread("overrides,message", CONFLICTS.values(), 3), ids=CONFLICTS.keys())
def test_conflicting_resources_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        resources(*overrides)
    assert message in str(e.value)


def test_a_chain_is_singleton_jobs_and_costs_each_link():
    one, chain = resources("nodes=2", "cluster.time_min=30"), resources("nodes=2", "cluster.time_min=30",
                                                                       "cluster.chain=3")
    assert "dependency" not in one.executor_parameters("n", Path("/work"), Path("/logs"))["additional_parameters"]
    assert chain.executor_parameters("n", Path("/work"), Path("/logs"))["additional_parameters"]["dependency"] == "singleton"
    gated = resources("nodes=2", "cluster.time_min=30", "cluster.chain=3", "+cluster.sbatch.dependency=afterok:7")
    assert gated.executor_parameters("n", Path("/work"), Path("/logs"))["additional_parameters"]["dependency"] == "afterok:7,singleton"
    assert chain.node_hours == 3 * one.node_hours == 3.0
    assert chain.describe() == "2 node(s) x 1 task(s), 30 min x a chain of 3"
    with pytest.raises(UserError, match=r"3.00 node-hours .* nodes x cluster.time_min x cluster.chain each"):
        check_budget([PointCost("nodes=2", chain)], 2.0, "expected")


def test_extra_sbatch_flags_and_setup_lines_pass_through():
    res = resources("+cluster.sbatch.exclusive=true", "+cluster.sbatch.reservation=r1", "cluster.setup=[module load x]")
    params = res.executor_parameters("n", Path("/work"), Path("/logs"))
    assert params["additional_parameters"] == {"requeue": True, "exclusive": True, "reservation": "r1"}
    assert params["setup"][-1] == "module load x"


def test_sinfo_parsing():
    parts = parse_sinfo(SINFO)
    assert parts["debug"].default and parts["debug"].nodes == 4 and parts["debug"].max_time_min == 480
    assert parts["gpu"].nodes == 8 and parts["gpu"].max_time_min == 2880
    assert {g[3] for g in parts["gpu"].groups} == {8, 4}
    assert parts["old"].max_time_min is None and not parts["old"].up
    assert parse_time_min("30") == 30 and parse_time_min("1:30:00") == 90 and parse_time_min("05:30") == 6
    assert parse_gpus("gpu:2,shard:8") == 2 and parse_gpus("(null)") == 0


CLUSTER = {
    "unknown partition": (["cluster.partition=gpus"], "cluster.partition='gpus' is not a partition of this cluster; "
                                                       "its partitions: debug, gpu, old"),
    "more nodes than the partition has": (["nodes=8"], "nodes=8 is more than partition 'debug' has (4 node(s))"),
    "time limit above the partition's": (["cluster.time_min=600"], "cluster.time_min=600 is longer than partition "
                                                                    "'debug' allows (480 min)"),
    "partition down": (["cluster.partition=old"], "partition 'old' is not up"),
    "too many CPUs per node": (["cluster.tasks_per_node=2", "cluster.cpus_per_task=2"],
                               "= 4 CPU(s) per node, but the nodes of partition 'debug' have at most 2 CPU(s)"),
    "too many tasks, CPUs per task auto": (["cluster.tasks_per_node=3", "cluster.cpus_per_task=auto"],
                                           "cluster.tasks_per_node=3 x cluster.cpus_per_task=auto (1) = 3 CPU(s)"),
    "GPUs on a CPU partition": (["cluster.gpus_per_node=2", "cluster.tasks_per_node=2"],
                                "cluster.gpus_per_node=2 per node, but the nodes of partition 'debug' have at most 0"),
    "too few nodes with 8 GPUs": (["cluster.partition=gpu", "nodes=3", "cluster.gpus_per_node=8",
                                   "cluster.tasks_per_node=8"], "only 2 of the 8 nodes of partition 'gpu' have that much"),
    "memory": (["cluster.mem=16G"], "cluster.mem=16G per node, but the nodes of partition 'debug' have at most 8000 MB"),
}


@pytest.mark.parametrize("overrides,message", spread("overrides,message", CLUSTER.values(), 3), ids=CLUSTER.keys())
def test_resources_checked_against_the_partitions(overrides, message):
    with pytest.raises(UserError) as e:
        check_against_cluster(resources(*overrides), parse_sinfo(SINFO))
    assert message in str(e.value)


def test_fitting_resources_pass_and_pick_the_default_partition():
    assert check_against_cluster(resources("nodes=4"), parse_sinfo(SINFO)).name == "debug"
    part = check_against_cluster(resources("nodes=6", "cluster.partition=gpu", "cluster.gpus_per_node=4",
                                           "cluster.tasks_per_node=4"), parse_sinfo(SINFO))
    assert part.name == "gpu"


def test_cpus_per_task_auto_gives_a_gpu_rank_its_share_of_the_node():
    parts = parse_sinfo(SINFO)
    gpu = resources("cluster.partition=gpu", "cluster.gpus_per_node=8", "cluster.tasks_per_node=8")
    assert gpu.cpus_per_task is None  # auto, the default
    assert resolve_cpus(gpu, check_against_cluster(gpu, parts)).cpus_per_task == 8  # 64 CPUs / 8 ranks
    four = resources("cluster.partition=gpu", "cluster.gpus_per_node=4", "cluster.tasks_per_node=4")
    assert resolve_cpus(four, parts["gpu"]).cpus_per_task == 8  # the smallest node with 4 GPUs has 32 CPUs
    one = resources("cluster.partition=gpu", "cluster.gpus_per_node=1", "cluster.tasks_per_node=1")
    assert resolve_cpus(one, parts["gpu"]).cpus_per_task == 8  # one GPU's share, not its node's 32 or 64 CPUs
    cpu = resources("cluster.tasks_per_node=2")
    assert resolve_cpus(cpu, check_against_cluster(cpu, parts)).cpus_per_task == 1
    assert resolve_cpus(resources("cluster.cpus_per_task=2"), parts["debug"]).cpus_per_task == 2


@pytest.mark.parametrize("node_mb, share_gib", [(64000, 31.25), (1, None)])
def test_mem_0_is_the_whole_node_in_the_fit_check(node_mb, share_gib, tmp_path, monkeypatch, caplog):
    """cluster.mem=0 is Slurm's "all of the node's memory": a CPU rank's share is of the node's memory as sinfo
    tells it, not of 0 GiB ("more than 90% of 0.0 GiB" refused every CPU run). Nodes without RealMemory (Slurm's
    default, 1 MB) have an unknown memory: not checked, and the line says which key would state it."""
    from launch.backends import get_backend
    from helpers import make_plan_of

    monkeypatch.setattr(partitions, "_sinfo", lambda path: f"debug*|4|8|{node_mb}|(null)|8:00:00|up\n")
    run = slurm_cfg("model=gpt2_124m", "cluster.mem=0", "cluster.tasks_per_node=2", "strategy=ddp",
                    "train.global_batch_size=8", "data.prepare_on=job", f"data.text_path={SHAKESPEARE}",
                    f"data.dir={tmp_path / 'data'}")
    caplog.set_level("INFO")
    make_plan_of(run, tmp_path / "run")  # each rank needs about 5.7 GiB
    assert get_backend("slurm").device_memory_gib(run, "cpu") == share_gib
    assert ("is not known, so it is not checked (state it: cluster.mem)" in caplog.text) == (share_gib is None)


def sweep(*nodes: int, time_min: int = 60, gpus: int = 0) -> list[PointCost]:
    return [PointCost(f"nodes={n}", SlurmResources(nodes=n, tasks_per_node=max(gpus, 1), gpus_per_node=gpus,
                                                   time_min=time_min)) for n in nodes]


def test_budget_counts_nodes_times_time_limit_over_the_sweep():
    costs = sweep(1, 2, 4, time_min=90, gpus=8)
    text = table(costs, 100.0)
    assert "10.50" in text and "84.00" in text and "budget.max_node_hours=100" in text  # 7 x 1.5 h; x 8 GPUs
    check_budget(costs, 100.0)
    check_budget(costs, None)  # null: no limit


def test_budget_refuses_above_the_limit_naming_figure_and_limit():
    with pytest.raises(UserError) as e:
        check_budget(sweep(1, 2, 400), 100.0)  # a typo: 400 instead of 4
    message = str(e.value)
    assert "403.00 node-hours" in message and "budget.max_node_hours=100" in message
    assert "nodes=400" in message and "budget.max_node_hours=403" in message  # how to raise it, if meant


def test_budget_counts_restarts_in_the_worst_case():
    costs = [PointCost(c.label, c.resources, restarts=10) for c in sweep(1, 2, 4, time_min=60)]
    text = table(costs, 70.0)
    assert "7.00" in text and "77.00" in text and "on the worst case" in text  # 7 node-hours, x 11 attempts
    with pytest.raises(UserError) as e:
        check_budget(costs, 70.0)
    assert "77.00 node-hours in the worst case" in str(e.value) and "budget.applies_to=expected" in str(e.value)
    check_budget(costs, 70.0, applies_to="expected")


@pytest.mark.slow
def test_restarts_come_from_the_preemption_settings():
    assert resources("nodes=2").restarts == 10  # preemption.max_restarts's default
    assert resources("nodes=2", "preemption.max_restarts=0").restarts == 0
    assert resources("nodes=2", "cluster.requeue=false").restarts == 0
    assert resources("nodes=2", "preemption.enabled=false").restarts == 0
    with pytest.raises(ConfigCompositionException):  # the schema: an integer
        resources("nodes=2", "preemption.max_restarts=abc")


def test_the_budget_section():
    assert section(BudgetConfig, "budget", {"max_node_hours": 5}) == BudgetConfig(5.0, "worst")
    assert section(BudgetConfig, "budget", {"max_node_hours": None}).max_node_hours is None  # no limit
    with pytest.raises(ConfigError, match="budget.applies_to='best' is not valid"):
        section(BudgetConfig, "budget", {"applies_to": "best"})
    with pytest.raises(ConfigError, match="budget.max_hours=5 is not valid: known budget keys are applies_to, "
                                          "max_node_hours"):
        section(BudgetConfig, "budget", {"max_hours": 5})
    for bad in (0, -1, "lots", True):
        with pytest.raises(ConfigError, match="budget.max_node_hours"):
            section(BudgetConfig, "budget", {"max_node_hours": bad})


@pytest.mark.slow
def test_no_sbatch_suggests_cluster_local(tmp_path):
    """On a machine without Slurm: one line, no traceback, nothing run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = str(Path(sys.executable).parent)  # python, no Slurm
    proc = subprocess.run([sys.executable, "-m", "launch", "cluster=slurm", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "error: cluster=slurm needs Slurm's sbatch" in proc.stderr and "cluster=local" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


ALLOCATION = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NTASKS": "2"}


@pytest.fixture
def srun_on_path(monkeypatch):
    import launch.backends.srun

    monkeypatch.setattr(launch.backends.srun.shutil, "which", lambda name: f"/usr/bin/{name}")


def srun_cfg(*overrides: str) -> RunConfig:
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return launch_config.parse(compose("config", overrides=["cluster=srun", *overrides]))


def test_srun_backend_takes_nodes_and_tasks_from_the_allocation(srun_on_path):
    from launch.backends.srun import resolve_allocation

    run = resolve_allocation(srun_cfg(), {**ALLOCATION, "SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS_PER_NODE": "4"})
    assert (run.nodes, run.cluster.tasks_per_node) == (3, 4)
    run = resolve_allocation(srun_cfg(), {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)"})
    assert (run.nodes, run.cluster.tasks_per_node) == (2, 2)


def test_srun_backend_checks_its_environment(srun_on_path):
    from launch.backends.srun import resolve_allocation

    with pytest.raises(UserError, match="cluster=srun runs inside a Slurm allocation"):
        resolve_allocation(srun_cfg(), {})
    with pytest.raises(UserError, match="4 GPU.s. per node but 1 task.s. per node: one rank per GPU needs "
                                        "sbatch --ntasks-per-node=4"):
        resolve_allocation(srun_cfg(), {**ALLOCATION, "SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "4"})


def test_gpus_an_exclusive_job_was_handed_unasked_are_a_warning(srun_on_path, capsys):
    from launch.backends.srun import resolve_allocation

    run = resolve_allocation(srun_cfg(), {**ALLOCATION, "SLURM_GPUS_ON_NODE": "4"})  # sbatch --exclusive
    assert run.cluster.tasks_per_node == 1
    assert "warning: this allocation has 4 GPU(s) per node but 1 task(s) per node" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="nodes=4 is not valid: auto or 2"):
        resolve_allocation(srun_cfg("nodes=4"), ALLOCATION)


def test_the_budget_table_of_a_large_sweep_has_a_row_per_kind_of_job():
    costs = [PointCost(f"nodes={n},train.lr={lr}", SlurmResources(nodes=n, time_min=60))
             for lr in range(64) for n in (1, 2, 4, 8)]
    text = table(costs, None)
    assert len(text.splitlines()) == 1 + 4 + 2, text  # header, 4 kinds, total, the note
    assert "64 x nodes=8,train.lr=0 ..." in text and "512.00" in text  # 64 jobs of 8 nodes for an hour
    assert "960.00" in text and "256 points in 4 rows" in text  # 15 node-hours x 64
    assert table(costs[:20], None).count("\n") == 21  # a small sweep: a row per point


def _mounts(script: str, runtime: str) -> list[tuple[str, str]]:
    """The (source, target) pairs of the srun line's mount list, split as pyxis and apptainer split it."""
    import re
    import shlex

    srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))
    flag = next(a for a in srun if a.startswith("--container-mounts=")).split("=", 1)[1] if runtime == "pyxis" \
        else srun[srun.index("--bind") + 1]
    return [tuple((re.split(":", m) + [m])[:2]) for m in flag.split(",")]


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_a_sweep_point_with_a_comma_in_its_folder_is_mounted_through_the_folder_above(tmp_path, runtime):
    """Hydra names a sweep's points by the keys that vary, joined by commas: every job of such a sweep failed in its
    container, its folder cut in two at the comma. The sweep's folder is mounted instead, which holds them."""
    from launch.backends.slurm.resources import sbatch_script
    from launch.backends.slurm.step import RankStep

    sweep = tmp_path / "elsewhere" / "sweep"  # outside the submit folder: its points are mounted themselves
    points = [sweep / f"nodes={n},train.lr=0.001" for n in (1, 2)]
    step = RankStep(image="img", runtime=runtime).mounting(tmp_path / "submit", sweep / "slurm", *points)
    script = sbatch_script(SlurmResources(nodes=2, step=step), sweep / "slurm", "j", tmp_path / "submit")
    mounts = _mounts(script, runtime)
    assert all(src == dst and src.startswith("/") for src, dst in mounts), mounts
    for folder in (tmp_path / "submit", *points):
        assert any(str(folder).startswith(src + "/") or str(folder) == src for src, _ in mounts), (folder, mounts)
    assert (str(sweep), str(sweep)) in mounts


def test_a_folder_no_container_can_mount_is_refused_in_one_line():
    from launch.backends.slurm.step import RankStep

    with pytest.raises(UserError, match=r"^/a,b/run cannot be mounted in the container \(cluster.container.runtime="
                                        r"pyxis\): pyxis and apptainer split their list of mounts at ',' and ':'"):
        RankStep(image="img").mounting(Path("/a,b/run"))
    assert RankStep().mounting(Path("/a,b/run")) == RankStep()  # no container: nothing to mount


def test_a_percent_sign_slurm_would_read_as_a_filename_pattern_is_refused():
    """sbatch expands %j, %x, ... in --output and --error, and submitit %j in its folder: a run's logs would land
    elsewhere. A run name with one is refused while the config is parsed; a folder with one (hydra.run.dir,
    hydra.sweep.dir, a sweep value) before anything is queued."""
    with pytest.raises(ConfigError, match=r"^run='exp%j' is not valid: .*no '%' \(a scheduler's log name patterns\)"):
        check_run_name("exp%j")
    with pytest.raises(UserError, match=r"^/w/a%xb/run has a '%', which Slurm reads in the job's log paths"):
        no_filename_pattern(Path("/w/sweep/slurm"), Path("/w/a%xb/run"))
    no_filename_pattern(Path("/w/sweep/slurm"), Path("/w/sweep/run"))


@pytest.mark.parametrize("overrides, no_kill", [((), False), (("cluster.spare_nodes=1",), True),
                                                (("preemption.shrink=auto",), True),
                                                (("preemption.shrink=auto", "preemption.in_job_restarts=0"), False)])
def test_a_job_that_goes_on_without_a_lost_node_runs_with_no_kill(overrides, no_kill):
    """A spare, or preemption.shrink=auto's round on the nodes left: Slurm must end neither the job nor its step."""
    params = resources("nodes=2", *overrides).executor_parameters("n", Path("/work"), Path("/logs"))
    assert ("no-kill" in params["additional_parameters"]) is no_kill
    assert ("--kill-on-bad-exit=0" in params["srun_args"]) is no_kill
    assert any("spare_exit" in line for line in params["teardown"]) is no_kill
