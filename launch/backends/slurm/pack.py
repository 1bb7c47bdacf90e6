"""hydra.launcher.pack: a cluster=slurm sweep's one-node points as job steps inside one allocation per group of points
with equal resources, as many at once as the node's CPUs hold (launch.backends.slurm.pack_task runs them). The plan
(points per allocation, waves, node-hours against one job per point) is printed before the budget guard, which
counts the allocations, not the points. Torch-free."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from gpt.errors import ConfigError, UserError, error_line
from launch.backends import Point
from launch.backends.slurm import commands as slurm_commands, partitions
from launch.backends.slurm.resources import SlurmResources, make_executor
from launch.backends.slurm.submitted import Submitted, show_path
from launch.backends.slurm.step import workdir


@dataclass(frozen=True)
class Pack:
    """Points with equal resources, run `slots` at a time as steps of one single-task allocation."""

    points: tuple[Point, ...]
    slots: int

    @property
    def each(self) -> SlurmResources:
        return self.points[0].resources

    @property
    def waves(self) -> int:
        return math.ceil(len(self.points) / self.slots)

    @property
    def step_cpus(self) -> int:
        return self.each.tasks_per_node * (self.each.cpus_per_task or 1)

    @property
    def resources(self) -> SlurmResources:
        """The allocation: one task (the packer) holding every slot's CPUs, for as many time limits as waves."""
        return dataclasses.replace(self.each, nodes=1, tasks_per_node=1, cpus_per_task=self.slots * self.step_cpus,
                                   time_min=self.waves * self.each.time_min)

    def budget_point(self) -> Point:
        first = self.points[0]
        return Point(f"{len(self.points)} packed point(s) from {first.label}", first.run_dir, first.job_name,
                     self.resources)

    def line(self) -> str:
        apart = sum(p.resources.node_hours for p in self.points)
        return (f"{len(self.points)} point(s) ({self.points[0].label}, ...) in one allocation of 1 node x "
                f"{self.resources.cpus_per_task} CPU(s): {self.slots} at once, {self.waves} wave(s) of "
                f"{self.each.time_min} min; {self.resources.node_hours:.2f} node-hours against {apart:.2f} for one "
                "job per point")


def packable(point: Point) -> None:
    """A point that needs a node or more of its own, or an allocation's own features, is refused in one line."""
    r = point.resources
    why = ("more than one node" if r.nodes > 1 else "GPUs" if r.node_gpus else "cluster.chain" if r.chain > 1
           else "cluster.spare_nodes" if r.spare_nodes else "a container" if r.step.image else None)
    if why:
        raise ConfigError("hydra.launcher.pack", True, f"false for point {point.label}, which asks for {why}: packing "
                          "runs points of one node's CPUs as steps of one allocation")


def node_cpus(resources: SlurmResources) -> int:
    """CPUs of the smallest node of the partition the points run on."""
    part = partitions.check_against_cluster(resources, partitions.read_partitions())
    return min(cpus for _, cpus, _, _ in part.groups)


def plan(points: list[Point], cpus: int) -> list[Pack]:
    """One pack per group of equal resources (each point's own job name included), its slots what `cpus` hold."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        packable(p)
        groups.setdefault((p.resources, p.job_name), []).append(p)
    packs = []
    for group in groups.values():
        step = group[0].resources.tasks_per_node * (group[0].resources.cpus_per_task or 1)
        if step > cpus:
            raise ConfigError("hydra.launcher.pack", True, f"false for point {group[0].label}: its {step} CPU(s) are "
                              f"more than a node's {cpus}")
        packs.append(Pack(tuple(group), min(len(group), cpus // step)))
    return packs


def print_plan(packs: list[Pack], out=sys.stdout) -> None:
    print(f"hydra.launcher.pack: {sum(len(p.points) for p in packs)} point(s) in {len(packs)} allocation(s)", file=out)
    for pack in packs:
        print(f"  {pack.line()}", file=out, flush=True)


def submit(packs: list[Pack], folder: Path, out=sys.stdout) -> list[Submitted]:
    """One job per pack; each point's run folder records it (slurm_job.json, `packed`), as a job of its own does."""
    here = workdir()
    submitted: list[Submitted] = []
    try:
        for pack in packs:
            submitted += submit_pack(pack, folder, here, out)
    except Exception as e:  # a sweep starts whole or not at all
        slurm_commands.cancel(sorted({s.job_id for s in submitted}))
        raise UserError(f"Slurm refused a packed job of this sweep: {error_line(e, prefer_error=True)}") from None
    return submitted


def submit_pack(pack: Pack, folder: Path, here: Path, out) -> list[Submitted]:
    from launch.backends.slurm.pack_task import PackTask

    res = pack.resources
    executor = make_executor(res, folder, pack.points[0].job_name, here)
    # the packer's own step overlaps the points' steps: each of those gets its CPUs with --exact
    srun_args = res.executor_parameters(pack.points[0].job_name, here, folder)["srun_args"]
    executor.update_parameters(srun_args=[*srun_args, "--overlap"])
    job = executor.submit(PackTask(tuple(str(p.run_dir) for p in pack.points), pack.slots))
    submitted = []
    for p in pack.points:
        s = Submitted(p, job.job_id, folder, packed=True)
        s.record(res)
        submitted.append(s)
    print(f"submitted job {job.job_id} for {len(pack.points)} packed point(s): {res.describe()}; log: "
          f"{show_path(submitted[-1].paths(0).stdout)}", file=out, flush=True)
    return submitted
