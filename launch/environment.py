"""The one place that knows how a rank was started: Slurm (srun), torchrun-style variables, or a plain process.

Everything else receives a gpt.distributed.DistEnv: rank, world size, local rank, node, master address and port.
"""
from __future__ import annotations

import os
import socket
import subprocess

from gpt.distributed import DistEnv
from gpt.errors import UserError

# Ports for a Slurm job are derived from its id, so every task computes the same one without talking.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return _from_slurm(env)
    return DistEnv()


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
    return DistEnv(
        rank=int(env["SLURM_PROCID"]),
        world_size=world,
        local_rank=int(env.get("SLURM_LOCALID", 0)),
        local_world_size=world // nodes,
        node_rank=int(env.get("SLURM_NODEID", 0)),
        num_nodes=nodes,
        master_addr=env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
        master_port=int(env.get("MASTER_PORT") or slurm_port(env["SLURM_JOB_ID"])),
        hostname=socket.gethostname(),
    )


def slurm_port(job_id: str) -> int:
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def first_host(nodelist: str) -> str:
    """The job's first host, expanded by Slurm itself. Never a localhost fallback: on a multi-node job that
    would make every node wait for a world of its own."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with 'scontrol show hostnames': {e}. "
                        "Make scontrol available inside the job, or set MASTER_ADDR yourself.") from e
    if not out:
        raise UserError(f"'scontrol show hostnames {nodelist}' returned no host")
    return out[0]
