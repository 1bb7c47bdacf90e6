"""cluster=slurm: what a sweep point asks Slurm for, checked without a cluster, and the submitit executor (and
so the sbatch script) that asks for it.

Every task of a job (nodes x tasks_per_node, started by srun) runs launch.backends.slurm.task.RankTask, which runs the
same per-rank entry point as every other backend: `python -m launch.worker RUN_DIR`.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpt.errors import ConfigError
from launch.startup import ATTEMPT_START

# sbatch flags the launcher sets itself: cluster.sbatch must not set them behind its back.
MANAGED = {
    "nodes": "nodes", "N": "nodes", "ntasks-per-node": "cluster.tasks_per_node", "ntasks": "cluster.tasks_per_node",
    "n": "cluster.tasks_per_node", "gpus-per-node": "cluster.gpus_per_node", "gpus": "cluster.gpus_per_node",
    "gres": "cluster.gpus_per_node", "G": "cluster.gpus_per_node", "cpus-per-task": "cluster.cpus_per_task",
    "c": "cluster.cpus_per_task", "mem": "cluster.mem", "time": "cluster.time_min", "t": "cluster.time_min",
    "partition": "cluster.partition", "p": "cluster.partition", "account": "cluster.account",
    "A": "cluster.account", "qos": "cluster.qos", "q": "cluster.qos", "constraint": "cluster.constraint",
    "C": "cluster.constraint", "requeue": "cluster.requeue", "no-requeue": "cluster.requeue",
    "signal": "cluster.signal_delay_s", "output": None, "o": None, "error": None, "e": None, "array": None,
    "open-mode": None, "job-name": "name", "J": "name", "wrap": None,
}
MEM = re.compile(r"^\d+[KMGT]?$")
# srun kills every task of the step when one exits non-zero: a dead rank ends the job at once instead of
# leaving the others waiting in a collective.
SRUN_ARGS = ("--kill-on-bad-exit=1",)


@dataclass(frozen=True)
class SlurmResources:
    """One job's request. Sweep points with equal resources share an executor (and a job array)."""

    nodes: int
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = 1  # None: auto, a GPU rank's share of its node's CPUs (resolved against sinfo)
    time_min: int = 60
    partition: str | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch: tuple[tuple[str, Any], ...] = ()
    setup: tuple[str, ...] = ()
    requeue: bool = True
    signal_delay_s: int = 120
    max_num_timeout: int = 3
    restarts: int = 0  # how many times the job may requeue itself (preemption.max_restarts), for the budget

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def node_hours(self) -> float:
        return self.nodes * self.time_min / 60

    @property
    def gpu_hours(self) -> float:
        return self.nodes * self.gpus_per_node * self.time_min / 60

    def describe(self) -> str:
        gpus = f", {self.gpus_per_node} GPU(s)" if self.gpus_per_node else ""
        where = f" on {self.partition}" if self.partition else ""
        return f"{self.nodes} node(s) x {self.tasks_per_node} task(s){gpus}, {self.time_min} min{where}"

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SlurmResources:
        """cfg.cluster as resources, with every check that needs no cluster: types, conflicts, time limits."""
        c = cfg.cluster

        def count(key: str, minimum: int = 1) -> int:
            value = OmegaConf.select(c, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"cluster.{key}", value, f"an integer >= {minimum}")
            return value

        def text(key: str) -> str | None:
            value = OmegaConf.select(c, key)
            if value is not None and (not isinstance(value, (str, int)) or str(value).strip() == ""):
                raise ConfigError(f"cluster.{key}", value, "a non-empty string, or null")
            return None if value is None else str(value)

        res = cls(
            nodes=count("nodes"), tasks_per_node=count("tasks_per_node"), gpus_per_node=count("gpus_per_node", 0),
            cpus_per_task=None if c.get("cpus_per_task") == "auto" else count("cpus_per_task"),
            time_min=count("time_min"), partition=text("partition"),
            mem=text("mem"), account=text("account"), qos=text("qos"), constraint=text("constraint"),
            sbatch=_extra_flags(c.get("sbatch")), setup=_setup_lines(c.get("setup")),
            requeue=bool(c.get("requeue", True)), signal_delay_s=count("signal_delay_s", 0),
            max_num_timeout=count("max_num_timeout", 0), restarts=_restarts(cfg),
        )
        if res.mem is not None and not MEM.match(res.mem):
            raise ConfigError("cluster.mem", res.mem, "memory per node like 64G, 512M or 64000 (MB)")
        if res.gpus_per_node and res.tasks_per_node != res.gpus_per_node:
            raise ConfigError("cluster.tasks_per_node", res.tasks_per_node,
                              f"equal to cluster.gpus_per_node={res.gpus_per_node} (one rank per GPU)")
        device = OmegaConf.select(cfg, "train.device", default="auto")
        if device == "cuda" and not res.gpus_per_node:
            raise ConfigError("cluster.gpus_per_node", 0, "at least 1 with train.device=cuda")
        if res.signal_delay_s >= res.time_min * 60:
            raise ConfigError("cluster.signal_delay_s", res.signal_delay_s,
                              f"shorter than the time limit cluster.time_min={res.time_min} min")
        interval = OmegaConf.select(cfg, "checkpoint.interval_minutes", default=None)
        if interval not in (None, "auto"):
            if not isinstance(interval, (int, float)) or interval <= 0:
                raise ConfigError("checkpoint.interval_minutes", interval,
                                  "a positive number of minutes, auto, or null")
            if res.time_min <= interval:
                raise ConfigError("cluster.time_min", res.time_min,
                                  f"longer than checkpoint.interval_minutes={interval}: the job would reach its "
                                  "time limit before its first checkpoint")
        return res

    def executor_parameters(self, job_name: str) -> dict[str, Any]:
        """submitit.SlurmExecutor parameters; submitit turns them into the sbatch script."""
        extra: dict[str, Any] = {"requeue" if self.requeue else "no-requeue": True}
        if self.mem is not None:  # as written (submitit's own mem_gb would turn "64G" into a float)
            extra["mem"] = self.mem
        extra.update(self.sbatch)
        params: dict[str, Any] = {
            "job_name": job_name, "time": self.time_min, "nodes": self.nodes, "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task, "signal_delay_s": self.signal_delay_s, "wckey": None,
            "srun_args": list(SRUN_ARGS), "additional_parameters": extra,
            # when this attempt started (the start-up breakdown in attempts.jsonl); each task then sets its rank's
            # threads from its -c (launch.threads)
            "setup": [f"export {ATTEMPT_START}=$(date +%s.%N)", *self.setup],
        }
        optional = {"gpus_per_node": self.gpus_per_node or None, "partition": self.partition,
                    "account": self.account, "qos": self.qos, "constraint": self.constraint}
        params.update({k: v for k, v in optional.items() if v is not None})
        return params


def _restarts(cfg: DictConfig) -> int:
    """How many more times the job may run: preemption.max_restarts, when it can requeue at all."""
    if not OmegaConf.select(cfg, "cluster.requeue", default=True):
        return 0
    if not OmegaConf.select(cfg, "preemption.enabled", default=True):
        return 0
    value = OmegaConf.select(cfg, "preemption.max_restarts", default=10)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError("preemption.max_restarts", value, "an integer >= 0")
    return value


def _extra_flags(value: Any) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, DictConfig):
        raise ConfigError("cluster.sbatch", value, "a mapping of sbatch flags, e.g. {exclusive: true}")
    flags = []
    for key, flag_value in OmegaConf.to_container(value, resolve=True).items():
        flag = str(key).lstrip("-").replace("_", "-")
        if flag in MANAGED:
            owner = MANAGED[flag]
            valid = f"set through {owner} instead" if owner else "a flag the launcher does not set itself"
            raise ConfigError(f"cluster.sbatch.{key}", flag_value, valid)
        if flag_value is None or flag_value is False:
            continue
        flags.append((flag, flag_value))
    return tuple(sorted(flags))


def _setup_lines(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    lines = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise ConfigError("cluster.setup", value, "a list of shell lines")
    return tuple(lines)


def submitit_command(folder: Path, python: str | None = None) -> str:
    """What submitit's SlurmExecutor runs in every task (kept in step with submitit 1.5)."""
    python = python or shlex.quote(sys.executable)
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(resources: SlurmResources, folder: Path, job_name: str, array_size: int | None = None,
                  python: str | None = None) -> str:
    """The sbatch script submitit writes for these resources, without submitting anything (golden tests)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = resources.executor_parameters(job_name)
    if array_size is not None and array_size > 1:
        params["map_count"] = array_size
    return _make_sbatch_string(command=submitit_command(folder, python), folder=folder, **params)


def make_executor(resources: SlurmResources, folder: Path, job_name: str):
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=resources.max_num_timeout)
    executor.update_parameters(**resources.executor_parameters(job_name))
    return executor
