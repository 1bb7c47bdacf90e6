"""The one task of a packed allocation (hydra.launcher.pack): each point runs as its own `srun --exact` step, with its
own CPUs, GPUs and memory on nodes named for it (--nodelist: a point of K nodes on K nodes of its own), through the
task wrapper every Slurm path runs (launch.backends.slurm.task), `per_group` at once on each group of nodes, the
next one starting as one ends.

It runs in the batch step (launch.backends.slurm.pack), where Slurm's preemption signal and launch.cancel's do not
reach it: they reach every point's step, whose rank saves and leaves the requeue to this task (job.PACKED_VAR). A
point that comes back so, one whose rank lost a rank or hung (its decision, a requeue, is the allocation's) or was
stopped by a preemption the site does not requeue, or one whose step failed as a preemption came before its rank
recorded the attempt (killed as it started), stops new points from starting, as does a signal to this task (the
requeue's). Once every running point has ended, the recovery wing decides for the whole allocation
(launch.recovery.packed) and this task carries it out: a requeue (which ends every step of the allocation; the
requeued allocation skips the finished points, resumes the saved ones and runs the ones not started), or none (the
user's cancel, a preemption that cancels, a requeue refused), which its result says for each point not finished.
Kept free of heavy imports: it is unpickled before anything else runs.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from launch import launch_config
from gpt.resilience.preemption import configured_signals
from gpt.resilience.timing import RELAY_POLL_S, REQUEUE_WAIT_S
from gpt.run_folder import Next, RunFolder
from launch.backends.slurm import commands
from launch.backends.slurm.job import PACKED_VAR, SlurmJob
from launch.backends.slurm.partitions import mem_mb
from launch.backends.slurm.placement import point_port
from launch.backends.slurm.resources import SlurmResources
from launch.backends.srun import srun_command
from launch.backends.slurm.step import RankStep, workdir
from launch.rank.signal_relay import SignalRelay
from launch.rank.threads import ThreadPlan
from launch.run.attempts import this_attempts_line
from launch.run.identity import newest_step, stopped_early

if TYPE_CHECKING:
    from launch.recovery.decision import Outcome


def finished(run_dir: Path) -> bool:
    """At train.max_steps, or stopped at a rung of the sweep's early stopping."""
    step, run = newest_step(run_dir), launch_config.load(RunFolder(run_dir).config)
    return step is not None and (step >= run.train.max_steps or stopped_early(run_dir, run) is not None)


# What the allocation asked for, which srun reads as its own flags: a step would ask for every slot's GPUs and memory
# (measured on Slurm 22.05: SLURM_GPUS_PER_NODE outweighs a step's --gpus-per-task; --gres=gpu:1 alone works). The
# allocation's --gpu-bind (the points' own cluster.sbatch.gpu-bind) stays: each step binds as the point asked.
ALLOCATION_REQUEST = ("SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS_PER_SOCKET",
                      "SLURM_CPUS_PER_GPU", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_MEM_PER_GPU",
                      "SLURM_TRES_PER_TASK")


def own_share(res: SlurmResources, share_mb: int | None = None) -> list[str]:
    """The point's GPUs and memory as flags of its step, in the form its own job would ask for them (each step gets
    GPUs of its own: Slurm sets its tasks' CUDA_VISIBLE_DEVICES to them); a point that sets no memory gets
    `share_mb`, its slot's share of the allocation's."""
    gres = res.gres or dict(res.sbatch).get("gres")
    flags = ([f"--gpus-per-node={res.gpus_per_node}"] if res.gpus_per_node else
             [f"--gpus-per-task={res.gpus_per_task}"] if res.gpus_per_task else [f"--gres={gres}"] if gres else [])
    mem = res.mem or (f"{share_mb}M" if share_mb else None)
    return [*flags, *([f"--mem={mem}"] if mem else [])]


def slot_mem_mb(env: dict[str, str], slots: int) -> int | None:
    """Each of a node's `slots` share of its memory (None where Slurm gives it none). Measured on Slurm 22.05 with
    CR_Core_Memory: a step without --mem is given the allocation's whole memory as its limit (one point could take
    its neighbours'), and one that asks for the allocation's (an inherited SLURM_MEM_PER_NODE) waits for the step
    before it to end."""
    nodes = int(env.get("SLURM_JOB_NUM_NODES", "1") or 1)
    total = env_mem_mb(env) or allocated_mem_mb(env.get("SLURM_JOB_ID")) // nodes
    return total // slots or None


def env_mem_mb(env: dict[str, str]) -> int:
    """The allocation's memory as Slurm tells the batch step: --mem or DefMemPerNode, or per CPU times its CPUs."""
    per_node, per_cpu, cpus = (env.get(k, "") for k in ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU",
                                                        "SLURM_CPUS_ON_NODE"))
    if per_node.isdigit():
        return int(per_node)
    return int(per_cpu) * int(cpus) if per_cpu.isdigit() and cpus.isdigit() else 0


def allocated_mem_mb(job_id: str | None) -> int:
    """The memory scontrol says the job holds (its TRES): the node's whole memory where the allocation asked for
    none and the site sets no default, which no variable tells; 0 where it cannot be asked."""
    try:
        info = commands.scontrol_job(job_id) if job_id else None
    except commands.SlurmUnavailable:
        return 0
    tres = dict(f.split("=", 1) for f in str(info.get("TRES") or "").split(",") if "=" in f) if info else {}
    return mem_mb(tres.get("mem"))


def step_command(run_dir: Path, hosts: list[str], share_mb: int | None = None,
                 point: int = 0) -> tuple[list[str], dict[str, str]]:
    """The point's srun line and environment on `hosts` (nodes of the allocation named for it): its own tasks, CPUs,
    GPUs and memory (`share_mb` where it sets none), its site flags, its threads, and its own rendezvous port (`point`:
    its index in the allocation)."""
    run = launch_config.load(RunFolder(run_dir).config)
    here, c = workdir(), run.cluster
    step = RankStep.from_cluster(c).mounting(here, run_dir)
    share = own_share(SlurmResources.from_run(run), share_mb)
    step = dataclasses.replace(step, srun_args=(*share, f"--nodelist={','.join(hosts)}", *step.srun_args))
    cpus = c.cpus_per_task if isinstance(c.cpus_per_task, int) else 1
    # the points are no submitit tasks, and ask for their own share of the allocation
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBMITIT_") and k not in ALLOCATION_REQUEST}
    env.update({**ThreadPlan.decide(ranks_on_host=c.tasks_per_node, cpus_per_task=cpus).env(),
                **step.environ(hosts[0]), PACKED_VAR: "1"})
    env["MASTER_PORT"] = str(point_port(env, point))
    cmd = srun_command(len(hosts), c.tasks_per_node, str(cpus), step, configured_signals(RunFolder(run_dir).config),
                       run_dir, here, setup=c.setup_lines, exact=True)
    return cmd, env


def outcome(run_dir: Path, code: int, hosts: list[str] | None = None) -> dict:
    """What the launcher's waiter reads for the point: rank 0's result (with the summary) on the first of its
    `hosts`, and its other hosts, or one error line."""
    folder = RunFolder(run_dir)
    first, *others = hosts or [socket.gethostname()]
    if code == 0 and (summary := folder.read_summary()) is not None:
        return {"results": [{"rank": 0, "host": first, "summary": summary}, *({"host": h} for h in others)]}
    from launch.backends.slurm.task import last_error

    error = last_error(folder.log(0)) or f"its step exited with code {code}"
    return {"error": f"{error} (its log: {folder.log(0)})"}


def node_groups(nodes_each: int, per_group: int) -> list[list[str]]:
    """The allocation's nodes in groups of a point's `nodes_each`, each group once per point it holds at once."""
    hosts = commands.hostnames(os.environ["SLURM_JOB_NODELIST"])
    groups = [hosts[i:i + nodes_each] for i in range(0, len(hosts) - nodes_each + 1, nodes_each)]
    return [g for _ in range(per_group) for g in groups]  # the groups in turn: points spread over the nodes


@dataclass(frozen=True)
class PackTask:
    run_dirs: tuple[str, ...]
    per_group: int
    nodes_each: int = 1

    def __call__(self) -> dict[str, dict]:
        dirs = [Path(d) for d in self.run_dirs]
        results = {str(d): outcome(d, 0) for d in dirs if finished(d)}  # in an earlier attempt of this job
        waiting = [d for d in dirs if str(d) not in results]
        relay = SignalRelay(configured_signals(RunFolder(dirs[0]).config))  # instead of submitit's own handlers
        free = node_groups(self.nodes_each, self.per_group)
        running: dict[Path, tuple[subprocess.Popen, list[str]]] = {}
        unfinished = False
        share_mb = slot_mem_mb(dict(os.environ), self.per_group)
        while waiting or running:
            while waiting and free and not relay.received and not unfinished:
                d, hosts = waiting.pop(0), free.pop(0)
                cmd, env = step_command(d, hosts, share_mb, point=dirs.index(d))
                print(f"point {d.name} on {','.join(hosts)}: {' '.join(cmd[-2:])}", flush=True)
                running[d] = subprocess.Popen(cmd, env=env), hosts
            if (relay.received or unfinished) and not running:
                break
            time.sleep(RELAY_POLL_S)
            for d, (child, hosts) in list(running.items()):
                if (code := child.poll()) is not None:
                    del running[d]
                    free.append(hosts)
                    stopped = not finished(d) and (code == 0 or ended_for_the_allocation(d)
                                                   or preempted_as_it_started(d))
                    unfinished |= stopped  # saved, lost a rank or hung, or never started: the allocation decides
                    if not stopped:
                        results[str(d)] = outcome(d, code, hosts)
        if relay.received or unfinished:
            decided = ended_early(dirs)
            if decided is not None and decided.next is Next.STOP:  # the same command runs them: none failed
                results.update({str(d): {"stopped": decided.note} for d in dirs if str(d) not in results})
        return results


def allocation_job() -> SlurmJob:
    """The allocation's job, as the packer sees it (a point's rank leaves the requeue to it)."""
    return SlurmJob({k: v for k, v in os.environ.items() if k != PACKED_VAR})


def ended_for_the_allocation(run_dir: Path) -> bool:
    """The point's rank recorded an end its allocation shares, by recovery's decision: a requeue (a lost rank, a
    hang; a packed point's requeue is its allocation's), or Slurm's preemption that the site's policy does not
    requeue (the allocation ends too). Its step failed, as a rank's does that Slurm did not stop; it is not a failed
    point."""
    line = this_attempts_line(run_dir, allocation_job())
    return line is not None and (line.next is Next.REQUEUE or line.ended.startswith("preempted"))


def preempted_as_it_started(run_dir: Path) -> bool:
    """The point's step failed while Slurm preempts the allocation, and its rank recorded no attempt: it was killed
    as it started (a site's task prolog, the shell before its trap), as launch.backends.slurm.start_preempted finds
    for a job of its own. It runs again in the requeued allocation."""
    job = allocation_job()
    return job.preemption() is not None and this_attempts_line(run_dir, job) is None


def ended_early(run_dirs: list[Path]) -> Outcome | None:
    """Every running point has saved: recovery's one decision for the allocation, carried out (the requeue is asked
    for as it decides); None where the batch step decided (this task was killed as it started, and ran again)."""
    from launch.recovery.packed import recover_allocation

    outcome = recover_allocation(run_dirs, allocation_job())
    if outcome is None:
        return None
    print(f"packed job: {outcome.note}", file=sys.stderr, flush=True)
    if outcome.next is Next.REQUEUE:
        time.sleep(REQUEUE_WAIT_S)  # Slurm ends this attempt
    return outcome
