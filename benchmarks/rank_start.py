"""How cluster=local starts its ranks: forked from one preloaded server per launcher (the default without GPUs,
launch.rank.forked) against fresh interpreters (GPTLAUNCH_RANK_START=spawn, the start with GPUs). The same tiny
`python -m launch` runs under each, interleaved run by run so that machine noise hits both alike: 2 and 4 ranks, and
2 ranks with one killed at step 5 and restarted inside the run (a second round). Prints each run's CPU seconds (the
launcher, its server and its ranks: this process is their subreaper, so every one of them is counted) and wall
seconds, rank 0's imports in its start-up breakdown, and the ratios of the medians.

    python benchmarks/rank_start.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED_TEXT, save_results  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36
RUN = ["model=tiny", "train.max_steps=20", "train.warmup_steps=2", "train.eval_interval=0",
       "checkpoint.interval_steps=5", "train.progress=false", f"data.text_path={SHARED_TEXT}"]
CASES = {"2 ranks": ["strategy=ddp", "nodes=2"], "4 ranks": ["strategy=fsdp", "cluster.tasks_per_node=4"],
         "2 ranks, one killed and restarted": ["strategy=ddp", "nodes=2", "debug.kill_rank=1", "debug.kill_step=7",
                                               "preemption.in_job_restarts=1"]}
METHODS = ("forkserver", "spawn")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reap_orphans() -> None:
    """The launcher's server and ranks outlive it by a moment; as their subreaper, wait for each (their CPU counts)."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def one_run(method: str, overrides: list[str], data: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"gptlaunch-rank-start-{method}-"))
    cpu, start = children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "launch", f"hydra.run.dir={folder}", f"data.dir={data}", *RUN, *overrides],
                   cwd=REPO, env={**os.environ, "GPTLAUNCH_RANK_START": method}, check=True, capture_output=True)
    reap_orphans()
    attempts = [json.loads(line) for line in (folder / "attempts.jsonl").read_text().splitlines()]
    imports = [round(a.get("startup", {}).get("imports_s", float("nan")), 2) for a in attempts]
    return {"cpu_s": children_cpu() - cpu, "wall_s": time.perf_counter() - start, "imports_s": imports}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
    data = Path(tempfile.mkdtemp(prefix="gptlaunch-rank-start-data-")) / "shakespeare_char"
    results: dict[str, dict[str, list[dict]]] = {case: {m: [] for m in METHODS} for case in CASES}
    for _ in range(args.repeats):
        for case, overrides in CASES.items():
            for method in METHODS:
                r = one_run(method, overrides, data)
                results[case][method].append(r)
                print(f"{case:34s} {method:10s} cpu {r['cpu_s']:6.1f} s  wall {r['wall_s']:6.1f} s  "
                      f"rank 0's imports per attempt {r['imports_s']}", flush=True)
    for case, runs in results.items():
        med = {m: (statistics.median(r["cpu_s"] for r in runs[m]), statistics.median(r["wall_s"] for r in runs[m]))
               for m in METHODS}
        print(f"{case}: forked / spawned medians: cpu {med['forkserver'][0] / med['spawn'][0]:.2f}x, "
              f"wall {med['forkserver'][1] / med['spawn'][1]:.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f}")
    save_results("rank_start", {"cases": results})


if __name__ == "__main__":
    main()
