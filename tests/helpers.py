"""Shared test helpers, imported by name from any test (setup.cfg puts tests/ on the path): run `python -m launch`
as a user would, read what a run folder holds, and compose configs as the app does."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*overrides: str, run_dir: Path, check: bool = True, timeout: float = 600,
           env: dict[str, str] | None = None, multirun: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m launch [-m]` with Hydra overrides into `run_dir` (a sweep: into hydra.sweep.dir)."""
    where = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    cmd = [sys.executable, "-m", "launch", *(["-m"] if multirun else []), where, "train.progress=false", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path, rank: int = 0, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run_dir: Path, rank: int = 0) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, rank)]


def compose(*overrides: str):
    """The config `python -m launch OVERRIDES` would run, composed by Hydra (no run folder, nothing runs)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def plan(run_dir: Path, *overrides: str) -> Path:
    """What `python -m launch OVERRIDES` plans into `run_dir` (its config.yaml, for a Trainer run in this process)."""
    from launch import launch_config
    from launch.planning.plan import make_plan

    make_plan(launch_config.parse(compose(*overrides)), run_dir)
    return run_dir
