"""Checkpoint costs: how long the training loop is blocked by a save (synchronous vs `checkpoint.async`), how
long a load takes, in seconds and GB/s next to the disk's own write speed, for gpt2_124m on this machine's CPU
(and a GPU when there is one). The synchronous save (preemption, time limit, the final one) is measured twice in
the same run: `sync-old`, the path before staging (one writer thread, torch's CRC32 per record, no pinned buffers),
and `sync`, today's defaults (checkpoint.thread_count, staging, no CRC32). A requeued job's restart is measured by
`benchmarks/launch_latency.py --requeues`.

    python -m benchmarks.checkpoint
    python -m benchmarks.checkpoint --model llama_1b --block 2048 --modes sync-old sync   # the GPU's save target
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import compose_config, save_results


def disk_write_gbps(folder: Path, size: int = 1 << 30, block: int = 8 << 20, streams: int = 1) -> float:
    """This disk's own write speed: `size` bytes in `block`-sized writes, fsync'd, as a checkpoint's shards are,
    split over `streams` files written at once (a save's writer threads, checkpoint.thread_count)."""
    data = os.urandom(block)

    def write(i: int) -> None:
        with open(folder / f"disk_probe{i}.bin", "wb") as f:
            for _ in range(size // block // streams):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(write, range(streams)))
    seconds = time.perf_counter() - start
    for i in range(streams):
        (folder / f"disk_probe{i}.bin").unlink()
    return size / seconds / 1e9


def timed_saves(t, repeats: int) -> dict:
    """Save `repeats` times, a training step after each. The loop is blocked by save() itself and, for an
    asynchronous save, by the next step's wait for the staging copy before its optimizer changes the weights.
    An asynchronous save's staging and writing times are read off its futures."""
    blocked, staged, written = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        path = t.saver.save(t.step, eval_pending=False)
        checkpointer = t.saver.checkpointer
        returned, waited = checkpointer.last_blocked_s, checkpointer.staging_wait_s
        pending = checkpointer.pending
        if pending is not None:  # stamps from the futures' callbacks, run as each completes
            pending.staged.add_done_callback(lambda f, t0=start: staged.append(time.perf_counter() - t0))
            pending.future.add_done_callback(lambda f, t0=start: written.append(time.perf_counter() - t0))
        t.train_step()
        blocked.append(returned + checkpointer.staging_wait_s - waited)
        checkpointer.wait()
        if pending is None:
            written.append(returned)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"blocked_first_s": blocked[0], "blocked_s": statistics.median(blocked[1:] or blocked),
            "staged_s": statistics.median(staged) if staged else None, "written_s": statistics.median(written),
            "bytes": size, "path": path}


# each mode's checkpoint.* overrides
MODES = {"sync-old": ["checkpoint.thread_count=1", "checkpoint.crc32=true", "checkpoint.staging=false"],
         "sync": [], "sync-8": ["checkpoint.thread_count=8"], "async": ["checkpoint.async=true"]}


def save_load(model: str, repeats: int, block: int, modes: list[str]) -> dict:
    from gpt.collectives.process_group import DistEnv
    from gpt.train.trainer import Trainer
    from launch.backends import get_backend
    from launch.planning.plan import make_plan
    from launch import launch_config

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["disk_write_gbps"] = disk_write_gbps(Path(tmp))
        out["disk_write_gbps_4"] = disk_write_gbps(Path(tmp), streams=4)
        for mode in modes:
            run_dir = Path(tmp) / mode
            cfg = compose_config([f"model={model}", f"model.block_size={block}", "train.global_batch_size=1",
                                  "train.max_steps=100", "train.progress=false", "train.eval_interval=0",
                                  "resume=none", *MODES[mode], f"data.dir={Path(tmp) / 'data'}"])
            make_plan(cfg, run_dir, get_backend(cfg.cluster.name))
            t = Trainer(launch_config.load(run_dir / "config.yaml"), DistEnv(), run_dir)
            step_s = []
            for _ in range(2):
                start = time.perf_counter()
                t.train_step()
                step_s.append(time.perf_counter() - start)
            r = timed_saves(t, repeats)
            path, loads = r.pop("path"), []
            for _ in range(repeats):
                start = time.perf_counter()
                t.strategy.load_state(path)
                loads.append(time.perf_counter() - start)
            r.update(load_s=statistics.median(loads), step_s=min(step_s))
            r.update(write_gbps=r["bytes"] / r["written_s"] / 1e9, load_gbps=r["bytes"] / r["load_s"] / 1e9)
            out[mode] = r
            print(f"{mode}: {r['bytes'] / 1e9:.2f} GB written in {r['written_s']:.2f} s ({r['write_gbps']:.2f} GB/s), "
                  f"loaded in {r['load_s']:.2f} s", flush=True)  # kept should a time limit stop the next mode
            t.saver.checkpointer.close()
            t.metrics.close()
            shutil.rmtree(run_dir)  # the next mode's saves go to an emptier disk
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2_124m")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {"model": args.model, "device": "cuda" if torch.cuda.is_available() else "cpu",
               "save_load": save_load(args.model, args.repeats, args.block, args.modes)}
    sl = results["save_load"]
    print(f"\ncheckpoint costs, {args.model} on {results['device']} (medians of {args.repeats}, blocked: of the saves "
          "after the first; blocked = save() plus the next step's wait for the staging copy)")
    print(f"{'mode':8} {'size GB':>8} {'blocked s':>10} {'1st blocked s':>14} {'staged in s':>12} {'written in s':>13} "
          f"{'write GB/s':>11} {'load s':>7} {'load GB/s':>10} {'one step s':>11}")
    for mode in args.modes:
        r = sl[mode]
        staged = f"{r['staged_s']:12.3f}" if r["staged_s"] is not None else f"{'-':>12}"
        print(f"{mode:8} {r['bytes'] / 1e9:8.2f} {r['blocked_s']:10.3f} {r['blocked_first_s']:14.3f} {staged} "
              f"{r['written_s']:13.3f} {r['write_gbps']:11.2f} {r['load_s']:7.3f} {r['load_gbps']:10.2f} "
              f"{r['step_s']:11.3f}")
    if "sync-old" in sl and "sync" in sl:
        before, after = sl["sync-old"], sl["sync"]
        print(f"synchronous save: before {before['write_gbps']:.2f} GB/s ({before['written_s']:.2f} s), after "
              f"{after['write_gbps']:.2f} GB/s ({after['written_s']:.2f} s): "
              f"{before['written_s'] / after['written_s']:.2f}x")
    print(f"this disk's sequential write (1 GiB, fsync'd): {sl['disk_write_gbps']:.2f} GB/s in one stream, "
          f"{sl.get('disk_write_gbps_4', float('nan')):.2f} in four at once; loads read files just written, from the "
          "page cache")
    print(f"results: {save_results('checkpoint', results)}")


if __name__ == "__main__":
    main()
