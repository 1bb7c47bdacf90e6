"""Process groups and device meshes for the strategies: one place that builds them the same way on every rank."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from gpt.collectives.process_group import group_timeout, process_group_backend


def ensure_process_group(device: torch.device) -> None:
    """A distributed strategy run as one process still needs a process group (FSDP, DDP, DeepSpeed): a
    one-rank group on an in-memory store. A multi-rank job has joined its group already (launch.rank.worker)."""
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(device), store=dist.HashStore(), rank=0, world_size=1)


def build_mesh(device: torch.device, **dims: int) -> DeviceMesh:
    """A DeviceMesh with named dimensions, outermost first, e.g. build_mesh(device, pp=2, dp=4).

    Rank r sits at the row-major coordinates of r: the last dimension varies fastest, so its groups are
    neighbouring ranks (on the same node when a node holds whole groups)."""
    ensure_process_group(device)
    return timed(init_device_mesh(device.type, tuple(dims.values()), mesh_dim_names=tuple(dims)))


def timed(mesh: DeviceMesh) -> DeviceMesh:
    """`mesh`, each of its groups given the job's collective timeout (watchdog.collective_timeout_s: group_timeout),
    where DeviceMesh makes them with torch's default (30 minutes on gloo, 10 on NCCL), which outlasts the watchdog.
    The default group has it already; a dry run's fake groups time nothing."""
    timeout = group_timeout()
    for name in mesh.mesh_dim_names if timeout is not None else ():
        group = mesh.get_group(name)
        if group is not dist.group.WORLD and dist.get_backend(group) != "fake":
            dist.distributed_c10d._set_pg_timeout(timeout, group)  # torch's own setter, on each of its backends
    return mesh


def describe_mesh(mesh: DeviceMesh) -> str:
    """'pp=2 x dp=2' for the banner."""
    return " x ".join(f"{name}={size}" for name, size in zip(mesh.mesh_dim_names, mesh.mesh.shape))
