"""A rank's place in a Slurm step (srun started it as one task): rank, world size, node, master address and port,
from Slurm's variables. launch.rank.environment asks for it through the job environment (SlurmJob.place)."""
from __future__ import annotations

import socket

from gpt.collectives.process_group import DistEnv
from gpt.errors import UserError
from launch.backends.slurm import commands
from launch.rank.environment import device_index, visible_gpus
from launch.rank.job_env import ROUND_VAR

# Ports for a Slurm job are derived from its id, so every task computes the same one without talking. They stay
# below Linux's ephemeral range (32768-60999 by default), where any connection's local port may already sit.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 12000


def from_slurm(env, node_gpus: int) -> DistEnv:
    """`node_gpus`: the GPUs Slurm gave this node of the step (launch.backends.slurm.job.gpus_on_node)."""
    world = int(env["SLURM_NTASKS"])
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    local_rank = int(env.get("SLURM_LOCALID", 0))
    return DistEnv(
        rank=int(env["SLURM_PROCID"]),
        world_size=world,
        local_rank=local_rank,
        device_index=task_gpu(env, local_rank, node_gpus),
        local_world_size=world // nodes,
        node_rank=int(env.get("SLURM_NODEID", 0)),
        num_nodes=nodes,
        master_addr=env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
        master_port=master_port(env),
        hostname=socket.gethostname(),
    )


def task_gpu(env, local_rank: int, node_gpus: int) -> int:
    """The GPU this task drives, as an index among those CUDA_VISIBLE_DEVICES shows it (CUDA numbers them 0..n-1 in
    the process, whatever their names: indices, UUIDs, MIG slices). None, one, or every GPU of the node: as
    device_index. A share of the node's GPUs (--gpu-bind=closest shows each task its socket's): the tasks that share
    it are those Slurm placed on that socket, and each drives the next GPU of the share. Slurm places tasks on the
    sockets in turn unless told otherwise (srun's default distribution, block:cyclic): on two sockets of 4 GPUs
    each, local ranks 0, 2, 4, 6 see "0,1,2,3" and drive GPUs 0-3; local_rank % 4 would put 0 and 4 on GPU 0."""
    visible = visible_gpus(env)
    if not visible or len(visible) == 1 or len(visible) >= node_gpus:
        return device_index(visible, local_rank)
    sockets = node_gpus // len(visible)  # the node's GPUs in shares of this size, one per socket
    turn = local_rank % len(visible) if sockets_in_blocks(env) else local_rank // sockets
    return turn % len(visible)


def sockets_in_blocks(env) -> bool:
    """Whether Slurm fills one socket with tasks before the next (--distribution=*:block, or block:block): the
    second field of SLURM_DISTRIBUTION, which srun sets only when asked. Its default is cyclic."""
    methods = env.get("SLURM_DISTRIBUTION", "").split(",")[0].split(":")
    return len(methods) > 1 and methods[1] == "block"


def master_port(env) -> int:
    """The job's port, another for each in-job round (launch.recovery.rounds): a rank of an earlier round that still
    runs cannot join a later one."""
    round_ = int(env.get(ROUND_VAR, "0") or 0)
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"]) + round_
    return slurm_port(env["SLURM_JOB_ID"], round_)


# A packed allocation's points each take the job's port moved by 64 a point (rounds move a port by 1 each): two
# points of several ranks side by side on one node never share a rendezvous port.
POINT_PORT_STRIDE = 64


def point_port(env, point: int) -> int:
    """The rendezvous port of packed point `point` (its index in the allocation) in round 0."""
    return master_port({**env, ROUND_VAR: "0"}) + POINT_PORT_STRIDE * point


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
