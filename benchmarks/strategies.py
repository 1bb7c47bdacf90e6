"""Step time, tokens/s and peak memory per rank of every parallel strategy, on the same model and global batch,
side by side in one run. Each configuration trains through `python -m launch` as a user runs it; the figures come
from its per-rank metrics files.

    python benchmarks/strategies.py                              # CPU: shakespeare_char (10.7M), 2 ranks
    python benchmarks/strategies.py --only ddp fsdp --repeats 3
    python benchmarks/strategies.py --model gpt2_124m --batch 16 --ranks 2     # on a GPU machine

Step time is the median over the timed steps (after --warmup steps); with --repeats the configurations run
round-robin and the best median is kept (the host slows one vCPU at times). tokens/s is the whole job's.
Memory is per rank: CUDA's peak allocation on GPUs; on CPUs the largest resident set size seen at the metric
records (every step), which includes the Python process itself. Every step is a log step, since the table wants
each step's time: on a GPU that costs one synchronize a step (the host cannot run ahead), so these step times are
a little above a training run's (train=gpu logs every 50 steps); per-layer gradient norms are off. param MiB is
what each rank holds of the parameters (sharding shows here). On CPU each rank gets one thread (OMP_NUM_THREADS=1),
`single` too.
Writes benchmarks/results/strategies.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED_TEXT, save_results  # noqa: E402

PIPELINE = ["strategy=pipeline", "strategy.microbatches=4"]
# name -> (overrides, ranks: None for --ranks)
CONFIGS: dict[str, tuple[list[str], int | None]] = {
    "single": (["strategy=single"], 1),
    "ddp": (["strategy=ddp"], None),
    "zero1": (["strategy=zero1"], None),
    "fsdp": (["strategy=fsdp"], None),
    "deepspeed ZeRO-1": (["strategy=deepspeed", "strategy.stage=1"], None),
    "deepspeed ZeRO-2": (["strategy=deepspeed", "strategy.stage=2"], None),
    "deepspeed ZeRO-3": (["strategy=deepspeed", "strategy.stage=3"], None),
    "pipeline gpipe": ([*PIPELINE, "strategy.schedule=gpipe"], None),
    "pipeline 1f1b": ([*PIPELINE, "strategy.schedule=1f1b"], None),
    "pipeline interleaved": ([*PIPELINE, "strategy.schedule=interleaved"], None),
    "tp=2": (["strategy=fsdp", "parallel.tp=2"], 2),
    "tp=2 sequence parallel": (["strategy=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    "fsdp 2 x tp 2": (["strategy=fsdp", "parallel.tp=2"], 4),
    "hsdp 2 x 2": (["strategy=fsdp", "parallel.dp_replicate=2"], 4),
    "pipeline 1f1b x tp 2": ([*PIPELINE, "strategy.schedule=1f1b", "parallel.tp=2"], 4),
    "pipeline x fsdp 2 x tp 2": ([*PIPELINE, "strategy.schedule=1f1b", "strategy.dp=fsdp", "parallel.tp=2"], 8),
    "ddp + activation checkpointing": (["strategy=ddp", "train.activation_checkpointing=full"], None),
}


def run_one(name: str, overrides: list[str], world: int, steps: int, common: list[str], folder: Path,
            env: dict[str, str]) -> dict:
    """Train one configuration on `world` ranks; its median step time and each rank's memory and parameter bytes."""
    run_dir = folder / re.sub(r"[^\w.-]", "_", name)  # a Hydra override value: no spaces, '=' or '+'
    cmd = [sys.executable, "-m", "launch", f"hydra.run.dir={run_dir}", *common, *overrides,
           f"cluster.tasks_per_node={world}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    per_rank = []
    for rank in range(world):
        lines = (run_dir / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
        per_rank.append([r for r in map(json.loads, lines) if r["kind"] == "train"])
    timed = per_rank[0][-steps:]
    memory_key = "mem/peak_gib" if "mem/peak_gib" in timed[-1] else "mem/rss_gib"
    step_s = statistics.median(r["step_time_s"] for r in timed)
    tokens_per_step = timed[-1]["tokens_seen"] // timed[-1]["step"]
    return {
        "ranks": world,
        "tokens_per_step": tokens_per_step,
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "memory_key": memory_key,
        "memory_gib_per_rank": [max(r.get(memory_key, 0.0) for r in records) for records in per_rank],
        "param_mib_per_rank": [records[-1].get("param_bytes", 0) / 2**20 for records in per_rank],
        "final_loss": timed[-1]["loss"],
    }


def table(results: dict[str, dict], tokens_per_step: int) -> str:
    lines = ["| strategy | ranks | step time (s) | tokens/s | tokens/s per rank | peak memory per rank (GiB) "
             "| parameters per rank (MiB) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | | failed: {r['error'][:80]} | | | | |")
            continue
        memory = " / ".join(f"{m:.2f}" for m in r["memory_gib_per_rank"])
        params = " / ".join(f"{p:.1f}" for p in r["param_mib_per_rank"])
        lines.append(f"| {name} | {r['ranks']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / r['ranks']:,.0f} | {memory} | {params} |")
    lines.append(f"\n{tokens_per_step:,} tokens per step (the same global batch for every row).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shakespeare_char")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of every distributed configuration")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", nargs="*", help=f"a subset of: {', '.join(CONFIGS)}")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()

    names = [n for n in CONFIGS if not args.only or n in args.only or n.split()[0] in args.only]
    unknown = set(args.only or ()) - set(CONFIGS) - {n.split()[0] for n in CONFIGS}
    if unknown:
        parser.error(f"--only {' '.join(sorted(unknown))}: not a configuration; pick from {', '.join(CONFIGS)}")
    text = REPO / "data" / "tinyshakespeare" / "input.txt"
    data = [] if text.exists() else [f"data.text_path={SHARED_TEXT}"]
    common = [f"model={args.model}", f"train.global_batch_size={args.batch}",
              f"train.max_steps={args.warmup + args.steps}", "train.warmup_steps=1", "train.log_interval=1",
              "train.layer_grad_norms=false", "train.eval_interval=0", "train.progress=false",
              "checkpoint.interval_steps=0", *data, *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gptlaunch-strategies-") as tmp:
        for repeat in range(args.repeats):
            for name in names:
                overrides, ranks = CONFIGS[name]
                r = run_one(name, overrides, ranks or args.ranks, args.steps, common, Path(tmp) / str(repeat), env)
                best = results.get(name)
                if best is None or "error" in best or ("error" not in r and r["step_time_s"] < best["step_time_s"]):
                    results[name] = r
                print(f"{name}: {r.get('step_time_s', r.get('error'))}", file=sys.stderr, flush=True)

    tokens_per_step = next((r["tokens_per_step"] for r in results.values() if "error" not in r), 0)
    print(table(results, tokens_per_step))
    path = save_results("strategies", {"model": args.model, "global_batch": args.batch, "ranks": args.ranks,
                                       "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                                       "omp_num_threads": env["OMP_NUM_THREADS"], "overrides": args.overrides,
                                       "tokens_per_step": tokens_per_step, "results": results})
    print(f"\nwritten: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
