"""What the health figures mean, torch-free: the verdict on CPU nodes (each node's ranks summed, against the median
node) and on GPUs (each GPU against its node's median and the job's median), the bus bandwidth of an all-reduce
as nccl-tests computes it, and how many matmuls fill a chunk of the GPU check's time."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

from gpt.run_folder import write_json


def bus_bandwidth_gbps(world: int, nbytes: int, ms: float) -> float | None:
    """An all-reduce's bus bandwidth in GB/s (1e9 bytes), as nccl-tests reports it: algbw = bytes / time, and
    busbw = algbw * 2(n-1)/n, what each rank's link carries (comparable across n, unlike algbw)."""
    if world < 2 or not ms:
        return None
    return 2 * (world - 1) / world * nbytes / (ms / 1e3) / 1e9


def matmul_iterations(one_s: float, budget_s: float, least: int = 3) -> int:
    """How many matmuls of `one_s` seconds each fill `budget_s`: at least `least`, so that a GPU too slow for the
    budget is still measured on more than one launch."""
    return max(least, math.floor(budget_s / one_s)) if one_s > 0 else least


def bus_groups(nodes: list[int]) -> tuple[list[list[int]], list[int] | None]:
    """Who all-reduces with whom, from each rank's node: the ranks of each node (intra-node; a node with one
    rank has nothing to measure), and the whole job when it spans nodes (inter-node: what nccl-tests reports on
    several nodes, bounded by the network)."""
    by_node: dict[int, list[int]] = {}
    for rank, node in enumerate(nodes):
        by_node.setdefault(node, []).append(rank)
    intra = [by_node[n] for n in sorted(by_node)]
    return intra, list(range(len(nodes))) if len(intra) > 1 else None



def node_sums(figures: list[tuple[int, str, float]], known: dict[str, float]) -> dict[int, float]:
    """Each node's GFLOP/s, its ranks' (node, host, GFLOP/s) summed; a host in `known` keeps its known figure."""
    sums: dict[int, float] = {}
    for n, host, gflops in figures:
        sums[n] = known[host] if host in known else sums.get(n, 0.0) + gflops
    return sums


def below_fraction(figures: dict[int, float], min_fraction: float, reference=median) -> set[int]:
    """The nodes whose figure is below `min_fraction` of the reference node's (the median's; max: the fastest's)."""
    bar = min_fraction * reference(figures.values())
    return {n for n, gflops in figures.items() if gflops < bar}

@dataclass(frozen=True)
class BusBandwidth:
    """nccl-tests' busbw (GB/s) of a `nbytes` all-reduce: within each node that has several ranks, and over the
    whole job when it spans nodes (None on one node)."""

    nbytes: int
    intra_gbps: dict[int, float]  # node -> busbw among its ranks
    inter_gbps: float | None

    def describe(self) -> str:
        parts = [f"all-reduce of {self.nbytes / 2**20:.0f} MiB, nccl-tests busbw:"]
        if self.intra_gbps:
            low, high = min(self.intra_gbps.values()), max(self.intra_gbps.values())
            parts.append(f"intra-node {low:.1f}-{high:.1f} GB/s" if low != high else f"intra-node {low:.1f} GB/s")
        if self.inter_gbps is not None:
            parts.append(f"inter-node {self.inter_gbps:.1f} GB/s")
        return " ".join(parts) if len(parts) > 1 else ""


def bus_figures(nodes: list[int], nbytes: int, times: list[dict[str, float]]) -> BusBandwidth:
    """The bus bandwidths from every rank's milliseconds per all-reduce ({"intra": ms, "inter": ms}, in rank order):
    a group's all-reduce ends when its slowest member's does."""
    intra_groups, inter_group = bus_groups(nodes)

    def busbw(kind: str, group: list[int]) -> float | None:
        return bus_bandwidth_gbps(len(group), nbytes, max(times[r][kind] for r in group))

    intra = {nodes[g[0]]: busbw("intra", g) for g in intra_groups if len(g) > 1}
    return BusBandwidth(nbytes, intra, busbw("inter", inter_group) if inter_group else None)


@dataclass(frozen=True)
class NodeHealth:
    node: int
    host: str
    ranks: list[int]
    gflops: float  # the node's ranks together, at its best turn
    storage: str | None

    def describe(self, median: float) -> str:
        ranks = ",".join(map(str, self.ranks))
        return (f"node {self.node} ({self.host}, rank{'s' if len(self.ranks) > 1 else ''} {ranks}): "
                f"{self.gflops:.1f} GFLOP/s, {self.gflops / median:.2f} of the median {median:.1f}"
                + (f"; storage: {self.storage}" if self.storage else ""))


class Verdict(ABC):
    """What the gate needs of a verdict: the hosts to name (and maybe exclude), one line per problem, a summary,
    and the record it writes."""

    @property
    @abstractmethod
    def flagged_hosts(self) -> list[str]: ...

    @abstractmethod
    def problems(self) -> list[str]: ...

    @abstractmethod
    def summary(self) -> str: ...

    @abstractmethod
    def as_dict(self) -> dict: ...

    def write(self, path: Path) -> None:
        write_json(path, self.as_dict(), indent=1)


@dataclass(frozen=True)
class NodeVerdict(Verdict):
    """CPU runs: a node whose ranks together fall below `min_fraction` of the median node, or fail storage."""

    nodes: list[NodeHealth]
    min_fraction: float
    bus_gbps: float | None

    @property
    def median(self) -> float:
        return median([n.gflops for n in self.nodes])

    @property
    def flagged(self) -> list[NodeHealth]:
        slow = below_fraction({n.node: n.gflops for n in self.nodes}, self.min_fraction)
        return [n for n in self.nodes if n.storage or n.node in slow]

    @property
    def flagged_hosts(self) -> list[str]:
        return [n.host for n in self.flagged]

    def problems(self) -> list[str]:
        return [n.describe(self.median) for n in self.flagged]

    def summary(self) -> str:
        figures = [n.gflops for n in self.nodes]
        bus = f"; all-reduce bus bandwidth {self.bus_gbps:.2f} GB/s" if self.bus_gbps else ""
        return (f"health: {len(self.nodes)} node(s), matmul {min(figures):.1f}-{max(figures):.1f} GFLOP/s "
                f"(median {self.median:.1f}){bus}")

    def as_dict(self) -> dict:
        return {"median_gflops": self.median, "min_fraction": self.min_fraction, "bus_gbps": self.bus_gbps,
                "nodes": [{**n.__dict__, "fraction": round(n.gflops / self.median, 3)} for n in self.nodes],
                "flagged": self.flagged_hosts}


@dataclass(frozen=True)
class GpuHealth:
    rank: int
    node: int
    host: str
    device: int | None  # the CUDA index the rank drives
    tflops: float  # its matmul speed, at its best round
    storage: str | None


@dataclass(frozen=True)
class GpuVerdict(Verdict):
    """GPU runs: each GPU is judged on its own, against its node's median (one sick GPU among healthy ones) and
    against the job's median (a node whose GPUs are all slow looks healthy to its own median). A node is named
    for any such GPU, for failing storage, or for an intra-node bus bandwidth below `min_fraction` of the
    median node's."""

    gpus: list[GpuHealth]
    min_fraction: float
    bus: BusBandwidth | None
    matmul: str  # what was timed: "bf16 8192x8192"
    seconds: float  # how long the checks took (rank 0)

    @property
    def job_median(self) -> float:
        return median([g.tflops for g in self.gpus])

    def node_median(self, node: int) -> float:
        return median([g.tflops for g in self.gpus if g.node == node])

    def shares(self, gpu: GpuHealth) -> tuple[float, float]:
        """The GPU's speed as a share of its node's median, and of the job's."""
        return gpu.tflops / self.node_median(gpu.node), gpu.tflops / self.job_median

    def slow_gpus(self) -> list[GpuHealth]:
        return [g for g in self.gpus if min(self.shares(g)) < self.min_fraction]

    def slow_bus_nodes(self) -> list[int]:
        intra = self.bus.intra_gbps if self.bus else {}
        if len(intra) < 2:
            return []
        middle = median(list(intra.values()))
        return [n for n, gbps in intra.items() if gbps < self.min_fraction * middle]

    def _hosts(self) -> dict[int, str]:
        return {g.node: g.host for g in self.gpus}

    @property
    def flagged_hosts(self) -> list[str]:
        nodes = ({g.node for g in self.slow_gpus()} | {g.node for g in self.gpus if g.storage}
                 | set(self.slow_bus_nodes()))
        return [self._hosts()[n] for n in sorted(nodes)]

    def describe(self, gpu: GpuHealth) -> str:
        of_node, of_job = self.shares(gpu)
        return (f"GPU {gpu.device} of node {gpu.node} ({gpu.host}, rank {gpu.rank}): {gpu.tflops:.1f} TFLOP/s, "
                f"{of_node:.2f} of its node's median {self.node_median(gpu.node):.1f}, "
                f"{of_job:.2f} of the job's median {self.job_median:.1f}")

    def problems(self) -> list[str]:
        hosts = self._hosts()
        lines = [self.describe(g) for g in self.slow_gpus()]
        lines += [f"node {g.node} ({g.host}, rank {g.rank}): storage: {g.storage}" for g in self.gpus if g.storage]
        slow_bus = self.slow_bus_nodes()  # none where no node has two ranks (one GPU per node): no intra figure
        if slow_bus:
            middle = median(list(self.bus.intra_gbps.values()))
            lines += [f"node {n} ({hosts[n]}): intra-node busbw {self.bus.intra_gbps[n]:.1f} GB/s, "
                      f"{self.bus.intra_gbps[n] / middle:.2f} of the median node's {middle:.1f}" for n in slow_bus]
        return lines

    def summary(self) -> str:
        figures = [g.tflops for g in self.gpus]
        bus = f"; {self.bus.describe()}" if self.bus and self.bus.describe() else ""
        return (f"health: {len(self.gpus)} GPU(s) on {len(self._hosts())} node(s), {self.matmul} matmul "
                f"{min(figures):.1f}-{max(figures):.1f} TFLOP/s per GPU (job median {self.job_median:.1f})"
                f"{bus}; checks took {self.seconds:.1f} s")

    def as_dict(self) -> dict:
        job = self.job_median
        nodes = [{"node": n, "host": h, "ranks": [g.rank for g in self.gpus if g.node == n],
                  "median_tflops": self.node_median(n), "fraction": round(self.node_median(n) / job, 3),
                  "intra_busbw_gbps": self.bus.intra_gbps.get(n) if self.bus else None,
                  "storage": next((g.storage for g in self.gpus if g.node == n and g.storage), None)}
                 for n, h in sorted(self._hosts().items())]
        gpus = [{**asdict(g), "of_node": round(self.shares(g)[0], 3), "of_job": round(self.shares(g)[1], 3)}
                for g in self.gpus]
        return {"matmul": self.matmul, "median_tflops": job, "min_fraction": self.min_fraction,
                "seconds": round(self.seconds, 3), "bus": asdict(self.bus) if self.bus else None,
                "nodes": nodes, "gpus": gpus, "flagged": self.flagged_hosts}
