"""What the step's control all-reduce costs (the stop votes and flags of gpt.train.trainer's `sync`: a few floats
over gloo, host-blocking, every step), at 2 to 32 ranks on this machine, fitted against the ranks and projected to
64, 512 and 8,192.

    python benchmarks/control_allreduce.py [--ranks 2 4 8 16 32] [--calls 200] [--step-ms 5]

Per size, N gloo processes on this machine:
- blocking: the flags summed and waited for at once (as the trainer did until its flags were agreed a step after
  they are cast), back to back: the median seconds per call;
- overlapped: the trainer's way (gpt.dist.process_group.sum_in_background on a gloo group of its own), waited for
  one simulated step (--step-ms of sleep) later: the median seconds still waited, what stays on the step's path.
The ranks share this machine's cores (more processes than cores past 2 or 4): what grows with the ranks is then
mostly scheduling, an upper bound on a real cluster's per-hop latency, not a measure of it. gloo's all-reduce is a
ring, so its latency grows with the ranks on any machine. Writes benchmarks/results/control_allreduce.json.
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
from gpt.dist.process_group import sum_in_background  # noqa: E402

VALUES = [0.0, 0.0, 0.0, 0.0]  # checkpoint writing, interval due, one vote per handled signal (two by default)
PROJECT = (64, 512, 8192)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, calls: int, step_s: float, out: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    side = dist.new_group(backend="gloo")
    for _ in range(20):  # warm-up: connections made, buffers allocated
        sum_in_background(VALUES, side).wait()
    dist.barrier()
    blocking = [sum_in_background(VALUES, side).wait()[0] for _ in range(calls)]
    dist.barrier()
    waited = []
    for _ in range(calls // 4):
        cast = sum_in_background(VALUES, side)
        time.sleep(step_s)  # the step's compute, during which the votes travel
        waited.append(cast.wait()[0])
    medians = [statistics.median(blocking), statistics.median(waited)]
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
    blocking, overlapped = out.get(timeout=60)
    return {"ranks": world, "blocking_ms": blocking * 1e3, "overlapped_wait_ms": overlapped * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=5.0)
    args = parser.parse_args()
    rows = []
    print(f"{os.cpu_count()} cores; {len(VALUES)} float64 values per all-reduce; simulated step {args.step_ms} ms")
    print(f"{'ranks':>6} {'blocking ms/step':>17} {'overlapped wait ms/step':>24}")
    for world in args.ranks:
        row = measure(world, args.calls, args.step_ms / 1e3)
        rows.append(row)
        print(f"{world:>6} {row['blocking_ms']:>17.3f} {row['overlapped_wait_ms']:>24.3f}")
    xs = [r["ranks"] for r in rows]
    fits = {key: fit_growth(xs, [r[key] for r in rows]) for key in ("blocking_ms", "overlapped_wait_ms")}
    projected = {key: {n: fit.at(n) for n in PROJECT} for key, fit in fits.items()}
    for key, fit in fits.items():
        print(f"{key}: {fit}; projected " + ", ".join(f"{n} ranks {v:.2f} ms" for n, v in projected[key].items()))
    path = save_results("control_allreduce", {"rows": rows, "fits": {k: str(f) for k, f in fits.items()},
                                              "projected": projected, "step_ms": args.step_ms})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
