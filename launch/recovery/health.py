"""Node health before training, on every attempt: compute speed, a storage check (write, fsync, read back a file
in the run folder), and bus bandwidth. What the figures mean is launch.recovery.health_verdict.

On CPU each node's matmul speed is its ranks' together, and the nodes take turns (every rank of one node at once,
the others waiting): nodes of a local test cluster share one machine's cores, and measured at the same time they
would slow each other down. A node below `health.min_fraction` of the fastest after a round takes another turn, up
to `health.rounds` in all, keeping its best: load from elsewhere is not a slow node, and a healthy job pays one
turn per node. The verdict is against the median node; the turns are against the fastest, so that a healthy node
whose one turn met a load spike is measured again rather than pull the median down to a slow node's figure. The
bus figure is the preflight all-reduce's.

On GPUs every GPU is measured at once, on its own: a bf16 matmul of `health.gpu_matmul_size` (8192) timed with
CUDA events, as many as fill `health.gpu_seconds`; then nccl-tests' bus bandwidth of a `health.bus_mib` (128 MiB)
all-reduce within each node, and over the whole job across nodes, apart. The timer is the step's (PhaseClock):
wall time on CPU, where the same code runs in the tests."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gpt.config.sections import HealthConfig
from gpt.collectives.process_group import DistEnv, all_reduce_in_place, barrier, gather_objects, subgroups
from gpt.train.step_timer import PhaseClock
from launch.recovery.health_verdict import (BusBandwidth, GpuHealth, GpuVerdict, NodeHealth, below_fraction,
                                           bus_figures, bus_groups, matmul_iterations, node_sums)
from gpt.run_folder import RunFolder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZING, CHUNK_S = 3, 0.02  # matmuls timed to size the chunks; a chunk's seconds (about 13 8192^3 on an H100)
BUS_WARMUP, BUS_REPEATS = 2, 10  # nccl-tests' defaults are 5 and 20, over a range of sizes; one size needs fewer
# debug.slow_node on CPU: a node's turn stretched 6x, so it stays under min_fraction even when the other nodes' turns
# are slowed by load from elsewhere on a shared machine (at 3x a loaded healthy node left it at 0.82 of the median)
CPU_SLOW_DRAG = 6.0


def matmul_gflops(size: int, device: torch.device, dtype: torch.dtype, drag: float = 1.0,
                  seconds: float = 0.2) -> float:
    """CPU: GFLOP/s of size x size matmuls for about `seconds`; `drag` > 1 stretches the timed work
    (debug.slow_node)."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    elapsed = time.perf_counter() - start
    time.sleep(elapsed * (drag - 1))
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def storage_problem(run_dir: Path, name: str, size: int = 1 << 18) -> str | None:
    """None when a file written (and fsynced) into the run folder reads back the same; else what went wrong. The
    probe never stays behind: on a nearly full disk, a part written would take the room the run needs."""
    path = RunFolder(run_dir).health_probes / f"{name}.bin"
    data = os.urandom(size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        same = path.read_bytes() == data
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    return None if same else f"{path} read back different bytes"


def measure_nodes(cfg: HealthConfig, node: int, num_nodes: int, host: str, rank: int, device: torch.device,
                  precision: str, run_dir: Path, slow: bool = False,
                  known: dict[str, float] | None = None) -> list[NodeHealth]:
    """CPU: every rank takes part; every rank gets every node's figures. The nodes one after another (a node's
    ranks share its cores); a host in `known` (the same on every rank) keeps that figure and takes no turn."""
    known = known or {}
    skip = {n for n, h in gather_objects((node, host)) if h in known} if known else set()
    turns, best = [n for n in range(num_nodes) if n not in skip], 0.0
    for round_ in range(cfg.rounds):
        for turn in turns:
            barrier()
            if turn == node:
                gflops = matmul_gflops(cfg.matmul_size, device, DTYPES[precision], drag=CPU_SLOW_DRAG if slow else 1.0)
                best = max(best, gflops)
        if round_ + 1 < cfg.rounds:
            turns = sorted(set(turns) & below_fraction(node_sums(gather_objects((node, host, best)), known),
                                                        cfg.min_fraction, reference=max))
            if not turns:
                break
    barrier()
    storage = storage_problem(run_dir, f"{host}-rank{rank}")
    nodes: dict[int, NodeHealth] = {}
    for r, (n, h, g, s) in enumerate(gather_objects((node, host, best, storage))):
        was = nodes.get(n, NodeHealth(n, h, [], 0.0, None))
        nodes[n] = NodeHealth(n, h, was.ranks + [r], known.get(h, was.gflops + g), was.storage or s)
    return [nodes[n] for n in sorted(nodes)]


def gpu_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU computes it natively (the training precision the peak figures are quoted for)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def timed_matmuls(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, count: int) -> float:
    """Seconds the device spent on `count` back-to-back matmuls (events on CUDA: no launch gaps counted)."""
    clock = PhaseClock(a.device)
    for _ in range(count):
        torch.matmul(a, b, out=out)
    clock.mark("matmul")
    return clock.seconds()["matmul_s"]


def gpu_matmul_tflops(device: torch.device, size: int, budget_s: float, rounds: int, drag: float = 1.0) -> float:
    """TFLOP/s of one GPU, the best of `rounds` rounds that together take about `budget_s` of wall time. Each round
    runs chunks of about CHUNK_S and adds up their device time (a sync between chunks only bounds the round, it
    is not counted); `drag` > 1 runs that many times the matmuls for the same count (debug.slow_node: the device
    itself is busier)."""
    dtype = gpu_dtype(device)
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    timed_matmuls(a, b, out, 1)  # warm-up: the library picks its kernel
    chunk = matmul_iterations(timed_matmuls(a, b, out, SIZING) / SIZING, CHUNK_S)
    best = 0.0
    for _ in range(rounds):
        count, device_s, start = 0, 0.0, time.perf_counter()
        while time.perf_counter() - start < budget_s / rounds:
            device_s += timed_matmuls(a, b, out, round(chunk * drag))
            count += chunk
        best = max(best, 2 * size**3 * count / device_s / 1e12)
    return best


def timed_all_reduce(group, device: torch.device, nbytes: int) -> float:
    """Milliseconds per all-reduce of `nbytes` over `group`, on the device (the collective's stream joins the
    current one on return, so the clock's end event follows it)."""
    tensor = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    for _ in range(BUS_WARMUP):
        all_reduce_in_place(tensor, group)
    clock = PhaseClock(device)
    for _ in range(BUS_REPEATS):
        all_reduce_in_place(tensor, group)
    clock.mark("all_reduce")
    return clock.seconds()["all_reduce_s"] * 1e3 / BUS_REPEATS


def measure_bus(nodes: list[int], device: torch.device, nbytes: int) -> BusBandwidth | None:
    """Every rank takes part: an all-reduce within each node (groups of their own, created by every rank alike),
    then one over the whole job. A group's time is its slowest member's."""
    intra_groups, inter_group = bus_groups(nodes)
    times: dict[str, float] = {}
    if max(map(len, intra_groups)) > 1:  # every rank sees the same layout, so every rank decides alike
        mine = subgroups(intra_groups, "health_intra_node")  # one step for every node, not one world-wide step each
        barrier()
        if dist.get_world_size(mine) > 1:
            times["intra"] = timed_all_reduce(mine, device, nbytes)
        dist.destroy_process_group(mine)
    if inter_group:
        barrier()
        times["inter"] = timed_all_reduce(None, device, nbytes)
    return bus_figures(nodes, nbytes, gather_objects(times)) if times else None


def measure_gpus(cfg: HealthConfig, env: DistEnv, device: torch.device, run_dir: Path,
                 slow: bool = False) -> GpuVerdict:
    """GPUs: every rank takes part; every rank gets the verdict."""
    start = time.perf_counter()
    tflops = gpu_matmul_tflops(device, cfg.gpu_matmul_size, cfg.gpu_seconds, cfg.rounds, 3.0 if slow else 1.0)
    storage = storage_problem(run_dir, f"{env.hostname}-rank{env.rank}")
    rows = gather_objects((env.node_rank, env.hostname, device.index, tflops, storage))
    gpus = [GpuHealth(r, *row) for r, row in enumerate(rows)]
    bus = measure_bus([g.node for g in gpus], device, cfg.bus_mib << 20) if len(gpus) > 1 else None
    matmul = f"{str(gpu_dtype(device)).removeprefix('torch.')} {cfg.gpu_matmul_size}x{cfg.gpu_matmul_size}"
    return GpuVerdict(gpus, cfg.min_fraction, bus, matmul, time.perf_counter() - start)
