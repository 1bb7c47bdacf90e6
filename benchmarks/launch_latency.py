"""Submit-to-first-step latency: from `python -m launch ...` starting to rank 0's first training step, for 1, 2
and 4 nodes on the local Slurm cluster (cluster=slurm: submitit, sbatch, srun) and on this machine (cluster=local).

    slurm/local_cluster.sh up 4                       # as root, once
    python benchmarks/launch_latency.py               # prints a table, writes benchmarks/results/launch_latency.json
    python benchmarks/launch_latency.py --nodes 1 2 --repeats 3

    python benchmarks/launch_latency.py --requeues 2  # also: a 2-node job requeued twice, start-up by phase

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
    for line in out.stdout.splitlines():  # export SLURM_CONF=...
        if line.startswith("export SLURM_CONF="):
            env["SLURM_CONF"] = line.split("=", 1)[1].strip('"')
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


SLURM_SETTINGS = ("SchedulerParameters", "KillWait", "MinJobAge", "PrologEpilogTimeout", "BatchStartTimeout")
REQUEUE_RUN = ["nodes=2", "cluster=slurm", "cluster.time_min=10", "model=tiny", "strategy=ddp",
               "train.max_steps=100000",
               "train.log_interval=1", "train.eval_interval=0", "train.progress=false", "checkpoint.interval_steps=50",
               "hydra.launcher.progress=false", "hydra.launcher.poll_s=0.5"]


def attempts(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    except OSError:
        return []


def wait_for_training(run_dir: Path, after: float, proc: subprocess.Popen, timeout: float = 300) -> None:
    metrics, deadline = run_dir / "metrics" / "rank0.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines and json.loads(lines[-1])["time"] > after + 1:
            return
        time.sleep(0.2)
    raise SystemExit(f"the job did not train again within {timeout} s (run folder {run_dir})")


def measure_requeues(count: int, data: list[str], env: dict[str, str]) -> list[dict]:
    """USR2 `count` times to a running 2-node job; each requeued attempt's start-up, phase by phase, from the
    attempts log (the line of attempt r holds r's own start-up)."""
    with tempfile.TemporaryDirectory(prefix="requeue-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "launch", *REQUEUE_RUN, *data, f"hydra.run.dir={run_dir}"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_training(run_dir, 0, proc)
            job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
            for _ in range(count):
                sent = time.time()
                subprocess.run(["scancel", "--signal=USR2", str(job)], env=env, check=True)
                wait_for_training(run_dir, sent, proc)
            subprocess.run(["scancel", "--signal=USR2", str(job)], env=env, check=True)
            while len(attempts(run_dir)) < count + 1 and proc.poll() is None:
                time.sleep(0.2)
        finally:
            subprocess.run(["scancel", str(job)], env=env, capture_output=True)
            proc.terminate()
            proc.wait()
        return [a["startup"] for a in attempts(run_dir) if a.get("restart", 0) > 0 and "startup" in a]


def print_requeues(samples: list[dict], env: dict[str, str]) -> None:
    from launch.run.startup import PHASES

    config = subprocess.run(["scontrol", "show", "config"], env=env, capture_output=True, text=True).stdout
    settings = [line.strip() for line in config.splitlines() if line.split("=")[0].strip() in SLURM_SETTINGS]
    print("\nrequeued attempts of a 2-node tiny job (USR2 -> save -> scontrol requeue -> Slurm starts it again)")
    keys = [k for k in (*PHASES, "to_first_step_s") if any(k in s for s in samples)]
    print("  ".join(f"{k[:-2]:>15}" for k in keys))
    for s in samples:
        print("  ".join(f"{s[k]:>13.2f} s" if k in s else f"{'--':>15}" for k in keys))
    print("to_first_step: the batch script's start -> the first training step (scheduler excluded)")
    print("scheduler: the previous attempt's last record -> this attempt's batch script (Slurm's own delay), "
          "governed by: " + "; ".join(settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clusters", nargs="+", default=["slurm", "local"], choices=["slurm", "local"])
    parser.add_argument("--requeues", type=int, default=0, help="also requeue a 2-node Slurm job this many times")
    parser.add_argument("--requeues-only", action="store_true", help="skip the submit-to-first-step table")
    args = parser.parse_args()

    data = [] if (REPO / "data" / "tinyshakespeare" / "input.txt").exists() else [f"data.text_path={SHARED_TEXT}"]
    env = cluster_env()
    requeues = measure_requeues(args.requeues, data, env) if args.requeues else []
    if requeues:
        print_requeues(requeues, env)
    if args.requeues_only:
        save_results("launch_latency", {"requeues": requeues})
        return
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
    path = save_results("launch_latency", {"rows": rows, "overrides": TINY, "requeues": requeues})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
