"""The cluster section (configs/cluster/: which backend runs the ranks, and what a Slurm job asks for) and the
budget section (what a sweep of Slurm jobs may cost). The backends' keys are one dataclass, their union: each
backend reads its own and leaves the others at their defaults (a non-default value of a key the backend does
not read is refused). Read by the launcher only; gpt/ knows no scheduler."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gpt.config.credentials import check_env, check_lines
from gpt.config.names import one_line
from gpt.config.parse import only_own_keys
from gpt.config.sections import signal_names
from gpt.errors import ConfigError

# the shape (with the run's `nodes`), the time-limit warning the trainer allows for, and each device's memory (the
# planner's fit check)
SHAPE = ("tasks_per_node", "signal_delay_s", "gpu_memory_gb")
# what every rank of a Slurm job gets, whoever made the allocation (a site profile sets them)
STEP = ("srun_args", "env", "master_host_suffix", "container", "spare_nodes")
# what a job asks sbatch for: cluster=slurm asks; inside an allocation (cluster=srun) sbatch or salloc already did,
# and the ones Slurm shows the job are compared with it (launch.backends.slurm.allocation), so that one site
# profile serves every path
ALLOCATION = ("gpus_per_node", "gpus_per_task", "gres", "cpus_per_task", "mem", "partition", "time_min", "account",
              "qos", "reservation", "constraint", "sbatch", "requeue", "signal", "max_num_timeout")
# cluster.name -> the keys that backend reads
BACKENDS: dict[str, tuple[str, ...]] = {
    "local": SHAPE,  # ranks are processes on this machine; a "node" is a group of tasks_per_node of them
    # inside an allocation: srun starts the ranks, after the setup lines; auto: the allocation's shape
    "srun": (*SHAPE, *STEP, *ALLOCATION, "setup"),
    "slurm": (*SHAPE, *STEP, *ALLOCATION, "setup", "chain"),
}
MEM = re.compile(r"^\d+[KMGT]?$")
GRES = re.compile(r"^[A-Za-z][\w.-]*(:[\w.-]+)*(,[A-Za-z][\w.-]*(:[\w.-]+)*)*$")  # gpu:4, gpu:a100:4, gpu:2,nvme:1
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RUNTIMES = ("pyxis", "apptainer")
APPLIES_TO = ("worst", "expected")


@dataclass(frozen=True)
class ContainerConfig:
    """The image every rank runs in. pyxis: srun --container-image/--container-mounts; apptainer: the rank's command
    is prefixed with `apptainer exec --nv`. The run folder (with its checkpoints) and the submit folder are mounted
    besides `mounts`; the image's `python` runs the ranks."""

    image: str | None = None  # null: no container; pyxis: e.g. nvcr.io#nvidia/pytorch:24.05-py3; apptainer: a .sif
    runtime: str = "pyxis"
    mounts: list[str] = field(default_factory=list)  # SRC[:DST[:FLAGS]], as both runtimes write them

    def validate(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError("cluster.container.runtime", self.runtime, f"one of {', '.join(RUNTIMES)}")
        if self.image is not None and not self.image.strip():
            raise ConfigError("cluster.container.image", self.image,
                              "an image (pyxis) or a .sif file (apptainer), or null")
        for mount in self.mounts:
            if not mount or "," in mount or mount.startswith(":"):
                raise ConfigError("cluster.container.mounts", mount, "SRC[:DST[:FLAGS]] with no comma, one per item")


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    tasks_per_node: int | str  # ranks per node, one per GPU on GPU nodes; srun: auto, the allocation's
    # GPUs, in the one form the site takes (at most one of the three): --gpus-per-node (0: none; when > 0,
    # tasks_per_node must equal it), --gpus-per-task, or --gres (e.g. gpu:4, or gpu:a100:4)
    gpus_per_node: int = 0
    gpus_per_task: int = 0
    gres: str | None = None
    cpus_per_task: int | str = "auto"  # --cpus-per-task, also each rank's threads; auto: a GPU rank's share of its
    # node's CPUs (1 on CPU nodes)
    mem: str | None = None  # --mem per node, e.g. 64G; null: the partition's default
    partition: str | None = None  # null: the cluster's default partition
    time_min: int = 60  # --time in minutes; the budget guard counts nodes x this
    # submitit's name for time_min, taken as time_min (which is what config.yaml then records)
    timeout_min: int | None = None
    account: str | None = None  # --account (a cluster without accounting takes any name)
    qos: str | None = None
    reservation: str | None = None
    constraint: str | None = None  # e.g. a100
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other sbatch flag, e.g. {exclusive: true}
    setup: list[str] | str = field(default_factory=list)  # shell lines the batch script runs before srun
    srun_args: list[str] = field(default_factory=list)  # more srun flags for the ranks' step, e.g. [--mpi=pmix]
    env: dict[str, str] = field(default_factory=dict)  # variables every rank gets, e.g. {NCCL_IB_HCA: mlx5};
    # MASTER_ADDR and MASTER_PORT set here win over the job's first host and the port derived from its id
    master_host_suffix: str | None = None  # appended to the first host's name for MASTER_ADDR, e.g. -ib
    container: ContainerConfig = field(default_factory=ContainerConfig)
    signal: str = "USR2"  # the warning the site sends before the time limit or a preemption (--signal=SIG@N);
    # one of preemption.signals
    requeue: bool = True  # --requeue: a preempted job, or one that requeues itself, starts again
    # how long before its time limit a job is warned (a save and a requeue must fit in it); null: no warning known,
    # or for cluster=slurm the one it asks for (--signal=USR2@N, launch.backends.slurm.resources)
    signal_delay_s: int | None = None
    max_num_timeout: int = 3  # handed to submitit's executor; the ranks requeue themselves (preemption.max_restarts)
    # N jobs of one run, one after another (--dependency=singleton, one job name): each continues where the one
    # before saved at its time limit, for runs longer than a partition allows (launch.backends.slurm.chain)
    chain: int = 1
    # hot spares: the job allocates nodes + spare_nodes and runs ranks on `nodes`; a lost, cut-off or sick node is
    # replaced by a spare in the next in-job restart (launch.recovery.rounds), same world size and layout
    spare_nodes: int = 0
    # GiB of memory per GPU, for the planner's check that each rank fits (launch.planning.memory_fit); 0: known from the
    # GPU's name (a local GPU, or the type in cluster.gres / cluster.constraint), else no check
    gpu_memory_gb: float = 0.0
    # one key per knob: keys this section no longer has, refused with the key to use
    MOVED: ClassVar[dict[str, str]] = {"nodes": "nodes (the run's node count: -m nodes=1,2,4; cluster=srun: auto)"}

    def __post_init__(self) -> None:
        if self.timeout_min is not None:  # a profile written for submitit: its time limit, never the default
            object.__setattr__(self, "time_min", self.timeout_min)
            object.__setattr__(self, "timeout_min", None)

    @property
    def keys_read(self) -> tuple[str, ...]:
        return ("name", *BACKENDS.get(self.name, ()))

    def validate(self) -> None:
        if self.name not in BACKENDS:
            raise ConfigError("cluster.name", self.name, f"one of {', '.join(BACKENDS)} (cluster=local|slurm|srun)")
        # first: every other refusal shows the value it refuses, and none may show a credential
        check_env("cluster.env", self.env)
        if isinstance(self.setup, str) or all(isinstance(line, str) for line in self.setup):
            check_lines("cluster.setup", self.setup_lines)
        only_own_keys(self, "cluster", BACKENDS)
        self.check_count("cluster.tasks_per_node", self.tasks_per_node)
        if isinstance(self.gpu_memory_gb, bool) or self.gpu_memory_gb < 0:
            raise ConfigError("cluster.gpu_memory_gb", self.gpu_memory_gb, "GiB per GPU (e.g. 80), or 0 to know it "
                              "from the GPU's name")
        if self.signal_delay_s is not None and self.signal_delay_s < 0:
            raise ConfigError("cluster.signal_delay_s", self.signal_delay_s, "seconds >= 0, or null")
        self.validate_job()

    def check_count(self, key: str, value: Any) -> None:
        """A count of the job's shape (the run's `nodes`, tasks_per_node): cluster=srun may leave it to the
        allocation."""
        if not (self.name == "srun" and value == "auto") and not _count(value, 1):
            auto = ", or auto (the allocation's)" if self.name == "srun" else ""
            raise ConfigError(key, value, f"a positive integer{auto}")

    def validate_job(self) -> None:
        """What a Slurm job asks for, as far as it can be checked without a cluster."""
        for key, minimum in (("gpus_per_node", 0), ("gpus_per_task", 0), ("time_min", 1), ("max_num_timeout", 0),
                             ("chain", 1), ("spare_nodes", 0)):
            if not _count(getattr(self, key), minimum):
                raise ConfigError(f"cluster.{key}", getattr(self, key), f"an integer >= {minimum}")
        if self.cpus_per_task != "auto" and not _count(self.cpus_per_task, 1):
            raise ConfigError("cluster.cpus_per_task", self.cpus_per_task, "a positive integer, or auto")
        self.validate_gpus()
        self.validate_step()
        signal_names("cluster.signal", self.signal)
        for key in ("mem", "partition", "account", "qos", "reservation", "constraint"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise ConfigError(f"cluster.{key}", getattr(self, key), "a non-empty string, or null")
        if self.mem is not None and not MEM.match(self.mem):
            raise ConfigError("cluster.mem", self.mem, "memory per node like 64G, 512M or 64000 (MB)")
        if not isinstance(self.setup, str) and not all(isinstance(line, str) for line in self.setup):
            raise ConfigError("cluster.setup", self.setup, "a list of shell lines")
        if self.node_gpus and self.tasks_per_node != self.node_gpus and self.tasks_per_node != "auto":
            form = next(k for k in ("gpus_per_node", "gpus_per_task", "gres") if getattr(self, k)) \
                if (self.gpus_per_node or self.gpus_per_task or self.gres) else "sbatch.gres"
            count = "" if form == "gpus_per_node" else f", {self.node_gpus} GPU(s) per node"
            raise ConfigError("cluster.tasks_per_node", self.tasks_per_node,
                              f"equal to cluster.{form}={self.value_of(form)}{count} (one rank per GPU)")
        # each becomes an #SBATCH line or part of the ranks' srun line, where a newline would end it early
        for key in ("partition", "account", "qos", "reservation", "constraint", "mem", "gres", "sbatch", "srun_args",
                    "env"):
            one_line(f"cluster.{key}", getattr(self, key))

    @property
    def node_gpus(self) -> int:
        """GPUs each node gets, in whichever form the site asks for them."""
        tasks = self.tasks_per_node if isinstance(self.tasks_per_node, int) else 0
        return node_gpus(self.gpus_per_node, self.gpus_per_task, tasks, self.gres or self.sbatch.get("gres"))

    def validate_gpus(self) -> None:
        chosen = [k for k in ("gpus_per_node", "gpus_per_task", "gres") if getattr(self, k)]
        chosen += [f"sbatch.{k}" for k in self.sbatch if str(k).lstrip("-") == "gres" and self.sbatch[k]]
        if len(chosen) > 1:
            raise ConfigError(f"cluster.{chosen[1]}", self.value_of(chosen[1]), f"unset while cluster.{chosen[0]} is "
                              "set: a site asks for GPUs in one form (gpus_per_node, gpus_per_task or gres)")
        if self.gres is not None and not GRES.match(self.gres):
            raise ConfigError("cluster.gres", self.gres, "a --gres value like gpu:4 or gpu:a100:4, or null")

    def validate_step(self) -> None:
        """What every rank's step gets (cluster=slurm and cluster=srun)."""
        self.container.validate()
        if not all(isinstance(arg, str) and arg.startswith("-") for arg in self.srun_args):
            raise ConfigError("cluster.srun_args", self.srun_args, "srun flags, one --flag=value per item, e.g. "
                              "[--mpi=pmix] (quote an item with a comma in YAML)")
        for name, value in self.env.items():
            if not ENV_NAME.match(str(name)):
                raise ConfigError(f"cluster.env.{name}", value, "a variable name of letters, digits and _")
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ConfigError(f"cluster.env.{name}", value, "a string or a number")
        if self.master_host_suffix is not None and not re.match(r"^[\w.-]+$", self.master_host_suffix):
            raise ConfigError("cluster.master_host_suffix", self.master_host_suffix,
                              "a hostname suffix like -ib, or null")

    def value_of(self, key: str) -> Any:
        return self.sbatch[key.removeprefix("sbatch.")] if key.startswith("sbatch.") else getattr(self, key)

    @property
    def env_vars(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.env.items()}

    @property
    def setup_lines(self) -> tuple[str, ...]:
        return (self.setup,) if isinstance(self.setup, str) else tuple(self.setup)


def node_gpus(gpus_per_node: int, gpus_per_task: int, tasks_per_node: int, gres: Any) -> int:
    """GPUs per node from --gpus-per-node, --gpus-per-task x tasks, or a --gres value (gpu:4, gpu:a100:4; gpu: 1)."""
    if gpus_per_node or gpus_per_task:
        return gpus_per_node or gpus_per_task * tasks_per_node
    count = 0
    for item in str(gres or "").split(","):
        fields = item.split(":")
        if fields[0] == "gpu":
            count += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return count


def _count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True)
class BudgetConfig:
    """What a cluster=slurm sweep may cost, shown before anything is submitted and refused above the limit."""

    max_node_hours: float | None = 100.0  # null: no limit
    applies_to: str = "worst"  # worst: nodes x cluster.time_min x (preemption.max_restarts + 1); expected: one run each

    def validate(self) -> None:
        if self.max_node_hours is not None and self.max_node_hours <= 0:
            raise ConfigError("budget.max_node_hours", self.max_node_hours,
                              "a positive number of node-hours, or null for no limit")
        if self.applies_to not in APPLIES_TO:
            raise ConfigError("budget.applies_to", self.applies_to, f"one of {', '.join(APPLIES_TO)}")
