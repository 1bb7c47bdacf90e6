"""What a run folder records about where and how it ran: the resolved config and each rank's environment."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from gpt.collectives.process_group import DistEnv
from gpt.run_folder import RunFolder, write_json

PACKAGES = ("torch", "numpy", "hydra-core", "omegaconf", "submitit", "tensorboard", "tokenizers", "deepspeed",
            "gptlaunch")


def git_commit(repo: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_id() -> str | None:
    """The running kernel's boot id: equal for every "node" that is really a namespace of one machine."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def cpu_affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def environment(env: DistEnv, device: torch.device) -> dict:
    """What this rank runs on. The GPU is the one it drives (never GPU 0's name for every rank), and none on a CPU
    run: asking would open a CUDA context on a GPU host."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "node_rank": env.node_rank,
        "num_nodes": env.num_nodes,
        "host": env.hostname,
        "master": f"{env.master_addr}:{env.master_port}",
        "pid": os.getpid(),
        "machine_id": machine_id(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": cpu_affinity(),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "git_commit": git_commit(Path(__file__).resolve().parents[2]),
    }


def write_environment(run_dir: Path, env: DistEnv, device: torch.device, extra: dict | None = None) -> None:
    folder = RunFolder(run_dir)
    folder.environment.mkdir(parents=True, exist_ok=True)
    write_json(folder.environment_record(env.rank), {**environment(env, device), **(extra or {})}, indent=1)


def cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5', as taskset and Slurm write it."""
    runs: list[list[int]] = []
    for c in cpus:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
