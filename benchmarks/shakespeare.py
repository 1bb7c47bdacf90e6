"""Learning quality: validation loss against wall time on Tiny Shakespeare, character level.

    python benchmarks/shakespeare.py            # CPU recipe: 4 layers, width 128, block 64, batch 12, 2,000 steps
    python benchmarks/shakespeare.py --gpu      # GPU recipe: the shakespeare_char preset (target: val loss <= 1.47)
    python benchmarks/shakespeare.py --gpu --nanogpt ~/nanoGPT --max-steps 2000
        # then nanoGPT's own train.py on the same GPU, its recipe to the same step: one table, side by side
    python benchmarks/shakespeare.py --gpu --warm --nanogpt ~/nanoGPT --max-steps 2000
        # ours with the compiled graphs of a run before it (a requeue, a rerun): a 2-step run compiles them first

Runs `python -m launch` exactly as a user would and reads the run folder's metrics; seconds count from each
command's start. Beside nanoGPT each command compiles into empty Inductor and Triton caches of its own, so that
neither reuses the other's kernels. `--max-steps` stops early and keeps the schedule (the recipe's decay steps).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED_TEXT, save_results  # noqa: E402

RECIPES = {
    "cpu": ["model=shakespeare_cpu", "train=default", "train.max_steps=2000", "train.decay_steps=2000",
            "train.eval_interval=200", "train.eval_batches=20"],
    "gpu": ["model=shakespeare_char", "train=shakespeare_char"],
}
TARGET = 1.47  # the GPU recipe's validation loss, nanoGPT's best on this model
# --warm: a run that compiles the recipe's training and evaluation graphs into the cache the measured run then reads
PRIMER = ["train.max_steps=2", "train.eval_interval=1", "checkpoint.interval_steps=0"]
NANOGPT_EVAL = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")
Curve = list[tuple[int, float, float]]  # (step, seconds from the command's start, validation loss)


def run_ours(recipe: str, overrides: list[str], max_steps: int | None, env: dict[str, str],
             name: str = "") -> tuple[Curve, Path]:
    run_dir = REPO / "runs" / "benchmarks" / f"shakespeare-{recipe}{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    data = [] if (REPO / "data/tinyshakespeare/input.txt").exists() else [f"data.text_path={SHARED_TEXT}"]
    steps = [f"train.max_steps={max_steps}"] if max_steps else []
    cmd = [sys.executable, "-m", "launch", f"hydra.run.dir={run_dir}", "train.progress=false", *data,
           *RECIPES[recipe], *steps, *overrides]
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, env=env)
    records = [json.loads(line) for line in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()]
    return [(r["step"], r["time"] - start, r["loss"]) for r in records if r["kind"] == "val"], run_dir


def run_nanogpt(folder: Path, max_steps: int | None, env: dict[str, str]) -> Curve:
    """nanoGPT's `train.py config/train_shakespeare_char.py` in its checkout `folder`: its evaluations as they are
    printed. Its corpus is prepared from ours first if it has none (its prepare.py would download it)."""
    data = folder / "data" / "shakespeare_char"
    if not (data / "train.bin").exists():
        if not (data / "input.txt").exists():
            local = REPO / "data/tinyshakespeare/input.txt"
            shutil.copyfile(local if local.exists() else SHARED_TEXT, data / "input.txt")
        subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, env=env)
    cmd = [sys.executable, "-u", "train.py", "config/train_shakespeare_char.py",
           *([f"--max_iters={max_steps}"] if max_steps else [])]
    curve: Curve = []
    start = time.time()
    with subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:
            if m := NANOGPT_EVAL.search(line):
                curve.append((int(m[1]), time.time() - start, float(m[2])))
    if proc.returncode:
        sys.exit(f"nanoGPT's train.py exited {proc.returncode}: {' '.join(cmd)} in {folder}")
    return curve


def summary(name: str, curve: Curve, target: float | None) -> str:
    """The best loss and when it came; with a target, when the curve first reached it."""
    step, wall, loss = min(curve, key=lambda p: p[2])
    line = f"{name}: best val loss {loss:.4f} at step {step} ({wall:.1f} s)"
    if target is not None:
        reached = next((p for p in curve if p[2] <= target), None)
        line += f"; {target} or less: " + (f"at step {reached[0]} ({reached[1]:.1f} s)" if reached else "never")
    return line


def ratio(curves: dict[str, Curve], target: float) -> str | None:
    """The first curve's time to the target over the second's, where both reached it."""
    (a, ours), (b, theirs) = list(curves.items())[:2]
    times = [next((wall for _, wall, loss in c if loss <= target), None) for c in (ours, theirs)]
    if None in times:
        return None
    return f"to {target}: {a} {times[0]:.1f} s, {b} {times[1]:.1f} s: {times[0] / times[1]:.2f}x the time"


def table(curves: dict[str, Curve]) -> str:
    names = list(curves)
    rows = ["| step | " + " | ".join(f"{n}: s, val loss" for n in names) + " |",
            "|---:|" + "---:|" * len(names)]
    by_step = [{s: (w, v) for s, w, v in curves[n]} for n in names]
    for step in sorted({s for points in by_step for s in points}):
        cells = [f"{p[step][0]:.1f}, {p[step][1]:.4f}" if step in p else "-" for p in by_step]
        rows.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def fresh_caches(folder: Path) -> dict[str, str]:
    """The environment of a command whose compilations start from empty caches."""
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"),
            "TRITON_CACHE_DIR": str(folder / "triton")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU recipe (shakespeare_char preset)")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout: run its train.py after ours (GPU recipe)")
    parser.add_argument("--max-steps", type=int, help="stop at this step, the schedule kept")
    parser.add_argument("--warm", action="store_true",
                        help="ours with the compile cache of a 2-step run of the same recipe before it")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.nanogpt and not (args.gpu and (args.nanogpt / "train.py").is_file()):
        parser.error("--nanogpt takes a nanoGPT checkout (its train.py) and compares the GPU recipe: add --gpu")
    recipe = "gpu" if args.gpu else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        fresh = args.nanogpt or args.warm
        env = (lambda name: fresh_caches(Path(tmp) / name)) if fresh else (lambda name: dict(os.environ))
        overrides = list(args.overrides)
        if args.warm:
            overrides.append(f"train.compile_cache_dir={Path(tmp) / 'ours' / 'graphs'}")
            run_ours(recipe, [*overrides, *PRIMER], None, env("ours"), "-primer")
        ours, run_dir = run_ours(recipe, overrides, args.max_steps, env("ours"))
        curves = {"gptlaunch, warm cache" if args.warm else "gptlaunch": ours}
        if args.nanogpt:
            curves["nanoGPT"] = run_nanogpt(args.nanogpt, args.max_steps, env("nanogpt"))
    target = TARGET if args.gpu else None
    print(f"\n{recipe} recipe, run folder {run_dir}\n{table(curves)}\n")
    print("\n".join(summary(name, curve, target) for name, curve in curves.items()))
    if target is not None and len(curves) == 2 and (line := ratio(curves, target)):
        print(line)
    save_results(f"shakespeare_{recipe}", {"run_dir": str(run_dir), "warm": args.warm, "curves": curves,
                                           "best_val_loss": {n: min(v for _, _, v in c) for n, c in curves.items()}})


if __name__ == "__main__":
    main()
