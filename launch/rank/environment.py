"""The one place that knows how a rank was started: Slurm (srun), torchrun-style variables, or a plain process.

Everything else receives a gpt.dist.process_group.DistEnv: rank, world size, local rank, node, master address and port.
"""
from __future__ import annotations

import os
import socket

from gpt.dist.process_group import DistEnv
from gpt.errors import UserError
from launch.backends.slurm import commands
from launch.rank.job_env import ROUND_VAR

# Ports for a Slurm job are derived from its id, so every task computes the same one without talking. They stay
# below Linux's ephemeral range (32768-60999 by default), where any connection's local port may already sit.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 12000


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """This rank's place. Reading the real environment (`environ` None) under Slurm also exports what libraries
    expect from torchrun (see export_for_libraries)."""
    env = os.environ if environ is None else environ
    slurm_step = "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env
    # In a Slurm step, torchrun-style variables count only when a torchrun-style agent set them (a local run
    # inside an allocation); inherited from the submitting shell, Slurm's own win.
    if "RANK" in env and "WORLD_SIZE" in env and (not slurm_step or "TORCHELASTIC_RUN_ID" in env):
        return _from_torchrun(env)
    if slurm_step:
        found = _from_slurm(env)
        if environ is None:
            export_for_libraries(found, os.environ)
        return found
    return DistEnv()


def export_for_libraries(found: DistEnv, environ) -> None:
    """DeepSpeed asserts LOCAL_RANK and calls set_device(LOCAL_RANK): give it the GPU index this task drives,
    not SLURM_LOCALID, which is out of range when Slurm shows each task only its own GPU. (Not RANK and
    WORLD_SIZE: detect() would then read this task as a torchrun one.) The async-checkpoint
    gloo group picks its network interface like NCCL does when only NCCL's is set."""
    environ["LOCAL_RANK"] = str(found.local_rank if found.device_index is None else found.device_index)
    if "NCCL_SOCKET_IFNAME" in environ and "GLOO_SOCKET_IFNAME" not in environ:
        environ["GLOO_SOCKET_IFNAME"] = environ["NCCL_SOCKET_IFNAME"]


def visible_gpus(env) -> list[str] | None:
    """The GPUs CUDA_VISIBLE_DEVICES shows this process, as it names them (None: unset, every GPU of the node)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    if value == "NoDevFiles":  # Slurm's word for a task of a GPU job that got none
        return []
    return [d.strip() for d in value.split(",") if d.strip()]


def device_index(visible: list[str] | None, local_rank: int) -> int:
    """The GPU a task drives, as an index among those it sees. Every GPU of the node (unset): its local rank.
    One (--gpus-per-task=1, --gpu-bind=single:1): that one. Its socket's share (--gpu-bind=closest shows local
    ranks 4-7 of an 8-GPU node "4,5,6,7"): the local rank modulo the GPUs shown, so local rank 5 drives index 1,
    GPU 5; the ranks of a node then check that none shares a GPU (launch.rank.gpu_plan)."""
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
    )


def _from_slurm(env) -> DistEnv:
    world = int(env["SLURM_NTASKS"])
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    local_rank = int(env.get("SLURM_LOCALID", 0))
    return DistEnv(
        rank=int(env["SLURM_PROCID"]),
        world_size=world,
        local_rank=local_rank,
        device_index=device_index(visible_gpus(env), local_rank),
        local_world_size=world // nodes,
        node_rank=int(env.get("SLURM_NODEID", 0)),
        num_nodes=nodes,
        master_addr=env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
        master_port=master_port(env),
        hostname=socket.gethostname(),
    )


def master_port(env) -> int:
    """The job's port, another for each in-job round (launch.run.rounds): a rank of an earlier round that still
    runs cannot join a later one."""
    round_ = int(env.get(ROUND_VAR, "0") or 0)
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"]) + round_
    return slurm_port(env["SLURM_JOB_ID"], round_)


def slurm_port(job_id: str, round_: int = 0) -> int:
    return SLURM_PORT_BASE + (int(job_id) + 997 * round_) % SLURM_PORT_SPAN


def first_host(nodelist: str) -> str:
    """The job's first host, expanded by Slurm itself. Never a localhost fallback: on a multi-node job that
    would make every node wait for a world of its own."""
    try:
        out = commands.hostnames(nodelist)
    except commands.SlurmUnavailable as e:
        raise UserError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with 'scontrol show hostnames': {e}. "
                        "Make scontrol available inside the job, or set MASTER_ADDR yourself.") from e
    if not out:
        raise UserError(f"'scontrol show hostnames {nodelist}' returned no host")
    return out[0]
