"""A warmup-stable-decay trunk and its branches against cosine runs of the same lengths, side by side in one session
(train.schedule=wsd, docs/fault-tolerance.md#a-schedule-that-can-always-go-on).

Cosine: one run per length, each from scratch. WSD: one trunk to the longest length, checkpointed through its stable
phase, and for each shorter length a branch that decays off the trunk's checkpoint at 80% of it (anneal from step S:
max_steps = S / (1 - decay_fraction)). Prints each length's validation loss both ways, and the steps and wall time
each way trained in all. Then an extension: a wsd run stopped early and continued with a larger max_steps takes the
trunk's steps exactly (its losses against the uninterrupted trunk's).

    python benchmarks/wsd.py [--lengths 400 800 1000]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED_TEXT, save_results  # noqa: E402
from gpt.run_folder import RunFolder, read_json_lines  # noqa: E402

DECAY = 0.2
COMMON = ["model=tiny", "strategy=single", "train.warmup_steps=20", "train.lr=3e-3", "train.min_lr=3e-4",
          "train.log_interval=10", "train.eval_batches=20", "train.progress=false", f"data.text_path={SHARED_TEXT}"]


def run(folder: Path, *overrides: str, check: bool = True) -> float:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launch", f"hydra.run.dir={folder}", *COMMON, *overrides], cwd=REPO,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"{folder.name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.monotonic() - started


def records(folder: Path, kind: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_json_lines(RunFolder(folder).metrics_file(0)) if r.get("kind") == kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[400, 800, 1000])
    args = parser.parse_args()
    lengths = sorted(args.lengths)
    every = lengths[0] * (1 - DECAY) / 4  # checkpoints at every branch point (each length's 80%)
    root = Path(tempfile.mkdtemp(prefix="gptlaunch-wsd-"))
    data = f"data.dir={root / 'data'}"
    run(root / "prepare", data, "train.max_steps=1", "train.eval_interval=0")  # data prepared outside the timings
    cosine = {n: (run(root / f"cosine_{n}", data, f"train.max_steps={n}", f"train.eval_interval={n}"), n)
              for n in lengths}
    trunk, top = root / "trunk", lengths[-1]
    wsd = {top: (run(trunk, data, "train.schedule=wsd", f"train.max_steps={top}", f"train.eval_interval={top}",
                     f"checkpoint.interval_steps={int(every)}", "checkpoint.keep=100"), top)}
    for n in lengths[:-1]:
        start = round(n * (1 - DECAY))
        wall = run(root / f"branch_{n}", data, "train.schedule=wsd", f"train.max_steps={n}", f"train.eval_interval={n}",
                   f"resume={trunk / 'checkpoints' / f'step_{start:08d}'}")
        wsd[n] = (wall, n - start)
    val = {"cosine": {n: records(root / f"cosine_{n}", "val")[n] for n in lengths},
           "wsd": {n: records(trunk if n == top else root / f"branch_{n}", "val")[n] for n in lengths}}
    print(f"{'length':>7s} {'cosine val':>11s} {'wsd val':>9s}")
    for n in lengths:
        print(f"{n:7d} {val['cosine'][n]:11.4f} {val['wsd'][n]:9.4f}")
    ways = {"cosine": cosine, "wsd": wsd}
    totals = {w: (sum(s for _, s in runs.values()), sum(t for t, _ in runs.values())) for w, runs in ways.items()}
    for w, (steps, wall) in totals.items():
        print(f"{w:7s} {steps:6d} steps trained in all, {wall:6.1f} s")
    # Extension: a run of the shortest length stopped half way through its stable phase, then the same command with
    # the trunk's max_steps
    extended, stop = root / "extended", round(lengths[0] * (1 - DECAY) / 2)
    first = ["train.schedule=wsd", f"train.eval_interval={top}", f"debug.signal_at_step={stop}",
             "debug.signal_name=SIGTERM"]
    run(extended, data, *first, f"train.max_steps={lengths[0]}", check=False)
    run(extended, data, "train.schedule=wsd", f"train.eval_interval={top}", f"train.max_steps={top}")
    a, b = records(extended, "train"), records(trunk, "train")
    diff = max(abs(a[s] - b[s]) for s in b)
    print(f"extension: stopped at step {stop} of max_steps={lengths[0]}, continued to {top}: the largest difference "
          f"from the uninterrupted trunk's {len(b)} logged losses is {diff:.2e}")
    save_results("wsd", {"val": val, "totals": totals, "extension_max_abs_diff": diff})


if __name__ == "__main__":
    main()
