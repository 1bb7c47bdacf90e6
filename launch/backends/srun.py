"""cluster=srun: already inside an allocation (slurm/multi_node.sh, salloc). This host plans the run, then
`srun` starts on every node the task wrapper of cluster=slurm (launch.backends.slurm.task, which runs
`python -m launch.rank.worker RUN_DIR`): one task per GPU on GPU nodes, or --ntasks-per-node ranks per node on CPU
nodes."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from launch import launch_config
from launch.launch_config import LaunchConfig
from gpt.errors import EXIT_PREEMPTED, ConfigError, UserError
from gpt.resilience.preemption import configured_signals
from gpt.run_folder import AttemptLine, Next, RunFolder
from launch.backends import Backend, RunFailed, RunStopped
from launch.backends.slurm import allocation, commands
from launch.backends.slurm.job import first_int, gpus_on_node
from launch.backends.slurm.resources import SPARE_SRUN_ARGS, SRUN_ARGS
from launch.backends.slurm.spare_exit import LINGER_S, Linger
from launch.backends.slurm.start_preempted import after_failed_step
from launch.backends.slurm.step import RankStep, ignoring, workdir
from launch.run.attempts import requeued
from launch.run.job_record import cancelled_by_user
from launch.recovery.rounds import Rounds, finished_on_spares
from launch.recovery.shrink import survives_lost_node
from launch.rank.job_env import LAUNCH_VAR, ROUND_VAR, JobEnvironment, job_environment, new_launch
from launch.rank.signal_relay import SignalRelay
from launch.rank.threads import ThreadPlan
from launch.run.startup import STEP_TOKEN


def resolve_allocation(run: LaunchConfig, environ: dict[str, str] | None = None) -> LaunchConfig:
    """nodes and cluster.tasks_per_node from the allocation (for `auto`), checked against it."""
    env = dict(os.environ if environ is None else environ)
    if "SLURM_JOB_ID" not in env:
        raise UserError("cluster=srun runs inside a Slurm allocation (sbatch slurm/multi_node.sh, or salloc), and "
                        "SLURM_JOB_ID is not set: submit from a login node with cluster=slurm, or use cluster=local")
    if shutil.which("srun") is None:
        raise UserError("cluster=srun needs srun on PATH inside the job, and it is not there")
    spares = run.cluster.spare_nodes
    nodes = (first_int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1) - spares  # the ranks' nodes, less the spares
    if nodes < 1:
        raise ConfigError("cluster.spare_nodes", spares, f"fewer than this allocation's {nodes + spares} node(s)")
    tasks = first_int(env, "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if tasks is None:
        ntasks = first_int(env, "SLURM_NTASKS")
        tasks = max(1, ntasks // (nodes + spares)) if ntasks else 1
    gpus = gpus_on_node(env)
    for key, want, have in (("nodes", run.nodes, nodes), ("cluster.tasks_per_node", run.cluster.tasks_per_node, tasks)):
        if want not in ("auto", have):
            less = f" less cluster.spare_nodes={spares}" if spares and key == "nodes" else ""
            raise ConfigError(key, want, f"auto or {have}, what this allocation has{less} "
                              f"(sbatch --{'nodes' if key == 'nodes' else 'ntasks-per-node'}={want} to get it)")
    if gpus and tasks != gpus:
        why = (f"this allocation has {gpus} GPU(s) per node but {tasks} task(s) per node: one rank per GPU needs "
               f"sbatch --ntasks-per-node={gpus}")
        if "SLURM_GPUS_PER_NODE" in env:  # asked for; --exclusive (or --gres) may hand a job its nodes' GPUs unasked
            raise UserError(why)
        print(f"warning: {why}", file=sys.stderr, flush=True)
    return run.with_cluster(nodes=nodes, tasks_per_node=tasks)


# a batch script's own warning: `#SBATCH --signal=[R:][B:]SIG@SECONDS` (Lightning's habit: --signal=USR1@90)
SIGNAL_LINE = re.compile(r"^#SBATCH\s+--signal[=\s]+(?:[RB]:)*(?:SIG)?(\w+)(?:@(\d+))?", re.MULTILINE)


def job_signal(job_id: str) -> tuple[str, int | None] | None:
    """The --signal the job's own batch script asks Slurm for (scontrol keeps the script), or None."""
    try:
        script = commands.run("scontrol", "write", "batch_script", job_id, "-")
    except commands.SlurmUnavailable:
        return None
    found = SIGNAL_LINE.findall(script)
    if not found:
        return None
    name, seconds = found[-1]  # sbatch takes the last one
    return name.upper(), int(seconds) if seconds else None


def with_job_signal(run: LaunchConfig, job_id: str) -> LaunchConfig:
    """The ranks save on the warning the user's own sbatch script asks for, and allow for its lead."""
    found = job_signal(job_id)
    if found is None:
        return run
    name, seconds = found
    if f"SIG{name}" not in run.preemption.signals:
        print(f"note: the job's sbatch script sends SIG{name} before its time limit (--signal): the ranks save on "
              f"it too (preemption.signals+=[SIG{name}])", file=sys.stderr, flush=True)
        signals = (*run.preemption.signals, f"SIG{name}")
        run = dataclasses.replace(run, preemption=dataclasses.replace(run.preemption, signals=signals))
    if seconds is not None and run.cluster.signal_delay_s is None:
        run = run.with_cluster(signal_delay_s=seconds)
    return run


def srun_command(nodes: int, tasks_per_node: int, cpus: str | None, step: RankStep, signals: list[signal.Signals],
                 run_dir: Path, here: Path, python: str = sys.executable, spares: int = 0,
                 setup: tuple[str, ...] = (), exact: bool = False, no_kill: bool = False) -> list[str]:
    """The srun line that starts every rank: one task wrapper each, in the site's container if it has one; and one
    on each spare node (it waits until it replaces a lost node, launch.recovery.rounds). The site's setup lines run
    first, in the shell that then becomes srun, as cluster=slurm's batch script runs them before its srun. `exact`:
    a step of a packed allocation (hydra.launcher.pack), on its own CPUs beside the other points' steps. `no_kill`: a
    lost node's tasks end neither the step nor the others (spares, or preemption.shrink=auto: the nodes left go on)."""
    nodes += spares
    # srun takes the environment the setup lines leave (module load, a venv); exec keeps srun the signalled child
    shell = ["bash", "-c", "\n".join([*setup, 'exec "$@"']), "setup"] if setup else []
    cmd = [*shell, "srun", *(["--exact"] if exact else []), f"--nodes={nodes}", f"--ntasks={nodes * tasks_per_node}",
           f"--ntasks-per-node={tasks_per_node}", *(SPARE_SRUN_ARGS if spares or no_kill else SRUN_ARGS)]
    if cpus:  # Slurm 22.05+: srun no longer inherits --cpus-per-task from sbatch
        cmd.append(f"--cpus-per-task={cpus}")
    # Each task is the rank's wrapper, as under cluster=slurm: it starts the rank and sees how it ends (a rank
    # killed while its host lives requeues the job). It starts with the preemption signals ignored, as the rank
    # does; signals that come meanwhile wait here until every rank is up.
    task = [*step.command(python, here), "-m", "launch.backends.slurm.task", str(run_dir)]
    return [*cmd, *step.srun_flags(here), *ignoring(signals), *task]


def configured_step(config_file: Path) -> RankStep:
    """The run's srun flags, environment and container."""
    return RankStep.from_cluster(launch_config.load(config_file).cluster)


def step_spares(config_file: Path) -> tuple[int, bool]:
    """The spare nodes, and whether a lost node leaves the step running (launch.recovery.shrink)."""
    run = launch_config.load(config_file)
    return run.cluster.spare_nodes, survives_lost_node(run)


def step_setup(config_file: Path) -> tuple[str, ...]:
    return launch_config.load(config_file).cluster.setup_lines


def run_srun(run_dir: Path, nodes: int, tasks_per_node: int) -> JobEnvironment:
    """Start every rank with srun and wait; a rank that fails ends the step (--kill-on-bad-exit). The job
    environment the ranks ran in (this launch's id)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    threads = ThreadPlan.decide(ranks_on_host=tasks_per_node, cpus_per_task=int(cpus) if cpus else None)
    folder = RunFolder(run_dir)
    here = workdir()
    step = configured_step(folder.config).mounting(here, run_dir)
    first_host = commands.hostnames(os.environ["SLURM_JOB_NODELIST"])[0] if step.master_host_suffix else ""
    env = {**os.environ, **threads.env(), **step.environ(first_host)}
    signals = configured_signals(folder.config)
    env[STEP_TOKEN] = token = uuid.uuid4().hex
    env[LAUNCH_VAR] = launch = new_launch()  # launches sharing the allocation (salloc) share no attempt or round
    spares, no_kill = step_spares(folder.config)
    child = subprocess.Popen(srun_command(nodes, tasks_per_node, cpus, step, signals, run_dir, here, spares=spares,
                                          setup=step_setup(folder.config), no_kill=no_kill), env=env)
    relay = SignalRelay([*signals, signal.SIGINT])
    outlived = Linger(run_dir, job_environment().job_id).over if no_kill else lambda: False
    try:  # srun passes each signal on to every task
        code = relay.wait(child, lambda _signum: ranks_up(folder, nodes * tasks_per_node, token), stop=outlived)
    finally:
        relay.restore()
    logs = f"rank logs: {folder.logs}/rank*.log"
    ranks_job = newest_round(run_dir, launch)
    if cancelled_by_user(run_dir, ranks_job.job_id):  # the ranks saved and stopped; the launcher says so
        return ranks_job
    if requeued(run_dir, ranks_job):  # Slurm's requeue stops the batch step as well (SIGTERM): the launcher says so
        return ranks_job
    stop = _attempt_line(folder, launch) if code != 0 else None  # srun's code: the first task's, or its kill's
    if stop is not None and stop.ended.startswith("preempted") and stop.next is Next.STOP:
        # saved, and nothing runs it again (the site's policy, the restart limit): stopped, said once
        print(f"job {ranks_job.job_id} {stop.ended}: {stop.note}", file=sys.stderr, flush=True)
        raise RunStopped(run_dir)
    if code == EXIT_PREEMPTED:
        raise SrunFailed(f"the ranks stopped after a preemption signal and saved a checkpoint, but the job was not "
                         f"requeued (see {folder.attempts.log}); submit the same command to resume")
    if code != 0 and signal.SIGTERM in relay.received:
        raise SrunFailed(f"the job was stopped (SIGTERM: scancel, preemption or the time limit) and srun with it "
                         f"(exit code {code}); {logs}")
    if code != 0 and (preempted := after_failed_step(run_dir, ranks_job)) is not None:  # while the tasks started
        if preempted.runs_again:
            return ranks_job
        raise SrunFailed(f"srun exited with code {code}: {preempted.note}")
    if code != 0 and finished_on_spares(run_dir, job_environment().job_id):
        print(f"srun exited with code {code}: the tasks of the node a spare replaced were killed with it, or were "
              f"not heard from {LINGER_S:.0f} s after the run finished; the run finished", file=sys.stderr, flush=True)
        return ranks_job
    if code != 0:
        why = _attempt_end(folder, launch) or _first_rank_error(folder, nodes * tasks_per_node)
        raise SrunFailed(f"srun exited with code {code}: {why}; {logs}")
    return ranks_job


def newest_round(run_dir: Path, launch: str) -> JobEnvironment:
    """The job environment of this launch's newest round: after in-job restarts (launch.recovery.rounds) its line,
    not the first round's, says whether the job requeued itself (this process never runs a round, so its own
    environment names none)."""
    job = job_environment({**os.environ, LAUNCH_VAR: launch})
    k = Rounds.of(run_dir, job).newest()
    return type(job)({**job.environ, ROUND_VAR: str(k)}) if k else job


def _attempt_end(folder: RunFolder, launch: str) -> str | None:
    """How this attempt ended as its line records it (a rank lost, and why the job was not requeued): truer than
    the first error in the rank logs, which is often a survivor's failed collective."""
    line = _attempt_line(folder, launch)
    return f"{line.ended}; {line.note}" if line and line.note else None


def _attempt_line(folder: RunFolder, launch: str) -> AttemptLine | None:
    """This attempt's line; after in-job restarts (launch.recovery.rounds), the newest round's."""
    job = job_environment()
    lines = [a for a in folder.attempts.read() if (a.job_id, a.restart, a.launch) == (job.job_id, job.restart, launch)]
    return lines[-1] if lines else None


def ranks_up(folder: RunFolder, world: int, token: str) -> bool:
    """Every rank of this step has its signal handlers: it writes its environment record after that, with the
    step's token (not a file time: the file server's clock is not this host's)."""
    for rank in range(world):
        try:
            if json.loads(folder.environment_record(rank).read_text()).get("step") != token:
                return False
        except (OSError, ValueError):
            return False
    return True


def _first_rank_error(folder: RunFolder, world: int) -> str:
    from launch.backends.slurm.task import last_error

    for rank in range(world):
        error = last_error(folder.log(rank))
        if error:
            return error if error.startswith(f"rank {rank} ") else f"rank {rank}: {error}"
    return "a rank failed (srun names it above)"


class SrunFailed(RunFailed):
    """The ranks ran and one failed (not a configuration error)."""


class SrunBackend(Backend):
    name = "srun"

    def check(self, run):
        run = resolve_allocation(run)
        if (differs := allocation.warning(run.cluster, dict(os.environ))) is not None:
            print(differs, file=sys.stderr, flush=True)
        return with_job_signal(run, os.environ["SLURM_JOB_ID"]), None

    def device(self, run):
        return "cuda" if gpus_on_node(dict(os.environ)) else "cpu"

    def run(self, plan) -> JobEnvironment:
        return run_srun(plan.run_dir, plan.nodes, plan.tasks_per_node)
