"""cluster=srun: already inside an allocation (slurm/multi_node.sh, salloc). This host plans the run, then
`srun` starts on every node the task wrapper of cluster=slurm (launch.backends.slurm.task, which runs
`python -m launch.worker RUN_DIR`): one task per GPU on GPU nodes, or --ntasks-per-node ranks per node on CPU
nodes."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, open_dict

from gpt.errors import EXIT_PREEMPTED, ConfigError, UserError
from launch.backends import Backend, RunFailed
from launch.threads import ThreadPlan


def _int(env: dict[str, str], *keys: str) -> int | None:
    for key in keys:
        value = env.get(key, "")
        head = value.split("(")[0].split(",")[0]  # SLURM_TASKS_PER_NODE looks like "2(x3),1"
        if head.isdigit():
            return int(head)
    return None


def gpus_on_node(env: dict[str, str]) -> int:
    """GPUs Slurm gave this node of the job (0 on CPU nodes)."""
    gpus = _int(env, "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")
    if gpus is not None:
        return gpus
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    return len([d for d in visible.split(",") if d.strip()]) if visible and visible != "NoDevFiles" else 0


def resolve_allocation(cfg: DictConfig, environ: dict[str, str] | None = None) -> DictConfig:
    """cluster.nodes and cluster.tasks_per_node from the allocation (for `auto`), checked against it."""
    env = dict(os.environ if environ is None else environ)
    if "SLURM_JOB_ID" not in env:
        raise UserError("cluster=srun runs inside a Slurm allocation (sbatch slurm/multi_node.sh, or salloc), and "
                        "SLURM_JOB_ID is not set: submit from a login node with cluster=slurm, or use cluster=local")
    if shutil.which("srun") is None:
        raise UserError("cluster=srun needs srun on PATH inside the job, and it is not there")
    nodes = _int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1
    tasks = _int(env, "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if tasks is None:
        ntasks = _int(env, "SLURM_NTASKS")
        tasks = max(1, ntasks // nodes) if ntasks else 1
    gpus = gpus_on_node(env)
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, have in (("nodes", nodes), ("tasks_per_node", tasks)):
            want = cfg.cluster.get(key, "auto")
            if want in ("auto", None):
                cfg.cluster[key] = have
            elif want != have:
                raise ConfigError(f"cluster.{key}", want, f"auto or {have}, what this allocation has "
                                  f"(sbatch --{'nodes' if key == 'nodes' else 'ntasks-per-node'}={want} to get it)")
    if gpus and cfg.cluster.tasks_per_node != gpus:
        raise UserError(f"this allocation has {gpus} GPU(s) per node but {cfg.cluster.tasks_per_node} task(s) per "
                        f"node: one rank per GPU needs sbatch --ntasks-per-node={gpus}")
    return cfg


def run_srun(run_dir: Path, nodes: int, tasks_per_node: int) -> None:
    """Start every rank with srun and wait; a rank that fails ends the step (--kill-on-bad-exit)."""
    cmd = ["srun", f"--nodes={nodes}", f"--ntasks={nodes * tasks_per_node}", f"--ntasks-per-node={tasks_per_node}",
           "--kill-on-bad-exit=1"]
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:  # Slurm 22.05+: srun no longer inherits --cpus-per-task from sbatch
        cmd.append(f"--cpus-per-task={cpus}")
    threads = ThreadPlan.decide(ranks_on_host=tasks_per_node, cpus_per_task=int(cpus) if cpus else None)
    env = {**os.environ, **threads.env()}
    # Every rank starts with the preemption signals ignored (its start-up must not die of one) and handles them
    # once its flag is in place; signals that come meanwhile wait here until every rank is up.
    shim = ["bash", "-c", 'trap "" USR2 TERM; exec "$0" "$@"']
    started = time.time()
    # Each task is the rank's wrapper, as under cluster=slurm: it starts the rank and sees how it ends (a rank
    # killed while its host lives requeues the job).
    task = [sys.executable, "-m", "launch.backends.slurm.task", str(run_dir)]
    child = subprocess.Popen([*cmd, *shim, *task], env=env)
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum))
                for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    try:
        code, passed = None, 0
        while code is None:
            try:
                code = child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if code is None and passed < len(received) and ranks_up(run_dir, nodes * tasks_per_node, started):
                for signum in received[passed:]:
                    child.send_signal(signum)  # srun passes it on to every rank
                passed = len(received)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code == EXIT_PREEMPTED:
        raise SrunFailed(f"the ranks stopped after a preemption signal and saved a checkpoint, but the job was not "
                         f"requeued (see {run_dir / 'attempts.jsonl'}); submit the same command to resume")
    if code != 0 and signal.SIGTERM in received:
        raise SrunFailed(f"the job was stopped (SIGTERM: scancel, preemption or the time limit) and srun with it "
                         f"(exit code {code}); rank logs: {run_dir / 'logs'}/rank*.log")
    if code != 0:
        raise SrunFailed(f"srun exited with code {code}: {_first_rank_error(run_dir, nodes * tasks_per_node)}; "
                         f"rank logs: {run_dir / 'logs'}/rank*.log")


def ranks_up(run_dir: Path, world: int, since: float) -> bool:
    """Every rank of this attempt has its signal handlers (it writes its environment record after that)."""
    records = [run_dir / "environment" / f"rank{r}.json" for r in range(world)]
    return all(f.exists() and f.stat().st_mtime >= since for f in records)


def _first_rank_error(run_dir: Path, world: int) -> str:
    from launch.backends.slurm.task import last_error

    for rank in range(world):
        error = last_error(run_dir / "logs" / f"rank{rank}.log")
        if error:
            return error if error.startswith(f"rank {rank} ") else f"rank {rank}: {error}"
    return "a rank failed (srun names it above)"


class SrunFailed(RunFailed):
    """The ranks ran and one failed (not a configuration error)."""


class SrunBackend(Backend):
    name = "srun"

    def check(self, cfg):
        return resolve_allocation(cfg), None

    def run(self, plan) -> None:
        run_srun(plan.run_dir, plan.nodes, plan.tasks_per_node)

    def job_running(self, job_id: str) -> bool | None:
        from launch.backends.slurm.job import SlurmJob

        return SlurmJob({}).job_running(job_id)
