"""hydra.launcher.pack: a cluster=slurm sweep's points as job steps inside one allocation per group of points with
equal resources (launch.backends.slurm.pack_task runs them, each step with its own share). The allocation has
hydra.launcher.pack_nodes nodes: a point of K nodes runs on K of them of its own, as many points at once on each K
nodes as a node's CPUs, GPUs and memory hold. The plan (points per allocation, waves, node-hours against one job per
point) is printed before the budget guard, which counts the allocations, not the points. Torch-free."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from gpt.errors import ConfigError, UserError, error_line
from launch.backends import Point
from launch.backends.slurm import commands as slurm_commands, partitions
from launch.backends.slurm.partitions import mem_mb
from launch.backends.slurm.resources import SlurmResources, make_executor
from launch.backends.slurm.submitted import Submitted, show_path
from launch.backends.slurm.step import workdir


@dataclass(frozen=True)
class Node:
    """What the slots are counted on: the smallest node of the partition that holds a point (sinfo's)."""

    cpus: int
    gpus: int = 0
    mem_mb: int = 0  # 0: sinfo does not know it (no RealMemory), and memory is not counted
    of: int = 0  # how many such nodes the partition has: the most an allocation gets (0: not known)

    def slots(self, each: SlurmResources) -> dict[str, int]:
        """How many points of `each` the node holds at once, by each of its resources the points ask for."""
        asked = {"CPUs": (self.cpus, step_cpus(each)), "GPUs": (self.gpus, each.node_gpus),
                 "memory": (self.mem_mb, mem_mb(each.mem))}
        return {name: have // want for name, (have, want) in asked.items() if want and (have or name != "memory")}


def step_cpus(each: SlurmResources) -> int:
    return each.tasks_per_node * (each.cpus_per_task or 1)


@dataclass(frozen=True)
class Pack:
    """Points with equal resources, run `slots` at a time as steps of one allocation of `groups` x a point's nodes,
    `per_group` points at once on each group; `by`: what a node holds no more of (empty: the points all fit at
    once)."""

    points: tuple[Point, ...]
    per_group: int
    groups: int = 1
    by: str = ""

    @property
    def each(self) -> SlurmResources:
        return self.points[0].resources

    @property
    def slots(self) -> int:
        return self.per_group * self.groups

    @property
    def waves(self) -> int:
        return math.ceil(len(self.points) / self.slots)

    @property
    def step_cpus(self) -> int:
        return step_cpus(self.each)

    @property
    def resources(self) -> SlurmResources:
        """The allocation: one task (the packer) and on each node every slot's CPUs, GPUs and memory there, for as
        many time limits as waves."""
        each, n = self.each, self.per_group
        return dataclasses.replace(each, nodes=self.groups * each.nodes, tasks_per_node=1,
                                   cpus_per_task=n * self.step_cpus, time_min=self.waves * each.time_min,
                                   mem=f"{n * mem_mb(each.mem)}M" if each.mem else None, **gpu_request(each, n))

    def budget_point(self) -> Point:
        first = self.points[0]
        return Point(f"{len(self.points)} packed point(s) from {first.label}", first.run_dir, first.job_name,
                     self.resources)

    def line(self) -> str:
        apart = sum(p.resources.node_hours for p in self.points)
        res = self.resources
        gpus = f", {res.node_gpus} GPU(s)" if res.node_gpus else ""
        nodes = "1 node" if res.nodes == 1 else f"{res.nodes} nodes"
        own = f" (each on {self.each.nodes} node(s) of its own)" if self.each.nodes > 1 else ""
        full = "" if not self.by else f" (a node's {self.by} hold no more at once)" if res.nodes == 1 else (
            f" (its {res.nodes} nodes hold no more at once: a node's {self.by} hold {self.per_group} point(s))")
        return (f"{len(self.points)} point(s) ({self.points[0].label}, ...) in one allocation of {nodes} x "
                f"{res.cpus_per_task} CPU(s){gpus}: {self.slots} at once{own}, {self.waves} wave(s) of "
                f"{self.each.time_min} min{full}; {res.node_hours:.2f} node-hours against {apart:.2f} for one job "
                "per point")


def gpu_request(each: SlurmResources, slots: int) -> dict:
    """The allocation's GPUs, every slot's, in the form the points ask for theirs (a site may take only --gres; the
    allocation's one task cannot carry --gpus-per-task)."""
    if not each.node_gpus:
        return {}
    gres = each.gres or dict(each.sbatch).get("gres")
    if gres is None:
        return {"gpus_per_node": slots * each.node_gpus, "gpus_per_task": 0}
    fields = [f for f in str(gres).split(",") if f.split(":")[0] == "gpu"][0].split(":")
    kind = fields[1:-1] if fields[-1].isdigit() else fields[1:]  # gpu:a100:1, gpu:a100, gpu
    return {"gres": ":".join(["gpu", *kind, str(slots * each.node_gpus)]), "gpus_per_node": 0, "gpus_per_task": 0,
            "sbatch": tuple((k, v) for k, v in each.sbatch if k != "gres")}


def packable(point: Point, nodes: int, partition_nodes: int = 0) -> None:
    """A point that needs more nodes than the allocation's `nodes` (or the partition's), or an allocation's own
    features, is refused in one line."""
    r = point.resources
    if partition_nodes and r.nodes > partition_nodes:
        raise UserError(f"point {point.label} asks for nodes={r.nodes}, more than its partition's {partition_nodes} "
                        "node(s) that hold it")
    if r.nodes > nodes:
        raise ConfigError("hydra.launcher.pack_nodes", nodes, f"at least {r.nodes} for point {point.label}, which "
                          f"asks for nodes={r.nodes}: each packed point runs on nodes of its own in the allocation")
    why = ("cluster.chain" if r.chain > 1 else "cluster.spare_nodes" if r.spare_nodes else "a container"
           if r.step.image else "a node's whole memory (cluster.mem=0)" if r.mem is not None and mem_mb(r.mem) == 0
           else None)
    if why:
        raise ConfigError("hydra.launcher.pack", True, f"false for point {point.label}, which asks for {why}: packing "
                          "runs points that each fit in a share of the allocation's nodes as steps of one allocation")


def smallest_node(resources: SlurmResources) -> Node:
    """The smallest node of the partition the points run on (CPUs, GPUs, memory) among those that have their GPUs."""
    part = partitions.check_against_cluster(resources, partitions.read_partitions())
    fit = [g for g in part.groups if g[3] >= resources.node_gpus] or part.groups
    return Node(min(g[1] for g in fit), min(g[3] for g in fit), min(g[2] for g in fit), sum(g[0] for g in fit))


def plan(points: list[Point], node: Node, nodes: int = 1) -> list[Pack]:
    """One pack per group of equal resources (each point's own job name included) in an allocation of up to `nodes`
    nodes (the partition's at most): its points' nodes as many times as fit, each holding as many points at once as
    `node` holds."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        packable(p, nodes, node.of)
        groups.setdefault((p.resources, p.job_name), []).append(p)
    packs = []
    for group in groups.values():
        each, slots = group[0].resources, node.slots(group[0].resources)
        for name in [name for name, n in slots.items() if n < 1][:1]:
            want, have = {"CPUs": (step_cpus(each), node.cpus), "GPUs": (each.node_gpus, node.gpus),
                          "memory": (f"{mem_mb(each.mem)} MB", f"{node.mem_mb} MB")}[name]
            raise ConfigError("hydra.launcher.pack", True, f"false for point {group[0].label}: its {want} {name} are "
                              f"more than a node's {have}")
        fewest = min(slots.values())
        most = min(nodes, node.of or nodes) // each.nodes  # groups of a point's nodes
        by = "" if fewest * most >= len(group) else next(n for n, k in slots.items() if k == fewest)
        used = min(most, math.ceil(len(group) / fewest))  # no node the points leave idle
        packs.append(Pack(tuple(group), min(fewest, math.ceil(len(group) / used)), used, by))
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
    # the packer runs in the batch step, not a step of its own: a preemption's SIGTERM reaches every process of the
    # job's steps, and an srun that gets it kills its step at once (measured on Slurm 22.05: "forcing job
    # termination", whether SIGTERM is ignored or blocked), so the points' steps would die inside the grace time
    # instead of saving; the batch step is signalled only by the requeue that follows
    executor.update_parameters(use_srun=False)
    run_dirs = tuple(str(p.run_dir) for p in pack.points)
    job = executor.submit(PackTask(run_dirs, pack.per_group, pack.each.nodes))
    submitted = []
    for p in pack.points:
        s = Submitted(p, job.job_id, folder, packed=True)
        s.record(res)
        submitted.append(s)
    print(f"submitted job {job.job_id} for {len(pack.points)} packed point(s): {res.describe()}; log: "
          f"{show_path(submitted[-1].paths(0).stdout)}", file=out, flush=True)
    return submitted
