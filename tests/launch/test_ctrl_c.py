"""Ctrl-C in a local run: every rank saves at the next step and stops, with one line naming the command that
continues the run, and no traceback; that command continues it bitwise."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, launch, losses

RUN = ["model=tiny", "cluster.nodes=2", "strategy=ddp", "train.max_steps=60", "train.log_interval=1",
       "train.eval_interval=0", "checkpoint.interval_steps=1000", "debug.delay_rank=0", "debug.delay_s=0.05",
       "train.progress=false"]


def interrupted(run: Path, overrides: list[str], after: int, signum: int) -> tuple[subprocess.Popen, str]:
    """A local run in its own process group, sent `signum` once rank 0 logged `after` steps; (it, its stderr)."""
    cmd = [sys.executable, "-m", "launch", *overrides, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = run / "metrics" / "rank0.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= after) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signum)
    return proc, proc.communicate(timeout=120)[1]


@pytest.mark.slow
def test_ctrl_c_saves_stops_and_the_printed_command_continues(tmp_path, data_overrides):
    reference, run = tmp_path / "reference", tmp_path / "run"
    launch(*RUN, *data_overrides, run_dir=reference)
    proc, err = interrupted(run, [*RUN, *data_overrides], 10, signal.SIGINT)  # what a terminal sends
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    stopped_at = len(losses(run))
    assert 10 <= stopped_at < 60 and (run / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").is_file()
    again = err.split("Continue with:\n", 1)[1].splitlines()[0].strip()
    assert again.startswith("python -m launch ") and f"hydra.run.dir={run}" in again
    resumed = subprocess.run([sys.executable, *shlex.split(again)[1:]], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run) == losses(reference)  # every step once, bitwise


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_stops_like_ctrl_c(tmp_path, data_overrides):
    """`kill -TERM -PGID` (a process manager, a closed terminal) ends as Ctrl-C does: saved, one line, no Hydra
    'Error executing job' and no traceback."""
    run = tmp_path / "run"
    proc, err = interrupted(run, [*RUN, *data_overrides], 5, signal.SIGTERM)
    assert proc.returncode == 2, err[-3000:]
    assert "Error executing job" not in err and "Traceback" not in err, err[-3000:]
    assert "SIGTERM: every rank saves at its next step, then stops" in err, err[-3000:]
    stopped_at = len(losses(run))
    assert (run / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").is_file(), err[-3000:]
    assert "Continue with:\n  python -m launch " in err
