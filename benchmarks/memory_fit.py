"""The planner's memory estimate (gpt.parallel.memory_estimate, the fit check's) against what each rank held in its
first step (its "memory" metrics record, gpt.parallel.memory_held), for every strategy on two model sizes. Each
configuration trains one step through `python -m launch`; the error is the estimate's over the largest rank's figure,
part by part. On a CPU the measured peak is the sum of the parts (no allocator peak); on a GPU it is CUDA's.

    python -m benchmarks.memory_fit [--only ddp fsdp] [--sizes tiny shakespeare_cpu]

Writes benchmarks/results/memory_fit.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED_TEXT, save_results  # noqa: E402
from launch import launch_config  # noqa: E402
from gpt.parallel import plan_layout  # noqa: E402
from gpt.parallel.memory_estimate import PARTS, estimate  # noqa: E402
from gpt.train.build import model_config  # noqa: E402

PIPELINE = ["strategy=pipeline", "strategy.microbatches=4"]
CONFIGS: dict[str, tuple[list[str], int]] = {
    "ddp": (["strategy=ddp"], 2),
    "zero1": (["strategy=zero1"], 2),
    "fsdp": (["strategy=fsdp"], 2),
    "fsdp + checkpointing": (["strategy=fsdp", "train.activation_checkpointing=full"], 2),
    "tp=2": (["strategy=fsdp", "parallel.tp=2"], 2),
    "tp=2 + sequence parallel": (["strategy=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    "pipeline 1f1b": ([*PIPELINE, "strategy.schedule=1f1b"], 2),
    "pipeline gpipe": ([*PIPELINE, "strategy.schedule=gpipe"], 2),
    "deepspeed ZeRO-1": (["strategy=deepspeed", "strategy.stage=1"], 2),
    "deepspeed ZeRO-2": (["strategy=deepspeed", "strategy.stage=2"], 2),
    "deepspeed ZeRO-3": (["strategy=deepspeed", "strategy.stage=3"], 2),
}
SIZES = {"tiny": ["model=tiny", "model.n_layer=4"], "shakespeare_cpu": ["model=shakespeare_cpu"]}


def run_one(overrides: list[str], ranks: int, run_dir: Path, data_dir: Path) -> dict:
    """Train one step; the estimate for its config and the largest rank's measured parts (bytes)."""
    cmd = [sys.executable, "-m", "launch", *overrides, f"cluster.tasks_per_node={ranks}", "train.max_steps=1",
           "train.eval_interval=0", "train.global_batch_size=8", "train.progress=false", "health.enabled=false",
           "checkpoint.interval_steps=0", f"data.text_path={SHARED_TEXT}", f"data.dir={data_dir}",
           f"hydra.run.dir={run_dir}", f"run={run_dir.name}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1]}
    run = launch_config.load(run_dir / "config.yaml")
    model = model_config(run.model, Path(run.data.dir))
    dims = plan_layout(run.strategy, run.parallel, model, ranks, ranks)
    micro, _ = run.train.micro_batches(dims.dp)
    est = estimate(model, run.train, run.strategy, dims, micro)
    held = [json.loads(line) for f in sorted((run_dir / "metrics").glob("rank*.jsonl"))
            for line in f.read_text().splitlines() if '"kind": "memory"' in line]
    out = {}
    for part in (*PARTS, "peak"):
        measured = max(r[f"mem/{part}_gib"] for r in held) * 2**30
        out[part] = {"estimate": getattr(est, part), "measured": measured,
                     "error": getattr(est, part) / measured - 1 if measured else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(CONFIGS))
    parser.add_argument("--sizes", nargs="*", default=list(SIZES))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gptlaunch-memory-fit-"))
    results: dict[str, dict] = {}
    print(f"{'model':<16} {'configuration':<24} " + " ".join(f"{p:>12}" for p in (*PARTS, "peak")))
    for size in args.sizes:
        for name in args.only:
            overrides, ranks = CONFIGS[name]
            key = f"{size} {name}"
            run_dir = folder / re.sub(r"[^\w.-]", "_", key)
            results[key] = got = run_one([*SIZES[size], *overrides], ranks, run_dir, folder / "data")
            cells = [got["error"]] if "error" in got else [
                "n/a" if got[p]["error"] is None else f"{got[p]['error']:+.1%}" for p in (*PARTS, "peak")]
            print(f"{size:<16} {name:<24} " + " ".join(f"{c:>12}" for c in cells), flush=True)
    print("each cell: the estimate's error against the largest rank's measured figure (+: the estimate is higher)")
    save_results("memory_fit", results)


if __name__ == "__main__":
    main()
