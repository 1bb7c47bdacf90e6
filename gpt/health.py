"""Node health before training, on every attempt: each node's matmul speed in the run's precision, a storage check
(write, fsync, read back a file in the run folder), and the bus bandwidth of the preflight all-reduce. A node
below `health.min_fraction` of the median node, or failing storage, is named with its figures.

Nodes of a local test cluster share one machine's cores: measured at the same time they would slow each other
down, and a neighbour's test would look like a slow node. So the nodes take turns (every rank of one node at
once, the others waiting), in `health.rounds` rounds, and each node keeps its best turn.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt.distributed import barrier, gather_objects
from gpt.run_config import HealthConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_gflops(size: int, device: torch.device, dtype: torch.dtype, drag: float = 1.0,
                  seconds: float = 0.2) -> float:
    """GFLOP/s of size x size matmuls for about `seconds`; `drag` > 1 stretches the timed work (debug.slow_node)."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    time.sleep(elapsed * (drag - 1))
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def storage_problem(run_dir: Path, name: str, size: int = 1 << 20) -> str | None:
    """None when a file written (and fsynced) into the run folder reads back the same; else what went wrong."""
    path = run_dir / "health" / f"{name}.bin"
    data = os.urandom(size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        same = path.read_bytes() == data
        path.unlink()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None if same else f"{path} read back different bytes"


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


def measure(cfg: HealthConfig, node: int, num_nodes: int, host: str, rank: int, device: torch.device,
            precision: str, run_dir: Path, slow: bool = False) -> list[NodeHealth]:
    """Every rank takes part; every rank gets every node's figures."""
    best = 0.0
    for _ in range(cfg.rounds):
        for turn in range(num_nodes):
            barrier()
            if turn == node:
                gflops = matmul_gflops(cfg.matmul_size, device, DTYPES[precision], drag=3.0 if slow else 1.0)
                best = max(best, gflops)
    barrier()
    storage = storage_problem(run_dir, f"{host}-rank{rank}")
    nodes: dict[int, NodeHealth] = {}
    for r, (n, h, g, s) in enumerate(gather_objects((node, host, best, storage))):
        was = nodes.get(n, NodeHealth(n, h, [], 0.0, None))
        nodes[n] = NodeHealth(n, h, was.ranks + [r], was.gflops + g, was.storage or s)
    return [nodes[n] for n in sorted(nodes)]


@dataclass(frozen=True)
class Verdict:
    nodes: list[NodeHealth]
    min_fraction: float
    bus_gbps: float | None

    @property
    def median(self) -> float:
        figures = sorted(n.gflops for n in self.nodes)
        mid = len(figures) // 2
        return figures[mid] if len(figures) % 2 else (figures[mid - 1] + figures[mid]) / 2

    @property
    def flagged(self) -> list[NodeHealth]:
        return [n for n in self.nodes if n.storage or n.gflops < self.min_fraction * self.median]

    def summary(self) -> str:
        figures = [n.gflops for n in self.nodes]
        bus = f"; all-reduce bus bandwidth {self.bus_gbps:.2f} GB/s" if self.bus_gbps else ""
        return (f"health: {len(self.nodes)} node(s), matmul {min(figures):.1f}-{max(figures):.1f} GFLOP/s "
                f"(median {self.median:.1f}){bus}")

    def as_dict(self) -> dict:
        return {"median_gflops": self.median, "min_fraction": self.min_fraction, "bus_gbps": self.bus_gbps,
                "nodes": [{**n.__dict__, "fraction": round(n.gflops / self.median, 3)} for n in self.nodes],
                "flagged": [n.host for n in self.flagged]}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=1))


def bus_bandwidth_gbps(world: int, nbytes: int, ms: float) -> float | None:
    """An all-reduce's bus bandwidth (NCCL-tests' convention: 2(n-1)/n of the bytes, over the time)."""
    if world < 2 or not ms:
        return None
    return 2 * (world - 1) / world * nbytes / (ms / 1e3) / 1e9
