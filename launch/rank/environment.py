"""The one place that knows how a rank was started: as a task of a scheduler's step (the job environment places it:
launch.backends.<name>.job), by torchrun-style variables, or as a plain process.

Everything else receives a gpt.collectives.process_group.DistEnv: rank, world size, local rank, node, master address
and port.
"""
from __future__ import annotations

import os
import socket

from gpt.collectives.process_group import DistEnv
from launch.local_gpus import cuda_visible
from launch.rank.job_env import scheduler_classes
from launch.rank.parent import LAUNCHER_PID, STORE_FD


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """This rank's place. Reading the real environment (`environ` None) in a scheduler's step also exports what
    libraries expect from torchrun (see export_for_libraries)."""
    env = os.environ if environ is None else environ
    step = next((cls for cls in scheduler_classes() if cls.in_step(env)), None)
    # In a scheduler's step, torchrun-style variables count only when our local launcher or torchrun set them (a
    # local run inside an allocation); inherited from the submitting shell, the scheduler's own win.
    agent = LAUNCHER_PID in env or "TORCHELASTIC_RUN_ID" in env
    if "RANK" in env and "WORLD_SIZE" in env and (step is None or agent):
        return _from_torchrun(env)
    if step is not None:
        found = step.place(env)
        if environ is None:
            export_for_libraries(found, os.environ)
        return found
    return DistEnv()


def export_for_libraries(found: DistEnv, environ) -> None:
    """DeepSpeed asserts LOCAL_RANK and calls set_device(LOCAL_RANK): give it the GPU index this task drives,
    not the scheduler's local id (SLURM_LOCALID), out of range when each task is shown only its own GPU. (Not RANK and
    WORLD_SIZE: detect() would then read this task as a torchrun one.) The async-checkpoint
    gloo group picks its network interface like NCCL does when only NCCL's is set."""
    environ["LOCAL_RANK"] = str(found.local_rank if found.device_index is None else found.device_index)
    if "NCCL_SOCKET_IFNAME" in environ and "GLOO_SOCKET_IFNAME" not in environ:
        environ["GLOO_SOCKET_IFNAME"] = environ["NCCL_SOCKET_IFNAME"]


def visible_gpus(env) -> list[str] | None:
    """The GPUs CUDA_VISIBLE_DEVICES shows this process, named as it names them and as many as CUDA enumerates
    (launch.local_gpus.cuda_visible: a UUID or a MIG slice is device 0..n-1 here too). None: unset, every GPU of
    the node."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    if value == "NoDevFiles":  # Slurm's word for a task of a GPU job that got none
        return []
    return cuda_visible(value)


def device_index(visible: list[str] | None, local_rank: int) -> int:
    """The GPU a task drives, as an index among those it sees. Every GPU of the node (unset): its local rank.
    One (--gpus-per-task=1, --gpu-bind=single:1): that one. Several: the local rank modulo the GPUs shown (a
    scheduler that shows each task a share of the node's GPUs chooses within it: Slurm's placement.task_gpu); the
    ranks of a node then check that none shares a GPU (launch.rank.gpu_plan)."""
    if not visible:
        return local_rank
    return local_rank % len(visible)


def _from_torchrun(env) -> DistEnv:
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    # The local backend groups ranks into "nodes" of tasks_per_node processes on this one machine.
    per_node = int(env.get("GPTLAUNCH_TASKS_PER_NODE", env.get("LOCAL_WORLD_SIZE", world)))
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=per_node,
        node_rank=rank // per_node,
        num_nodes=max(1, world // per_node),
        master_addr=env["MASTER_ADDR"],
        master_port=int(env["MASTER_PORT"]),
        hostname=socket.gethostname(),
        store_fd=int(env[STORE_FD]) if rank == 0 and env.get(STORE_FD) else None,
    )
