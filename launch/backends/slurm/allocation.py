"""A site profile inside an allocation (cluster=srun: slurm/multi_node.sh, salloc): sbatch or salloc has already
asked Slurm for the job, so the profile's allocation keys (launch.backends.cluster_config.ALLOCATION) cannot change
it. Those Slurm shows the job are compared with it, and a difference is one warning naming the flag that would have
asked for it; the rest (time_min, mem, constraint, sbatch, requeue, signal, max_num_timeout) are the script's. Refusing
them here would come too late: the job has already queued and started. Torch-free."""
from __future__ import annotations

from launch.backends.cluster_config import ClusterConfig
from launch.backends.slurm.job import gpus_on_node

# cluster key -> (the variable Slurm sets in the job, the sbatch flag that asks for it)
SHOWN = {"partition": ("SLURM_JOB_PARTITION", "--partition"), "account": ("SLURM_JOB_ACCOUNT", "--account"),
         "qos": ("SLURM_JOB_QOS", "--qos"), "reservation": ("SLURM_JOB_RESERVATION", "--reservation"),
         "cpus_per_task": ("SLURM_CPUS_PER_TASK", "--cpus-per-task")}


def differences(cluster: ClusterConfig, env: dict[str, str]) -> list[str]:
    """Where the allocation differs from what `cluster` asks for, one phrase each (empty: it agrees, or Slurm does
    not say)."""
    found = []
    for key, (variable, flag) in SHOWN.items():
        want = getattr(cluster, key)
        if want in (None, "auto") or variable not in env or env[variable] == str(want):
            continue
        found.append(f"cluster.{key}={want} (this job's: {env[variable]}; sbatch {flag}={want})")
    form = next((k for k in ("gpus_per_node", "gpus_per_task", "gres") if getattr(cluster, k)), None)
    # on a node of the job only: salloc's shell runs where the allocation has none of its GPUs
    shown = "SLURM_GPUS_ON_NODE" in env or "SLURM_STEP_GPUS" in env
    if form is not None and shown and cluster.node_gpus and gpus_on_node(env) != cluster.node_gpus:
        flag = f"--{form.replace('_', '-')}={getattr(cluster, form)}"
        found.append(f"cluster.{form}={getattr(cluster, form)} (this job's: {gpus_on_node(env)} GPU(s) per node; "
                     f"sbatch {flag})")
    return found


def warning(cluster: ClusterConfig, env: dict[str, str]) -> str | None:
    found = differences(cluster, env)
    if not found:
        return None
    return ("warning: this allocation is not what the config asks sbatch for, and inside it only sbatch's or "
            f"salloc's own flags count: {'; '.join(found)}")
