"""Process groups and device meshes for the strategies: one place that builds them the same way on every rank."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from gpt.collectives.process_group import process_group_backend


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
    return init_device_mesh(device.type, tuple(dims.values()), mesh_dim_names=tuple(dims))


def describe_mesh(mesh: DeviceMesh) -> str:
    """'pp=2 x dp=2' for the banner."""
    return " x ".join(f"{name}={size}" for name, size in zip(mesh.mesh_dim_names, mesh.mesh.shape))
