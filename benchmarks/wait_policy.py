"""Idle OpenMP threads that sleep (PASSIVE, every rank's default: launch.rank.threads) against threads that spin
(ACTIVE, libgomp's own default): the same tiny `python -m launch` run under each, interleaved run by run so that
machine noise hits both alike. Prints each run's CPU seconds (the launcher and its ranks) and wall seconds, and the
ratios of the medians.

    python benchmarks/wait_policy.py [--repeats 3] [OVERRIDES...]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = ["model=tiny", "model.n_layer=4", "train.max_steps=30", "train.warmup_steps=2", "train.global_batch_size=8",
       "train.eval_interval=5", "train.eval_batches=2", "checkpoint.interval_steps=0", "train.progress=false"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(policy: str, overrides: list[str]) -> tuple[float, float]:
    """CPU and wall seconds of one run with OMP_WAIT_POLICY=`policy`."""
    folder = tempfile.mkdtemp(prefix=f"gptlaunch-wait-{policy.lower()}-")
    cpu, start = children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "launch", f"hydra.run.dir={folder}", *RUN, *overrides], cwd=REPO,
                   env={**os.environ, "OMP_WAIT_POLICY": policy}, check=True, capture_output=True)
    return children_cpu() - cpu, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    figures: dict[str, list[tuple[float, float]]] = {"PASSIVE": [], "ACTIVE": []}
    for _ in range(args.repeats):
        for policy, runs in figures.items():
            runs.append(one_run(policy, args.overrides))
            print(f"{policy:8s} cpu {runs[-1][0]:6.1f} s  wall {runs[-1][1]:6.1f} s", flush=True)
    med = {p: (statistics.median(c for c, _ in r), statistics.median(w for _, w in r)) for p, r in figures.items()}
    print(f"ACTIVE / PASSIVE medians: cpu {med['ACTIVE'][0] / med['PASSIVE'][0]:.2f}x, "
          f"wall {med['ACTIVE'][1] / med['PASSIVE'][1]:.2f}x (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
