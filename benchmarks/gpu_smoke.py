"""The first run on a GPU machine: every strategy for a few steps on the GPUs found (1, 2 or 8), with a checkpoint,
a resume and a USR2 preemption each; then gpt2_124m's MFU in bf16 with and without torch.compile. One table.

    python -m benchmarks.gpu_smoke              # on a machine with 1, 2 or 8 GPUs
    python -m benchmarks.gpu_smoke --dry-run    # anywhere: print the plan, run nothing

Each run goes through `python -m launch` (cluster=local) as a user's would. Per strategy, in one run folder:
  1. train 12 steps, checkpointing every 6;
  2. the same command with train.max_steps=18 resumes from step 12 (the run folder's newest checkpoint);
  3. train.max_steps=24 with debug.signal_at_step=20: rank 0 sends itself SIGUSR2, every rank saves at step 20 and
     the run exits non-zero (preempted; outside Slurm nothing requeues it); the same command again finishes at 24.
Writes benchmarks/results/gpu_smoke.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED_TEXT, save_results  # noqa: E402

PREEMPTED = "nonzero"  # a preempted local run exits non-zero: "run the same command again"
PIPELINE = ["strategy=pipeline", "strategy.microbatches=4"]
# name -> (overrides, the fewest GPUs it needs, the most it uses: None for all of them)
STRATEGIES: dict[str, tuple[list[str], int, int | None]] = {
    "single": (["strategy=single"], 1, 1),  # one process is the point of that row
    "ddp": (["strategy=ddp"], 1, None),
    "zero1": (["strategy=zero1"], 1, None),
    "fsdp": (["strategy=fsdp"], 1, None),
    "fsdp cpu_offload": (["strategy=fsdp", "strategy.cpu_offload=true"], 1, None),
    "fsdp x tp": (["strategy=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true"], 2, None),
    "hsdp": (["strategy=fsdp", "parallel.dp_replicate=2"], 2, None),
    "deepspeed ZeRO-1": (["strategy=deepspeed", "strategy.stage=1"], 1, None),
    "deepspeed ZeRO-2": (["strategy=deepspeed", "strategy.stage=2"], 1, None),
    "deepspeed ZeRO-3": (["strategy=deepspeed", "strategy.stage=3"], 1, None),
    "pipeline 1f1b": ([*PIPELINE, "strategy.schedule=1f1b"], 2, None),
    "pipeline interleaved": ([*PIPELINE, "strategy.schedule=interleaved"], 2, None),
}
SMOKE = ["model=tiny", "train.precision=bf16", "train.device=cuda", "train.global_batch_size=16",
         "train.log_interval=1", "train.eval_interval=6", "train.eval_batches=2", "train.progress=false",
         "checkpoint.interval_steps=6", "checkpoint.async=true"]
PREEMPT = ["train.max_steps=24", "debug.signal_at_step=20", "debug.signal_name=SIGUSR2"]
ATTEMPTS = [("train", ["train.max_steps=12"], 0), ("resume", ["train.max_steps=18"], 0),
            ("preempt", PREEMPT, PREEMPTED), ("same command again", PREEMPT, 0)]
MFU = ["model=gpt2_124m", "strategy=single", "train.precision=bf16", "train.device=cuda", "train.max_steps=60",
       "train.global_batch_size=16", "train.log_interval=20", "train.eval_interval=0", "train.progress=false",
       "checkpoint.interval_steps=0", "data=shakespeare_bpe"]


def world_for(gpus: int) -> int:
    return max(n for n in (1, 2, 8) if n <= gpus) if gpus else 0


def smoke_runs(world: int) -> list[tuple[str, list[str], int]]:
    runs = []
    for name, (overrides, need, most) in STRATEGIES.items():
        ranks = min(world, most or world)
        if need <= world:
            runs.append((name, [*overrides, "cluster.nodes=1", f"cluster.tasks_per_node={ranks}"], ranks))
    return runs


def command(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch", f"hydra.run.dir={run_dir}", f"data.text_path={SHARED_TEXT}",
            *overrides]


def smoke(name: str, overrides: list[str], folder: Path) -> dict:
    """The four attempts of one strategy in one run folder; stops at the first that does not end as expected."""
    run_dir = folder / name.replace(" ", "_")
    out: dict = {"attempts": []}
    for label, extra, expected in ATTEMPTS:
        proc = subprocess.run(command(run_dir, [*SMOKE, *overrides, *extra]), cwd=REPO, capture_output=True, text=True)
        out["attempts"].append(label)
        if (proc.returncode == 0) != (expected == 0):
            out["error"] = f"{label}: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
            return out
    records = [json.loads(x) for x in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    out.update(steps=[r["step"] for r in train] == list(range(24)), loss=train[-1]["loss"],
               tokens_per_s=train[-1]["tokens_per_s"], peak_gib=train[-1].get("mem/peak_gib"))
    return out


def mfu(compile_: bool, folder: Path) -> dict:
    run_dir = folder / f"mfu_compile_{compile_}"
    proc = subprocess.run(command(run_dir, [*MFU, f"train.compile={str(compile_).lower()}"]), cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    last = [json.loads(x) for x in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()][-1]
    return {"mfu": last.get("mfu"), "tokens_per_s": last["tokens_per_s"], "peak_gib": last.get("mem/peak_gib")}


def print_plan(world: int) -> None:
    print(f"plan for {world} GPU rank(s) (1, 2 or 8, the most the machine has):")
    for name, overrides, ranks in smoke_runs(world):
        print(f"  {name:22} {ranks} rank(s): " + " -> ".join(a for a, _, _ in ATTEMPTS) + f"   [{' '.join(overrides)}]")
    print(f"  gpt2_124m MFU, bf16, eager and compiled: {' '.join(MFU)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    args = ap.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    world = world_for(gpus)
    if args.dry_run or not gpus:
        print_plan(world or 8)
        print(f"\nNO GPU WORK DONE: {'--dry-run' if args.dry_run else 'this machine has no CUDA GPU'}; "
              "run it without --dry-run on a machine with 1, 2 or 8 GPUs")
        sys.exit(0 if args.dry_run else 2)
    print_plan(world)
    results: dict = {"gpus": gpus, "world": world, "device": torch.cuda.get_device_name(0), "smoke": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides, _ in smoke_runs(world):
            results["smoke"][name] = smoke(name, overrides, Path(tmp))
            print(f"  {name}: {results['smoke'][name].get('error', 'ok')}", flush=True)
        results["mfu"] = {"eager": mfu(False, Path(tmp)), "compiled": mfu(True, Path(tmp))}
    print(f"\n{results['device']} x {world}")
    print(f"{'strategy':22} {'result':40} {'loss':>7} {'tokens/s':>10} {'peak GiB':>9}")
    for name, r in results["smoke"].items():
        status = r.get("error") or ("train, resume, USR2 + resume: ok" if r.get("steps") else "steps missing")
        print(f"{name:22} {status[:40]:40} {r.get('loss', float('nan')):7.3f} {r.get('tokens_per_s', 0):10,.0f} "
              f"{r.get('peak_gib') or float('nan'):9.2f}")
    for mode, r in results["mfu"].items():
        print(f"gpt2_124m bf16 {mode:8}: " + (r["error"] if "error" in r else
              f"MFU {r['mfu']:.1%}, {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gib']:.1f} GiB"))
    print(f"results: {save_results('gpu_smoke', results)}")


if __name__ == "__main__":
    main()
