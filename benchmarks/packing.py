"""A 16-point single-rank learning-rate sweep on the local Slurm cluster, run side by side in one session: one job per
point (cluster=slurm), packed into one allocation (hydra.launcher.pack=true), and packed with the sweep's early stopping
(launcher.early_stop=asha), and the same with Optuna choosing the learning rates (hydra/sweeper=optuna, 16 trials in
batches of 4). For each: jobs submitted, node-hours held (Slurm's accounting: each job's elapsed time
times its nodes), steps trained, and the wall time from the command to its report.

    slurm/local_cluster.sh up 4                       # as root, once
    python benchmarks/packing.py                      # prints a table, writes benchmarks/results/packing.json
    python benchmarks/packing.py --points 8 --steps 20

Every node of the local cluster shares this machine's CPUs: the wall times say what the scheduling costs here, not
what the same sweep takes on real nodes; the jobs and node-hours are what a site's accounting would charge.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, SHARED_TEXT, save_results  # noqa: E402
from benchmarks.launch_latency import cluster_env  # noqa: E402

ASHA = ["hydra.launcher.pack=true", "launcher.early_stop=asha", "launcher.eta=2"]
# Optuna's TPE over the same range, in batches of 4 (an allocation each), the grid's count of trials
OPTUNA = ["hydra/sweeper=optuna", "hydra.sweeper.n_jobs=4", "hydra.sweeper.sampler.seed=0", *ASHA]
WAYS = {"one job per point": [], "packed": ["hydra.launcher.pack=true"], "packed, early stopping": ASHA,
        "Optuna, packed, early stopping": OPTUNA}


def sweep(name: str, extra: list[str], lrs: list[str], steps: int, root: Path, env: dict[str, str]) -> dict:
    folder = root / name.replace(" ", "_").replace(",", "")
    cmd = [sys.executable, "-m", "launch", "-m", "cluster=slurm", "cluster.time_min=10", "hydra.launcher.poll_s=0.5",
           "hydra.launcher.progress=false", "model=tiny", "strategy=single", f"train.max_steps={steps}",
           f"train.eval_interval={steps // 4}", "train.log_interval=1", "train.warmup_steps=2", "train.min_lr=0",
           "train.progress=false", "checkpoint.interval_steps=0", f"data.text_path={SHARED_TEXT}",
           f"data.dir={root / 'data'}", f"hydra.sweep.dir={folder}", *extra]
    optuna = "hydra/sweeper=optuna" in extra
    cmd += [f"hydra.sweeper.n_trials={len(lrs)}", f"train.lr=tag(log, interval({lrs[-1]}, {lrs[0]}))"] if optuna \
        else [f"train.lr={','.join(lrs)}"]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    points = [p for p in folder.iterdir() if (p / "slurm_job.json").is_file()]
    jobs = sorted({json.loads((p / "slurm_job.json").read_text())["job_id"] for p in points})
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,ElapsedRaw,NNodes", "-j", ",".join(jobs)],
                           env=env, capture_output=True, text=True, check=True).stdout
    node_s = sum(int(e) * int(n) for _, e, n in (line.split("|") for line in sacct.splitlines() if line))
    summaries = [json.loads((p / "summary.json").read_text()) for p in points]
    return {"points": len(points), "jobs": len(jobs), "node_hours": node_s / 3600, "wall_s": wall,
            "steps": sum(s["last_step"] for s in summaries),
            "stopped_early": sum(1 for s in summaries if s.get("stopped_early")),
            "best_val_loss": min(s["val_loss"] for s in summaries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--only", nargs="*", choices=list(WAYS), help="these ways alone")
    args = parser.parse_args()
    lrs = [f"{1e-4 * (1e-2 / 1e-4) ** (i / (args.points - 1)):.2e}" for i in range(args.points)][::-1]  # best first
    env = cluster_env()
    results = {}
    with tempfile.TemporaryDirectory(prefix="gptlaunch-packing-") as tmp:
        for name, extra in WAYS.items():
            if args.only and name not in args.only:
                continue
            results[name] = sweep(name, extra, lrs, args.steps, Path(tmp), env)
            r = results[name]
            print(f"{name:24s} {r['points']:3d} points  {r['jobs']:3d} job(s)  {r['node_hours']:6.3f} node-hours  "
                  f"{r['steps']:5d} steps  ({r['stopped_early']} stopped early)  {r['wall_s']:6.0f} s to the report  "
                  f"best val loss {r['best_val_loss']:.4f}", flush=True)
    save_results("packing", {"points": args.points, "steps": args.steps, "learning_rates": lrs, "ways": results})


if __name__ == "__main__":
    main()
