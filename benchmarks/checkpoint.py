"""Checkpoint costs: how long the training loop is blocked by a save (synchronous vs `checkpoint.async`), how
long a load takes, for gpt2_124m on this machine's CPU (and a GPU when there is one); and requeue-to-first-step
on the local Slurm cluster (a tiny 2-node job preempted with `scancel --signal=USR2`).

    python -m benchmarks.checkpoint                 # everything (the Slurm part when the cluster is up)
    python -m benchmarks.checkpoint --no-slurm
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, SHARED_TEXT, compose_config, save_results


def save_load(model: str, repeats: int, block: int) -> dict:
    from gpt.distributed import DistEnv
    from gpt.trainer import Trainer
    from launch.plan import make_plan
    from omegaconf import OmegaConf

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            run_dir = Path(tmp) / mode
            cfg = compose_config([f"model={model}", f"model.block_size={block}", "train.global_batch_size=1",
                                  "train.max_steps=100", "train.progress=false", "train.eval_interval=0",
                                  "resume=none", f"checkpoint.async={'true' if mode == 'async' else 'false'}",
                                  f"data.dir={Path(tmp) / 'data'}"])
            make_plan(cfg, run_dir)
            t = Trainer(OmegaConf.load(run_dir / "config.yaml"), DistEnv(), run_dir)
            step_s = []
            for _ in range(2):
                start = time.perf_counter()
                t.train_step()
                step_s.append(time.perf_counter() - start)
            blocked, total = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                path = t.save()
                blocked.append(t.checkpointer.last_blocked_s)
                t.checkpointer.wait()
                total.append(time.perf_counter() - start)
                t.train_step()
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            loads = []
            for _ in range(repeats):
                start = time.perf_counter()
                t.strategy.load_state(path)
                loads.append(time.perf_counter() - start)
            out[mode] = {"blocked_s": statistics.median(blocked), "save_done_s": statistics.median(total),
                         "load_s": statistics.median(loads), "bytes": size, "step_s": min(step_s)}
            t.metrics.close()
    return out


def requeue_to_first_step() -> dict | None:
    env = dict(os.environ)
    conf = REPO / "slurm" / ".cluster" / "slurm.conf"
    if subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "status"], capture_output=True).returncode:
        return None
    env.update(SLURM_CONF=str(conf), PATH=f"{REPO / 'slurm' / 'bin'}:{env['PATH']}")
    tmp = Path(tempfile.mkdtemp())
    run_dir = tmp / "run"
    cmd = [sys.executable, "-m", "launch", "nodes=2", "cluster=slurm", "cluster.time_min=10", "model=tiny",
           "strategy=ddp", "train.max_steps=400", "train.log_interval=1", "train.eval_interval=0",
           "train.progress=false", "checkpoint.interval_steps=50", "debug.delay_rank=0", "debug.delay_s=0.05",
           "hydra.launcher.progress=false", "hydra.launcher.poll_s=0.5", f"hydra.run.dir={run_dir}",
           f"data.text_path={SHARED_TEXT}", f"data.dir={tmp / 'data'}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gaps = []
    try:
        for restart in range(3):
            job = None
            while proc.poll() is None:
                metrics = run_dir / "metrics" / "rank0.jsonl"
                if (run_dir / "slurm_job.json").exists():
                    job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
                if job and metrics.exists():
                    lines = metrics.read_text().splitlines()
                    info = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True,
                                          text=True).stdout
                    if f"Restarts={restart} " in info and lines and json.loads(lines[-1])["time"] > signalled_at(gaps):
                        break
                time.sleep(0.2)
            if restart == 2:
                break
            sent = time.time()
            gaps.append({"signal": sent})
            subprocess.run(["scancel", "--signal=USR2", job], env=env, check=True)
        proc.terminate()
        subprocess.run(["scancel", job], env=env)
        proc.wait()
        attempts = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
        records = [json.loads(x) for x in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()]
        out = []
        for gap, attempt in zip(gaps, attempts):
            first = min(r["time"] for r in records if r["time"] > attempt["time"])
            out.append({"signal_to_saved_s": attempt["time"] - gap["signal"], "saved_to_first_step_s": first - attempt["time"]})
        return {"samples": out, "signal_to_first_step_s": statistics.median(o["signal_to_saved_s"] + o["saved_to_first_step_s"] for o in out)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def signalled_at(gaps: list[dict]) -> float:
    return gaps[-1]["signal"] if gaps else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2_124m")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-slurm", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {"model": args.model, "device": "cuda" if torch.cuda.is_available() else "cpu",
               "save_load": save_load(args.model, args.repeats, args.block)}
    if not args.no_slurm:
        results["requeue"] = requeue_to_first_step()
    print(f"\ncheckpoint costs, {args.model} on {results['device']} (median of {args.repeats})")
    print(f"{'mode':6} {'size MB':>8} {'loop blocked s':>15} {'save done s':>12} {'load s':>8} {'one step s':>11}")
    for mode, r in results["save_load"].items():
        print(f"{mode:6} {r['bytes'] / 1e6:8.0f} {r['blocked_s']:15.3f} {r['save_done_s']:12.3f} {r['load_s']:8.3f} "
              f"{r['step_s']:11.3f}")
    if results.get("requeue"):
        for s in results["requeue"]["samples"]:
            print(f"requeue (local Slurm, tiny, 2 nodes): USR2 -> saved {s['signal_to_saved_s']:.1f} s, "
                  f"saved -> first step of the next attempt {s['saved_to_first_step_s']:.1f} s")
    print(f"results: {save_results('checkpoint', results)}")


if __name__ == "__main__":
    main()
