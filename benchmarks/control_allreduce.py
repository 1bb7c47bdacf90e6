"""What the step's flags cost to sum over the ranks (the stop votes and flags of gpt.train.trainer's `sync`: a few
floats every step), gloo's ring all-reduce beside gptlaunch's recursive doubling (gpt.collectives.flag_sum), at 2 to 32
ranks on this machine, fitted against the ranks and projected to 64, 512 and 8,192.

    python benchmarks/control_allreduce.py [--ranks 2 4 8 16 32] [--calls 200] [--step-ms 5]

Per size, N gloo processes on this machine, the two ways interleaved call by call:
- ring: gloo's all_reduce, blocking, back to back: the median seconds per call;
- doubling: gpt.collectives.flag_sum.sum_in_background, waited for at once: the median seconds per call;
- overlapped: the trainer's way, cast and waited for one simulated step (--step-ms of sleep) later: the median
  seconds still waited, what stays on the step's path.
Past 2 ranks the processes outnumber this machine's cores, so every wall time here grows at least linearly (each
rank must be scheduled to take part): it measures this machine, not the algorithm. What a cluster pays is the
critical path: hops in sequence (ring 2(n-1); doubling log2(n), +2 when n is not a power of two) times one hop's
latency, measured at 2 ranks. The table prints both. Writes benchmarks/results/control_allreduce.json.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import save_results  # noqa: E402
from benchmarks.control_plane import fit_growth  # noqa: E402
from gpt.collectives.flag_sum import doubling_rounds, sum_in_background  # noqa: E402

VALUES = [0.0, 0.0, 0.0, 0.0]  # checkpoint writing, interval due, one vote per handled signal (two by default)
PROJECT = (64, 512, 8192)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ring_hops(n: int) -> int:
    return 2 * (n - 1)


def doubling_hops(n: int) -> int:
    return max(len(doubling_rounds(r, n)) for r in range(n))


def rank_main(rank: int, world: int, port: int, calls: int, step_s: float, out: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ring_group, doubling_group = dist.new_group(backend="gloo"), dist.new_group(backend="gloo")

    def ring() -> float:
        start = time.perf_counter()
        dist.all_reduce(torch.tensor(VALUES, dtype=torch.float64), group=ring_group)
        return time.perf_counter() - start

    def doubling() -> float:
        start = time.perf_counter()
        sum_in_background(VALUES, doubling_group).wait()
        return time.perf_counter() - start

    for _ in range(20):  # warm-up: connections made, buffers allocated
        ring(), doubling()
    dist.barrier()
    times = [(ring(), doubling()) for _ in range(calls)]
    dist.barrier()
    waited = []
    for _ in range(calls // 4):
        cast = sum_in_background(VALUES, doubling_group)
        time.sleep(step_s)  # the step's compute, during which the votes travel
        waited.append(cast.wait()[0])
    medians = [statistics.median(t[0] for t in times), statistics.median(t[1] for t in times),
               statistics.median(waited)]
    t = torch.tensor(medians, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's: every rank waits for it
    if rank == 0:
        out.put(t.tolist())
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, calls: int, step_s: float) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(rank_main, args=(world, free_port(), calls, step_s, out), nprocs=world, start_method="spawn")
    ring, doubling, overlapped = (v * 1e3 for v in out.get(timeout=120))
    return {"ranks": world, "ring_ms": ring, "doubling_ms": doubling, "overlapped_wait_ms": overlapped,
            "ring_hops": ring_hops(world), "doubling_hops": doubling_hops(world)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=5.0)
    args = parser.parse_args()
    rows = []
    print(f"{os.cpu_count()} cores; {len(VALUES)} float64 values per sum; simulated step {args.step_ms} ms")
    print(f"{'ranks':>6} {'ring ms':>9} {'doubling ms':>12} {'overlapped wait ms':>19} {'hops ring/doubling':>19}")
    for world in args.ranks:
        row = measure(world, args.calls, args.step_ms / 1e3)
        rows.append(row)
        print(f"{world:>6} {row['ring_ms']:>9.3f} {row['doubling_ms']:>12.3f} {row['overlapped_wait_ms']:>19.3f} "
              f"{row['ring_hops']:>10}/{row['doubling_hops']}")
    xs = [r["ranks"] for r in rows]
    fits = {key: fit_growth(xs, [r[key] for r in rows]) for key in ("ring_ms", "doubling_ms", "overlapped_wait_ms")}
    for key, fit in fits.items():
        print(f"{key} on this machine: {fit}")
    # A cluster's critical path: hops in sequence times one hop, measured where nothing waits for a core (2 ranks).
    two = next((r for r in rows if r["ranks"] == 2), None)
    projected = {}
    if two:
        hop_ms = {"ring": two["ring_ms"] / ring_hops(2), "doubling": two["doubling_ms"] / doubling_hops(2)}
        projected = {way: {n: hop_ms[way] * hops(n) for n in PROJECT}
                     for way, hops in (("ring", ring_hops), ("doubling", doubling_hops))}
        for way, at in projected.items():
            print(f"{way}: {hop_ms[way]:.3f} ms a hop at 2 ranks; on a cluster, "
                  + ", ".join(f"{n} ranks {v:.1f} ms" for n, v in at.items()))
    path = save_results("control_allreduce", {"rows": rows, "fits": {k: str(f) for k, f in fits.items()},
                                              "projected_critical_path_ms": projected, "step_ms": args.step_ms})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
