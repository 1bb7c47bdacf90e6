"""`python -m launch.memory_snapshot RUN [--wait-s S]`: ask a running run's ranks for a CUDA memory snapshot now.

Every rank that keeps CUDA's allocator history (a run on GPUs started, or continued, with
profile.memory_snapshot=true) writes one after the step it is in, RUN/profiles/attempt-N/rankR-memory-step<S>.pickle,
to drag into https://pytorch.org/memory_viz. This command writes RUN/profiles/snapshot-request anew (the ranks look at
it every few seconds: gpt.train.profiler.LOOK_S), then waits for the snapshots and names them. Torch-free: it runs
on a login node.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from launch import launch_config
from gpt.run_folder import RunFolder

WAIT_S = 120.0  # a step of a large model, and a snapshot of 100,000 allocator events
SETTLE_S = 2.0  # once one rank wrote its snapshot, the others' are a step away at most
POLL_S = 0.2


def ask(run_dir: Path) -> float:
    """A new snapshot request, told apart from the last by what it holds (file times are too coarse for two requests
    in one clock tick); when it was made (epoch seconds)."""
    request = RunFolder(run_dir).snapshot_request
    request.parent.mkdir(parents=True, exist_ok=True)
    fresh = request.with_name(f".{request.name}.{os.getpid()}")
    fresh.write_text(f"{time.time_ns()} {os.getpid()} {os.urandom(4).hex()}\n")
    os.replace(fresh, request)  # a rank reads the old request or the new one, never half of one
    return request.stat().st_mtime


def written_since(run_dir: Path, since: float) -> list[Path]:
    return sorted(p for p in RunFolder(run_dir).profiles.glob("attempt-*/rank*-memory-step*.pickle")
                  if p.stat().st_mtime >= since)


def wait_for(run_dir: Path, since: float, wait_s: float) -> list[Path]:
    """The snapshots written after `since`: once the first came, until no other comes for SETTLE_S."""
    deadline, settled, seen = time.monotonic() + wait_s, None, []
    while time.monotonic() < deadline and (settled is None or time.monotonic() < settled):
        if len(now := written_since(run_dir, since)) > len(seen):
            seen, settled = now, time.monotonic() + SETTLE_S
        time.sleep(POLL_S)
    return written_since(run_dir, since)


def request_snapshot(run_dir: Path, wait_s: float = WAIT_S, out=sys.stdout) -> int:
    folder = RunFolder(run_dir)
    if not folder.config.is_file():
        print(f"error: {run_dir} is not a run folder (no config.yaml)", file=sys.stderr)
        return 2
    if not launch_config.load(folder.config).profile.memory_snapshot:
        print(f"error: {run_dir} runs without profile.memory_snapshot=true, so its ranks keep no allocator history to "
              "snapshot; start or continue it with profile.memory_snapshot=true (its command with that setting)",
              file=sys.stderr)
        return 2
    since = ask(run_dir)
    print(f"asked the ranks of {run_dir} for a memory snapshot after their current step", file=out, flush=True)
    snapshots = wait_for(run_dir, since, wait_s)
    if not snapshots:
        print(f"no rank wrote a snapshot in {wait_s:g} s: is the run training, on GPUs (the history is CUDA's)? "
              f"Its ranks answer the request when they next step", file=out)
        return 1
    print("\n".join([*(f"  {p}" for p in snapshots), "drag them into https://pytorch.org/memory_viz"]), file=out)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.memory_snapshot", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder")
    parser.add_argument("--wait-s", type=float, default=WAIT_S, help="how long to wait for the snapshots")
    args = parser.parse_args(argv)
    sys.exit(request_snapshot(args.run, args.wait_s))


if __name__ == "__main__":
    main()
