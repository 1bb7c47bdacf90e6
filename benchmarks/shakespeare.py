"""Learning quality: validation loss against wall time on Tiny Shakespeare, character level.

    python benchmarks/shakespeare.py            # CPU recipe: 4 layers, width 128, block 64, batch 12, 2,000 steps
    python benchmarks/shakespeare.py --gpu      # GPU recipe: the shakespeare_char preset (target: val loss <= 1.47)

Runs `python -m launch` exactly as a user would and reads the run folder's metrics.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED_TEXT, save_results  # noqa: E402

RECIPES = {
    "cpu": ["model=shakespeare_cpu", "train=default", "train.max_steps=2000", "train.eval_interval=200",
            "train.eval_batches=20"],
    "gpu": ["model=shakespeare_char", "train=shakespeare_char"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU recipe (shakespeare_char preset)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    recipe = "gpu" if args.gpu else "cpu"
    run_dir = REPO / "runs" / "benchmarks" / f"shakespeare-{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    data = [] if (REPO / "data/tinyshakespeare/input.txt").exists() else [f"data.text_path={SHARED_TEXT}"]
    cmd = [sys.executable, "-m", "launch", f"hydra.run.dir={run_dir}", "train.progress=false", *data,
           *RECIPES[recipe], *args.overrides]
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    records = [json.loads(line) for line in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["elapsed_s"], r["loss"]) for r in records if r["kind"] == "val"]
    print(f"\n{recipe} recipe, run folder {run_dir}")
    print("| step | wall s | val loss |\n|---:|---:|---:|")
    for step, wall, loss in curve:
        print(f"| {step} | {wall:.0f} | {loss:.4f} |")
    best = min(loss for _, _, loss in curve)
    print(f"\nfinal val loss {curve[-1][2]:.4f}, best {best:.4f}, training {curve[-1][1]:.0f} s, "
          f"whole command {time.time() - start:.0f} s")
    save_results(f"shakespeare_{recipe}", {"run_dir": str(run_dir), "curve": curve, "best_val_loss": best})


if __name__ == "__main__":
    main()
