"""Shared test helpers: run `python -m launch` as a user would and read what the run folder holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


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


@pytest.fixture(scope="session")
def data_overrides(tmp_path_factory) -> list[str]:
    """Point runs at the shared corpus and a prepared copy private to this test session."""
    assert SHAKESPEARE.is_file(), f"the test corpus is missing: {SHAKESPEARE}"
    prepared = tmp_path_factory.mktemp("data") / "shakespeare_char"
    return [f"data.text_path={SHAKESPEARE}", f"data.dir={prepared}"]
