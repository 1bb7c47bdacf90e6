"""Golden files of the sbatch scripts the launcher has submitit write, for one and several nodes.

Paths are normalised: the log folder reads <LOGS>, the Python interpreter <PYTHON>. After a deliberate change,
rewrite the files with GPTLAUNCH_UPDATE_GOLDEN=1 and review the diff. test_launcher.py checks that the scripts
really submitted in a sweep match one_node.sh and four_nodes.sh.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

import shlex
import signal

from launch.backends.slurm.resources import SlurmResources, sbatch_script
from launch.backends.slurm.step import RankStep
from launch.backends.srun import srun_command
from slurm_helpers import GOLDEN, normalise

LOGS = Path("/golden/sweep/slurm")
WORK = Path("/golden")  # the submit folder
# What test_launcher.py's sweep asks for: model=tiny strategy=ddp cluster.time_min=10
CASES = {
    "one_node": (SlurmResources(nodes=1, time_min=10), "tiny-ddp", None),
    "four_nodes": (SlurmResources(nodes=4, time_min=10), "tiny-ddp", None),
    "gpu_nodes": (SlurmResources(nodes=8, tasks_per_node=8, gpus_per_node=8, cpus_per_task=12, time_min=720,
                                 partition="gpu", mem="480G", account="proj42", qos="high", constraint="a100",
                                 sbatch=(("exclusive", True),),
                                 setup=("module load cuda/12.4", "source ~/venv/bin/activate")),
                  "gpt2_124m-fsdp", None),
    "array_of_two": (SlurmResources(nodes=2, time_min=30, requeue=False), "tiny-ddp", 2),
    # a site profile: --gres, an account and a reservation, its srun flag, environment, InfiniBand hostnames, the
    # warning it sends (USR1, Lightning's habit) and a setup line
    "site_gres": (SlurmResources(nodes=2, tasks_per_node=2, gres="gpu:2", account="proj42", reservation="maint",
                                 signal="USR1", signal_delay_s=90, setup=("module load cuda/12.4",),
                                 step=RankStep(srun_args=("--mpi=pmix",), env=(("NCCL_DEBUG", "WARN"),),
                                               master_host_suffix="-ib")),
                  "gpt2_124m-fsdp", None),
}
IMAGES = {"pyxis": "nvcr.io#nvidia/pytorch:24.05-py3", "apptainer": "/images/pytorch.sif"}
RUN_DIR = WORK / "runs" / "gpt2_124m-fsdp"


def container(runtime: str) -> RankStep:
    """A container with one mount of the user's; the submit folder (which holds the run folders and the logs here)
    is mounted by default."""
    step = RankStep(image=IMAGES[runtime], runtime=runtime, mounts=("/scratch/data:/data",))
    return step.mounting(WORK, LOGS, RUN_DIR)


for _runtime in IMAGES:
    CASES[f"{_runtime}_sbatch"] = (SlurmResources(nodes=2, tasks_per_node=8, gpus_per_node=8, cpus_per_task=12,
                                                  time_min=60, step=container(_runtime)), "gpt2_124m-fsdp", None)


def check_golden(name: str, script: str) -> None:
    path = GOLDEN / f"{name}.sh"
    if os.environ.get("GPTLAUNCH_UPDATE_GOLDEN"):
        path.write_text(script)  # then fail, so that an update switch left on can never pass a run
        pytest.fail(f"wrote {path}: review the diff, then run again without GPTLAUNCH_UPDATE_GOLDEN")
    assert path.exists(), f"no golden file {path}: run with GPTLAUNCH_UPDATE_GOLDEN=1 to write it"
    assert script == path.read_text(), f"the sbatch script for {name} changed; diff it against {path}"


@pytest.mark.parametrize("name", CASES)
def test_generated_sbatch_script_matches_golden(name):
    resources, job_name, array = CASES[name]
    check_golden(name, normalise(sbatch_script(resources, LOGS, job_name, WORK, array_size=array), LOGS))


@pytest.mark.parametrize("runtime", IMAGES)
def test_generated_srun_line_inside_an_allocation_matches_golden(runtime):
    """sbatch slurm/multi_node.sh (cluster=srun): the srun line that starts the ranks in the container."""
    cmd = srun_command(2, 8, "12", container(runtime), [signal.SIGTERM, signal.SIGUSR2], RUN_DIR, WORK, "<PYTHON>")
    check_golden(f"{runtime}_srun", shlex.join(cmd).replace("'<PYTHON>'", "<PYTHON>") + "\n")


def test_golden_scripts_say_what_matters():
    one, four = (GOLDEN / "one_node.sh").read_text(), (GOLDEN / "four_nodes.sh").read_text()
    for script, nodes in ((one, 1), (four, 4)):
        assert f"#SBATCH --nodes={nodes}\n" in script and "#SBATCH --requeue\n" in script
        assert "#SBATCH --signal=USR2@120\n" in script and "#SBATCH --open-mode=append\n" in script
        assert "srun --unbuffered" in script and "--kill-on-bad-exit=1" in script
    gpu = (GOLDEN / "gpu_nodes.sh").read_text()
    assert "#SBATCH --gpus-per-node=8\n#SBATCH --job-name" in gpu and "#SBATCH --ntasks-per-node=8" in gpu
    # srun itself asks for the ranks' CPUs: Slurm 22.05+ srun does not take them from sbatch's --cpus-per-task
    srun = next(line for line in gpu.splitlines() if line.startswith("srun "))
    assert "#SBATCH --cpus-per-task=12\n" in gpu and " --cpus-per-task=12 " in srun
    assert "#SBATCH --array=0-1%2" in (GOLDEN / "array_of_two.sh").read_text()
    site = (GOLDEN / "site_gres.sh").read_text()
    assert "#SBATCH --gres=gpu:2\n" in site and "#SBATCH --account=proj42\n" in site and "--gpus-per-node" not in site
    assert "#SBATCH --signal=USR1@90\n" in site and "#SBATCH --reservation=maint\n" in site
    assert "export NCCL_DEBUG=WARN\n" in site and " --mpi=pmix " in site and "| head -n 1)\"-ib\n" in site


def test_golden_container_lines_say_what_matters():
    """pyxis: srun's --container-* flags and the image's python; apptainer: the rank's command behind
    `apptainer exec --nv`. The submit folder (code, run folders, checkpoints, logs) is mounted beside the user's."""
    for entry in ("sbatch", "srun"):
        pyxis, apptainer = ((GOLDEN / f"{r}_{entry}.sh").read_text() for r in IMAGES)
        srun = next(line for line in pyxis.splitlines() if line.startswith("srun "))
        assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in srun
        assert "--container-mounts=/scratch/data:/data,/golden:/golden" in srun
        assert "--container-workdir=/golden" in srun and re.search(r" python (-u )?-m ", srun) and "<PYTHON>" not in srun
        srun = next(line for line in apptainer.splitlines() if line.startswith("srun "))
        binds = "--bind /scratch/data:/data,/golden:/golden --pwd /golden"
        assert f"apptainer exec --nv {binds} /images/pytorch.sif python" in srun
        assert "--container" not in srun and "<PYTHON>" not in srun


def test_an_eval_jobs_sbatch_line_matches_golden(tmp_path, monkeypatch):
    """eval.after_save=job: the one-task CPU job each checkpoint gets, on the training job's partition, account and
    qos, with no dependency (the checkpoint is complete, the training job still runs), submitted once per
    checkpoint whatever saves it again; a refused submission is recorded and training goes on."""
    from gpt.config.evaluation import EvalConfig
    from launch.backends.slurm import commands, eval_job

    run_dir = tmp_path / "runs" / "tiny-ddp"
    run_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    submitted = []
    monkeypatch.setattr(commands, "run", lambda *cmd, **kw: submitted.append(cmd) or "4242;cluster\n")
    cfg = EvalConfig(tasks=["/data/tasks/order.jsonl"], limit=50, after_save="job")
    placement = {"SLURM_JOB_PARTITION": "cpu", "SLURM_JOB_ACCOUNT": "proj42", "SLURM_JOB_QOS": ""}
    assert eval_job.submit_eval_job(run_dir, 200, cfg, placement) == "4242"
    assert eval_job.submit_eval_job(run_dir, 200, cfg, placement) is None  # a requeue saving it again
    line = shlex.join(submitted[0]).replace(str(tmp_path), str(WORK))
    check_golden("eval_job", normalise(line, LOGS).replace(shlex.quote(sys.executable), "<PYTHON>") + "\n")
    assert len(submitted) == 1 and not any(a.startswith("--dependency") for a in submitted[0])
    assert json.loads((run_dir / "eval-jobs" / "step200.json").read_text()) == {"step": 200, "job_id": "4242"}

    def refused(*cmd, **kw):
        raise commands.SlurmUnavailable("sbatch: error: QOSMaxSubmitJobPerUserLimit")
    monkeypatch.setattr(commands, "run", refused)
    assert eval_job.submit_eval_job(run_dir, 400, cfg, placement) is None
    assert "QOSMaxSubmitJobPerUserLimit" in json.loads((run_dir / "eval-jobs" / "step400.json").read_text())["error"]
