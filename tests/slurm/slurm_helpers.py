"""Helpers for the tests that run gptlaunch on the local Slurm cluster."""
from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from helpers import REPO, launch_here, whole_lines

GOLDEN = Path(__file__).resolve().parent / "golden"
# A few seconds of training per job; every step is recorded.
TINY = ["model=tiny", "strategy=ddp", "train.max_steps=6", "train.warmup_steps=2", "train.log_interval=1",
        "train.eval_interval=0", "train.progress=false", "checkpoint.interval_steps=0"]
SLURM = ["cluster=slurm", "cluster.time_min=10", "hydra.launcher.progress=false", "hydra.launcher.poll_s=0.5"]


def launch_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "launch", *overrides]


def run_launch(env: dict[str, str], *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(*overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train_records(run_dir: Path, rank: int = 0) -> list[dict]:
    lines = whole_lines(run_dir / "metrics" / f"rank{rank}.jsonl")
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def losses(run_dir: Path, rank: int = 0) -> list[float]:
    return [r["loss"] for r in train_records(run_dir, rank)]


def environments(run_dir: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((run_dir / "environment").glob("rank*.json"))]


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def normalise(script: str, logs: Path | str) -> str:
    """An sbatch script with its paths replaced: the log folder by <LOGS>, the interpreter by <PYTHON>."""
    script = script.replace(str(logs), "<LOGS>")
    # the code snapshot's lines (launch.snapshot) name a folder per submission; tests/slurm/test_detached.py runs them
    script = re.sub(r"export PYTHONPATH=<LOGS>/code/\S+\nexport PYTHONSAFEPATH=1\n", "", script)
    for python in {sys.executable, shlex.quote(sys.executable)}:
        script = script.replace(python, "<PYTHON>")
    return script


def local_reference(run_dir: Path, *overrides: str) -> Path:
    """The uninterrupted run that an interrupted Slurm run must equal: 2 ranks on this machine, same config (in this
    process: helpers.launch_here)."""
    proc = launch_here(["cluster=local", "nodes=2", *overrides, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, output(proc)
    return run_dir


@contextlib.contextmanager
def cut_link(cluster, node: str) -> Iterator[float]:
    """`node` cut off the network for the block (the host side of its link down; slurm/local_cluster.sh names it);
    yields when the link went down (time.time()). The link comes back up however the block ends."""
    veth = cluster.veth(node)
    subprocess.run(["ip", "link", "set", veth, "down"], check=True)
    try:
        yield time.time()
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
