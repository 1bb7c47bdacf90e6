"""cluster=slurm: what a sweep point asks Slurm for, checked without a cluster, and the submitit executor (and
so the sbatch script) that asks for it.

Every task of a job (nodes x tasks_per_node, started by srun) runs launch.backends.slurm.task.RankTask, which runs the
same per-rank entry point as every other backend: `python -m launch.rank.worker RUN_DIR`.
"""
from __future__ import annotations

import dataclasses
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.backends.cluster_config import ClusterConfig, node_gpus
from launch.launch_config import LaunchConfig
from launch.recovery.shrink import survives_lost_node
from gpt.errors import ConfigError
from launch.backends.slurm.step import RankStep, ignoring
from launch.run.startup import ATTEMPT_START

# sbatch flags the launcher sets itself: cluster.sbatch must not set them behind its back (the budget, the checks
# against sinfo and the ranks' layout read the keys; None: submitit's own, which the job's logs and state need).
MANAGED = {
    "nodes": "nodes", "N": "nodes", "ntasks-per-node": "cluster.tasks_per_node", "ntasks": "cluster.tasks_per_node",
    "n": "cluster.tasks_per_node", "gpus-per-node": "cluster.gpus_per_node", "gpus": "cluster.gpus_per_node",
    "G": "cluster.gpus_per_node", "gpus-per-task": "cluster.gpus_per_task",
    "cpus-per-task": "cluster.cpus_per_task",
    "c": "cluster.cpus_per_task", "mem": "cluster.mem", "time": "cluster.time_min", "t": "cluster.time_min",
    "partition": "cluster.partition", "p": "cluster.partition", "account": "cluster.account",
    "A": "cluster.account", "qos": "cluster.qos", "q": "cluster.qos", "constraint": "cluster.constraint",
    "C": "cluster.constraint", "requeue": "cluster.requeue", "no-requeue": "cluster.requeue",
    "signal": "cluster.signal and cluster.signal_delay_s", "output": None,
    "o": None, "error": None, "e": None, "array": None,
    "open-mode": None, "job-name": "name", "J": "name", "wrap": None,
}
# srun kills every task of the step when one exits non-zero: a dead rank ends the job at once instead of
# leaving the others waiting in a collective.
SRUN_ARGS = ("--kill-on-bad-exit=1",)
# With spare nodes a failed node must end neither the allocation nor the step (srun counts its tasks as killed,
# a bad exit): the task wrappers restart the ranks on a spare (launch.recovery.rounds), and end by themselves.
SPARE_SRUN_ARGS = ("--kill-on-bad-exit=0", "--no-kill")


@dataclass(frozen=True)
class SlurmResources:
    """One job's request. Sweep points with equal resources share an executor (and a job array)."""

    nodes: int
    tasks_per_node: int = 1
    gpus_per_node: int = ClusterConfig.gpus_per_node
    gpus_per_task: int = ClusterConfig.gpus_per_task
    gres: str | None = None
    cpus_per_task: int | None = 1  # None: auto, a GPU rank's share of its node's CPUs (resolved against sinfo)
    time_min: int = ClusterConfig.time_min
    partition: str | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    sbatch: tuple[tuple[str, Any], ...] = ()
    setup: tuple[str, ...] = ()
    requeue: bool = ClusterConfig.requeue
    signal: str = ClusterConfig.signal
    signal_delay_s: int = 120  # --signal=USR2@N: the time-limit warning's lead, unless cluster.signal_delay_s says
    max_num_timeout: int = ClusterConfig.max_num_timeout
    restarts: int = 0  # how many times the job may requeue itself (preemption.max_restarts), for the budget
    step: RankStep = RankStep()  # the site's srun flags, environment and container
    chain: int = ClusterConfig.chain  # jobs one after another, each to its time limit (launch.backends.slurm.chain)
    spare_nodes: int = ClusterConfig.spare_nodes  # allocated on top of `nodes`, idle until one replaces a lost node
    no_kill: bool = False  # a lost node leaves the job running: spares, or preemption.shrink=auto

    @property
    def allocated_nodes(self) -> int:
        return self.nodes + self.spare_nodes

    @property
    def node_gpus(self) -> int:
        """GPUs each node gets, whichever of --gpus-per-node, --gpus-per-task or --gres asks for them."""
        gres = self.gres or dict(self.sbatch).get("gres")
        return node_gpus(self.gpus_per_node, self.gpus_per_task, self.tasks_per_node, gres)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def node_hours(self) -> float:
        return self.allocated_nodes * self.time_min * self.chain / 60

    @property
    def spare_node_hours(self) -> float:
        return self.spare_nodes * self.time_min * self.chain / 60

    @property
    def gpu_hours(self) -> float:
        return self.allocated_nodes * self.node_gpus * self.time_min * self.chain / 60

    def describe(self) -> str:
        gpus = f", {self.node_gpus} GPU(s)" if self.node_gpus else ""
        where = f" on {self.partition}" if self.partition else ""
        links = f" x a chain of {self.chain}" if self.chain > 1 else ""
        spares = f" + {self.spare_nodes} spare node(s)" if self.spare_nodes else ""
        return (f"{self.nodes} node(s){spares} x {self.tasks_per_node} task(s){gpus}, {self.time_min} min{links}"
                f"{where}")

    @classmethod
    def from_run(cls, run: LaunchConfig) -> SlurmResources:
        """What run.cluster asks Slurm for (its values checked with the section), with the checks that need the
        other sections too: the device, the checkpoint interval."""
        c = run.cluster
        res = cls(
            nodes=run.nodes, tasks_per_node=c.tasks_per_node, gpus_per_node=c.gpus_per_node,
            gpus_per_task=c.gpus_per_task, gres=c.gres,
            cpus_per_task=None if c.cpus_per_task == "auto" else c.cpus_per_task, time_min=c.time_min,
            partition=c.partition, mem=c.mem, account=c.account, qos=c.qos, constraint=c.constraint,
            reservation=c.reservation, sbatch=_extra_flags(c.sbatch), setup=c.setup_lines, requeue=c.requeue,
            signal=c.signal.upper().removeprefix("SIG"), step=RankStep.from_cluster(c),
            signal_delay_s=cls.signal_delay_s if c.signal_delay_s is None else c.signal_delay_s,
            max_num_timeout=c.max_num_timeout, chain=c.chain, spare_nodes=c.spare_nodes,
            no_kill=survives_lost_node(run),
            restarts=run.preemption.max_restarts if c.requeue and run.preemption.enabled else 0,
        )
        if run.train.device == "cuda" and not res.node_gpus:
            raise ConfigError("cluster.gpus_per_node", 0, "at least 1 with train.device=cuda (or "
                              "cluster.gpus_per_task, or cluster.gres=gpu:N)")
        if f"SIG{res.signal}" not in run.preemption.signals:
            raise ConfigError("cluster.signal", c.signal, f"one of preemption.signals={list(run.preemption.signals)}, "
                              f"or add it there (the ranks save on it): preemption.signals=[SIG{res.signal},SIGTERM]")
        if res.signal_delay_s >= res.time_min * 60:
            raise ConfigError("cluster.signal_delay_s", res.signal_delay_s,
                              f"shorter than the time limit cluster.time_min={res.time_min} min")
        interval = run.checkpoint.interval_minutes
        if interval not in (None, "auto") and res.time_min <= interval:
            raise ConfigError("cluster.time_min", res.time_min, f"longer than checkpoint.interval_minutes={interval}: "
                              "the job would reach its time limit before its first checkpoint")
        return res

    def srun_cpus(self) -> list[str]:
        """-c on the srun line itself: Slurm 22.05+ srun no longer takes --cpus-per-task from sbatch, and a GPU rank
        left with 1 CPU shares it with NCCL's proxy, data loading, the checkpoint writer and the watchdog."""
        return [f"--cpus-per-task={self.cpus_per_task}"] if self.cpus_per_task else []

    def mounting(self, *folders: Path) -> SlurmResources:
        """With these folders mounted in the container, if there is one."""
        return dataclasses.replace(self, step=self.step.mounting(*folders))

    def executor_parameters(self, job_name: str, workdir: Path, folder: Path) -> dict[str, Any]:
        """submitit.SlurmExecutor parameters (`folder`: submitit's); submitit turns them into the sbatch script."""
        extra: dict[str, Any] = {"requeue" if self.requeue else "no-requeue": True}
        if self.mem is not None:  # as written (submitit's own mem_gb would turn "64G" into a float)
            extra["mem"] = self.mem
        if self.reservation is not None:
            extra["reservation"] = self.reservation
        if self.signal != ClusterConfig.signal:  # submitit writes USR2 itself
            extra["signal"] = f"{self.signal}@{self.signal_delay_s}"
        # a failed node must not end the allocation: a spare takes its place, or the nodes left go on
        # (launch.recovery.rounds, launch.recovery.shrink)
        if self.no_kill:
            extra["no-kill"] = True
        extra.update(self.sbatch)
        if self.chain > 1:  # each link starts once the one before (same user, same job name) has ended, and after
            # any dependency of its own (the data preparation job's afterok): a comma means both
            extra["dependency"] = ",".join(d for d in (extra.get("dependency"), "singleton") if d)
        params: dict[str, Any] = {
            "job_name": job_name, "time": self.time_min, "nodes": self.allocated_nodes,
            "ntasks_per_node": self.tasks_per_node, "cpus_per_task": self.cpus_per_task,
            "signal_delay_s": self.signal_delay_s, "wckey": None,
            "srun_args": [*(SPARE_SRUN_ARGS if self.no_kill else SRUN_ARGS), *self.srun_cpus(),
                          *self.step.srun_flags(workdir)],
            "additional_parameters": extra,
            # when this attempt started (the start-up breakdown in attempts.jsonl); each task then sets its rank's
            # threads from its -c (launch.rank.threads)
            "setup": [f"export {ATTEMPT_START}=$(date +%s.%N)", *self.step.exports(), *self.setup],
        }
        if self.no_kill:  # srun may outlive a run finished on spares: a watcher ends it (disowned: its end is no
            # line in the job's log, "Killed ...")
            params["setup"].append(f"{batch_module('spare_exit', folder)} --watch $$ & spare_watch=$!; "
                                   "disown $spare_watch")
        params["teardown"] = self.teardown(folder)
        optional = {"gpus_per_node": self.gpus_per_node or None, "gpus_per_task": self.gpus_per_task or None,
                    "gres": self.gres, "partition": self.partition,
                    "account": self.account, "qos": self.qos, "constraint": self.constraint}
        params.update({k: v for k, v in optional.items() if v is not None})
        return params

    def teardown(self, folder: Path) -> list[str]:
        """The batch script's lines after srun: a failed step may be a preemption that came while the tasks started
        (launch.backends.slurm.start_preempted); with spare nodes (or preemption.shrink=auto), one whose run finished
        on spares (or on the nodes left) while srun counts a lost node's tasks (launch.backends.slurm.spare_exit)."""
        lines = ["code=$?"]
        if self.no_kill:
            lines += ["kill $spare_watch 2>/dev/null",
                      f"if [ $code -ne 0 ] && {batch_module('spare_exit', folder)}; then code=0; fi"]
        # the shell ignores a requeue's SIGTERM until the attempt's line is written
        return [*lines, f"if [ $code -ne 0 ]; then trap '' TERM; {batch_module('start_preempted', folder)}; fi",
                "exit $code"]


def batch_module(name: str, folder: Path) -> str:
    """The batch script's call of launch.backends.slurm.NAME with submitit's folder."""
    return f"{shlex.quote(sys.executable)} -m launch.backends.slurm.{name} {shlex.quote(str(folder))}"


def _extra_flags(value: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """cluster.sbatch as flags, none of them one the launcher sets itself."""
    flags = []
    for key, flag_value in value.items():
        flag = str(key).lstrip("-").replace("_", "-")
        if flag in MANAGED:
            owner = MANAGED[flag]
            valid = (f"set through {owner} instead (the launcher writes --{flag} itself: its checks, the budget "
                     "and the ranks' layout read that key)" if owner else
                     f"a flag the launcher does not set itself (it writes --{flag}: submitit's logs and the job's "
                     "state depend on it)")
            raise ConfigError(f"cluster.sbatch.{key}", flag_value, valid)
        if flag_value is None or flag_value is False:
            continue
        flags.append((flag, flag_value))
    return tuple(sorted(flags))


def rank_python(resources: SlurmResources, workdir: Path, python: str | None = None) -> str:
    """The interpreter every task starts (submitit's `python`): this one, or the container's through its runtime,
    with Slurm's stop signals (a preemption's SIGTERM, the time-limit warning) ignored until submitit's handlers and
    then the task wrapper's are in place."""
    command = resources.step.command(python or sys.executable, workdir)
    stops = dict.fromkeys([signal.SIGTERM, signal.Signals[f"SIG{resources.signal}"]])
    return shlex.join([*ignoring(list(stops)), *command])


def submitit_command(folder: Path, python: str) -> str:
    """What submitit's SlurmExecutor runs in every task (kept in step with submitit 1.5)."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(resources: SlurmResources, folder: Path, job_name: str, workdir: Path, array_size: int | None = None,
                  python: str | None = None) -> str:
    """The sbatch script submitit writes for these resources, without submitting anything (golden tests)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = resources.executor_parameters(job_name, workdir, folder)
    if array_size is not None and array_size > 1:
        params["map_count"] = array_size
    command = submitit_command(folder, rank_python(resources, workdir, python))
    return _make_sbatch_string(command=command, folder=folder, **params)


def make_executor(resources: SlurmResources, folder: Path, job_name: str, workdir: Path):
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=resources.max_num_timeout,
                                      python=rank_python(resources, workdir))
    executor.update_parameters(**resources.executor_parameters(job_name, workdir, folder))
    return executor
