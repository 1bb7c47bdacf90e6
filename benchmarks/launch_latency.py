"""Submit-to-first-step latency: from `python -m launch ...` starting to rank 0's first training step, for 1, 2
and 4 nodes on the local Slurm cluster (cluster=slurm: submitit, sbatch, srun) and on this machine (cluster=local).

    slurm/local_cluster.sh up 4                       # as root, once
    python benchmarks/launch_latency.py               # prints a table, writes benchmarks/results/launch_latency.json
    python benchmarks/launch_latency.py --nodes 1 2 --repeats 3

Columns: `submitted` (the launcher printed the job id: Hydra, planning, sinfo, sbatch), `first step` (rank 0
recorded step 1: the job was scheduled, every rank started Python and torch, the rendezvous and its preflight
passed, the model was built), `done` (the launcher exited after a few steps). The model is tiny: these are the
launcher's and the cluster's costs, not training's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, SHARED_TEXT, save_results  # noqa: E402

TINY = ["model=tiny", "strategy=ddp", "train.max_steps=3", "train.warmup_steps=1", "train.log_interval=1",
        "train.eval_interval=0", "train.progress=false", "checkpoint.interval_steps=0"]


def cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    out = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "env"], capture_output=True, text=True)
    for line in out.stdout.splitlines():  # export SLURM_CONF=...; export PATH=.../slurm/bin:"$PATH"
        if line.startswith("export SLURM_CONF="):
            env["SLURM_CONF"] = line.split("=", 1)[1].strip('"')
    env["PATH"] = f"{REPO / 'slurm' / 'bin'}:{env['PATH']}"
    return env


def first_record_time(run_dir: Path) -> float | None:
    try:
        line = (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return json.loads(line)["time"]


def measure(cluster: str, nodes: int, data: list[str], env: dict[str, str]) -> dict[str, float | None]:
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = [f"cluster={cluster}", f"nodes={nodes}", *TINY, *data, f"hydra.run.dir={run_dir}"]
        if cluster == "slurm":
            overrides += ["cluster.time_min=10"]
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "launch", *overrides], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        submitted: list[float] = []
        lines: list[str] = []

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("submitted job") and not submitted:
                    submitted.append(time.time())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        proc.wait(timeout=600)
        done = time.time()
        reader.join(timeout=10)
        if proc.returncode != 0:
            raise SystemExit(f"{cluster} nodes={nodes} failed:\n{''.join(lines[-40:])}")
        first = first_record_time(run_dir)
        return {"submitted_s": submitted[0] - start if submitted else None,
                "first_step_s": first - start if first else None, "done_s": done - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clusters", nargs="+", default=["slurm", "local"], choices=["slurm", "local"])
    args = parser.parse_args()

    data = [] if (REPO / "data" / "tinyshakespeare" / "input.txt").exists() else [f"data.text_path={SHARED_TEXT}"]
    env = cluster_env()
    rows = []
    for cluster in args.clusters:
        for nodes in args.nodes:
            runs = [measure(cluster, nodes, data, env) for _ in range(args.repeats)]
            row = {"cluster": cluster, "nodes": nodes, "ranks": nodes, "repeats": args.repeats}
            for key in ("submitted_s", "first_step_s", "done_s"):
                values = [r[key] for r in runs if r[key] is not None]
                row[key] = statistics.median(values) if values else None
            rows.append(row)
            print(f"  {cluster} nodes={nodes}: {row}", file=sys.stderr, flush=True)

    def fmt(x: float | None) -> str:
        return f"{x:8.1f} s" if x is not None else "       --"

    print(f"\nsubmit-to-first-step, median of {args.repeats} (tiny model; {os.cpu_count()} CPU cores shared by all "
          "nodes of the local cluster)")
    print(f"{'cluster':<8} {'nodes':>5}  {'submitted':>10}  {'first step':>10}  {'done':>10}")
    for r in rows:
        print(f"{r['cluster']:<8} {r['nodes']:>5}  {fmt(r['submitted_s']):>10}  {fmt(r['first_step_s']):>10}  "
              f"{fmt(r['done_s']):>10}")
    path = save_results("launch_latency", {"rows": rows, "overrides": TINY})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
