"""Which GPU each rank drives (or would drive, on a CPU run of a GPU job), from what its scheduler showed it, and
the check of every rank's plan at the rendezvous, before NCCL starts: two ranks of one host on one GPU would fail
there ("Duplicate GPU detected"), hang, or share it silently."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from gpt.collectives.process_group import DistEnv
from launch.rank.environment import visible_gpus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuPlan:
    rank: int
    host: str
    visible: tuple[str, ...] | None  # CUDA_VISIBLE_DEVICES as this task got it (None: unset, every GPU of the host)
    index: int                       # the device index it drives among them (torch.device("cuda", index))
    gpu_bind: str | None             # SLURM_GPU_BIND (--gpu-bind), when Slurm placed the task
    cpus_per_task: int | None        # SLURM_CPUS_PER_TASK: the CPUs Slurm gave this task
    cpus_on_node: int | None         # SLURM_CPUS_ON_NODE: the CPUs the job step holds on this host

    @classmethod
    def of(cls, env: DistEnv, environ: Mapping[str, str], index: int | None = None) -> GpuPlan:
        """`index`: the GPU the rank took (pick_device), where it differs from its plan's (debug.share_gpu)."""
        visible = visible_gpus(environ)
        planned = env.local_rank if env.device_index is None else env.device_index
        return cls(rank=env.rank, host=env.hostname, visible=None if visible is None else tuple(visible),
                   index=planned if index is None else index,
                   gpu_bind=environ.get("SLURM_GPU_BIND"), cpus_per_task=_int(environ.get("SLURM_CPUS_PER_TASK")),
                   cpus_on_node=_int(environ.get("SLURM_CPUS_ON_NODE")))

    def card(self) -> dict:
        """What this rank leaves at the rendezvous for rank 0's check (JSON)."""
        return asdict(self)

    @classmethod
    def from_card(cls, card: dict) -> GpuPlan:
        visible = card.get("visible")
        return cls(**{**card, "visible": None if visible is None else tuple(str(v) for v in visible)})

    @property
    def gpu(self) -> str:
        """The GPU as its host names it (CUDA_VISIBLE_DEVICES' entry), whatever this task's index for it."""
        return self.visible[self.index] if self.visible else str(self.index)

    def record(self) -> dict:
        """For environment/rank<R>.json."""
        return {**asdict(self), "visible": None if self.visible is None else ",".join(self.visible), "gpu": self.gpu}


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def shared_gpus(plans: list[GpuPlan]) -> str | None:
    """One line naming the GPUs that more than one rank of a host would drive; None when every rank has its own."""
    owners: dict[tuple[str, str], list[int]] = {}
    for plan in plans:
        owners.setdefault((plan.host, plan.gpu), []).append(plan.rank)
    shared = [f"GPU {gpu} on {host} by ranks {', '.join(map(str, ranks))}"
              for (host, gpu), ranks in owners.items() if len(ranks) > 1]
    if not shared:
        return None
    first = next(p for p in plans if len(owners[(p.host, p.gpu)]) > 1)
    shown = ",".join(first.visible) if first.visible is not None else "unset"
    return (f"more than one rank per GPU: {'; '.join(shared)} (rank {first.rank} sees CUDA_VISIBLE_DEVICES={shown}); "
            "run one task per GPU: sbatch --ntasks-per-node equal to --gpus-per-node, or --gpus-per-task=1 (or "
            "debug.share_gpu=true to debug on shared GPUs over gloo)")


def describe(plans: list[GpuPlan]) -> str:
    """One line per host: which GPU each rank drives, and the CPUs Slurm gave each task."""
    lines = []
    for host in dict.fromkeys(p.host for p in plans):
        mine = [p for p in plans if p.host == host]
        ranks = ", ".join(f"rank {p.rank} -> GPU {p.gpu}" for p in mine)
        cpus = {p.cpus_per_task for p in mine}
        extra = f"; {cpus.pop()} CPU(s) per task" if len(cpus) == 1 and None not in cpus else ""
        bind = f"; --gpu-bind={mine[0].gpu_bind}" if mine[0].gpu_bind else ""
        lines.append(f"{host}: {ranks}{bind}{extra}")
    return "; ".join(lines)


def vet_gpus(device: torch.device, plans: list[GpuPlan], share: bool = False) -> str | None:
    """Rank 0, with every rank's plan, before the process group starts NCCL (which would fail on, or hang at, two
    ranks on one GPU): logs which GPU each rank drives, and returns the line that stops a GPU run whose ranks share
    one. A CPU run of a GPU job (train.device=cpu) drives none, and only warns; so does a run that shares GPUs on
    purpose (debug.share_gpu: gloo, no NCCL)."""
    shared = shared_gpus(plans)
    if device.type == "cuda" or any(p.visible is not None for p in plans):
        log.info("GPUs: %s", describe(plans))
    if shared and device.type == "cuda" and not share:
        return shared
    if shared and share:
        log.warning("debug.share_gpu: ranks share GPUs over gloo's CUDA collectives, for debugging only (no NCCL: "
                    "neither its timeline, its aborts nor its speed)")
        return None
    if shared:
        log.warning("%s (this run trains on %s)", shared, device.type)
    return None
