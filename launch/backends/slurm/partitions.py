"""Checks against the real cluster before anything is submitted: Slurm's commands are there, the partition
exists, is up, and has enough nodes with enough CPUs, GPUs and memory, and the time limit fits (sinfo)."""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
from dataclasses import dataclass, field

from gpt.errors import UserError
from launch.backends.cluster_config import ClusterConfig
from launch.backends.slurm import commands
from launch.backends.slurm.resources import SlurmResources

COMMANDS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel")
SINFO_FORMAT = "%P|%D|%c|%m|%G|%l|%a"


def require_slurm(commands: tuple[str, ...] = COMMANDS) -> None:
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        raise UserError(
            f"cluster=slurm needs Slurm's {', '.join(missing)} on PATH, and this machine has none. Run from a "
            "cluster's login node, or train on this machine with cluster=local. (The local test cluster: "
            'eval "$(slurm/local_cluster.sh env)")')


@dataclass
class Partition:
    name: str
    default: bool = False
    up: bool = True
    max_time_min: int | None = None  # None: no limit
    # (count, cpus, memory MB, gpus) per group of alike nodes
    groups: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def nodes(self) -> int:
        return sum(g[0] for g in self.groups)


def parse_time_min(text: str) -> int | None:
    """Slurm's [days-]hours:minutes:seconds (or minutes, or 'infinite') as whole minutes."""
    text = text.strip()
    if text in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:  # minutes
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:  # minutes:seconds
        h, (m, s) = 0, parts
    else:
        h, m, s = parts[-3:]
    return days * 1440 + h * 60 + m + (1 if s else 0)


def parse_gpus(gres: str) -> int:
    """'gpu:4', 'gpu:a100:8(S:0-1)', 'gpu:2,shard:8' -> GPUs per node; '(null)' -> 0"""
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_sinfo(text: str) -> dict[str, Partition]:
    """`sinfo -h -o '%P|%D|%c|%m|%G|%l|%a'` -> partitions by name."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, count, cpus, mem, gres, limit, avail = line.split("|")[:7]
        default = name.endswith("*")
        name = name.rstrip("*")
        p = parts.setdefault(name, Partition(name))
        p.default |= default
        p.up = avail.strip() == "up"
        p.max_time_min = parse_time_min(limit)
        p.groups.append((int(count), int(re.sub(r"\D.*", "", cpus) or 0), int(re.sub(r"\D.*", "", mem) or 0),
                         parse_gpus(gres)))
    return parts


@functools.lru_cache(maxsize=4)
def _sinfo(path: str) -> str:  # cached per PATH: one sinfo per sweep, however many points it has
    return commands.run("sinfo", "-h", "-o", SINFO_FORMAT, timeout=60)  # SlurmUnavailable: the launcher says so


def read_partitions() -> dict[str, Partition]:
    return parse_sinfo(_sinfo(os.environ.get("PATH", "") + "|" + os.environ.get("SLURM_CONF", "")))


def resolve_cpus(res: SlurmResources, part: Partition) -> SlurmResources:
    """cluster.cpus_per_task=auto: a GPU rank gets its GPUs' share of the smallest node that has them (64 CPUs and 8
    GPUs: 8 per GPU), for its data loading, NCCL's proxy thread and the checkpoint writer, and leaves the node's other
    GPUs their CPUs (a one-GPU job, or a packed point, on an 8-GPU node); a CPU job keeps one CPU per task (set it to
    the cores a CPU rank should use)."""
    if res.cpus_per_task is not None:
        return res
    if not res.node_gpus:
        return dataclasses.replace(res, cpus_per_task=1)
    per_gpu = min((g[1] // g[3] for g in part.groups if g[3] >= res.node_gpus), default=1)
    return dataclasses.replace(res, cpus_per_task=max(per_gpu * res.node_gpus // res.tasks_per_node, 1))


def check_against_cluster(res: SlurmResources, partitions: dict[str, Partition]) -> Partition:
    """The partition these resources will run on, or a UserError naming what does not fit."""
    names = ", ".join(sorted(partitions)) or "none"
    if res.partition is None:
        defaults = [p for p in partitions.values() if p.default]
        if not defaults:
            raise UserError(f"this cluster has no default partition: set cluster.partition to one of {names}")
        part = defaults[0]
    elif res.partition not in partitions:
        raise UserError(f"cluster.partition={res.partition!r} is not a partition of this cluster; "
                        f"its partitions: {names}")
    else:
        part = partitions[res.partition]
    if not part.up:
        raise UserError(f"partition {part.name!r} is not up (sinfo): jobs would wait forever; pick another with "
                        f"cluster.partition (one of {names})")
    if res.allocated_nodes > part.nodes:
        spares = f" + cluster.spare_nodes={res.spare_nodes}" if res.spare_nodes else ""
        raise UserError(f"nodes={res.nodes}{spares} is more than partition {part.name!r} has ({part.nodes} node(s))")
    if part.max_time_min is not None and res.time_min > part.max_time_min:
        raise UserError(f"cluster.time_min={res.time_min} is longer than partition {part.name!r} allows "
                        f"({part.max_time_min} min)")
    cpus, per_task = res.tasks_per_node * (res.cpus_per_task or 1), res.cpus_per_task or "auto (1)"
    needs = [
        (cpus, 1, f"cluster.tasks_per_node={res.tasks_per_node} x cluster.cpus_per_task={per_task} = {cpus} CPU(s)",
         "CPU(s)"),
        (res.node_gpus, 3, f"cluster.gpus_per_node={res.node_gpus}", "GPU(s)"),
        (mem_mb(res.mem), 2, f"cluster.mem={res.mem}", "MB of memory"),
    ]
    for need, index, what, unit in needs:
        most = max((g[index] for g in part.groups), default=0)
        if need and need > most:
            raise UserError(f"{what} per node, but the nodes of partition {part.name!r} have at most {most} {unit}")
    fit = sum(g[0] for g in part.groups
              if g[1] >= cpus and g[3] >= res.node_gpus and g[2] >= mem_mb(res.mem))
    if res.allocated_nodes > fit:
        raise UserError(f"nodes={res.nodes} with {cpus} CPU(s), {res.node_gpus} GPU(s) per node: only {fit} of the "
                        f"{part.nodes} nodes of partition {part.name!r} have that much")
    return part


def node_mem_mb(cluster: ClusterConfig, partitions: dict[str, Partition]) -> int | None:
    """The memory of the smallest node of the job's partition that has its CPUs and GPUs (sinfo's MB): what
    --mem=0 gives the job. None when unknown: no such partition, or nodes without RealMemory (Slurm's default is
    1 MB). `cluster`: the section as SlurmBackend.check resolved it (cpus_per_task=auto: one CPU a task)."""
    part = (partitions.get(cluster.partition) if cluster.partition
            else next((p for p in partitions.values() if p.default), None))
    cpus = cluster.tasks_per_node * ((None if cluster.cpus_per_task == "auto" else cluster.cpus_per_task) or 1)
    gpus = cluster.node_gpus
    smallest = min((g[2] for g in part.groups if g[1] >= cpus and g[3] >= gpus), default=0) if part else 0
    return smallest if smallest > 1 else None


def mem_mb(mem: str | None) -> int:
    if not mem:
        return 0
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    unit = mem[-1].upper()
    return int(float(mem[:-1]) * scale[unit]) if unit in scale else int(mem)
