"""Experiment trackers (tracking=wandb offline, tracking=mlflow on its file store), with the real packages: one
tracker run per gptlaunch run, continued by the next attempt, and every point of rank 0's metrics logged once,
even when an attempt dies after logging steps its successor trains again, or before its tracker wrote its last
points (W&B's service dies with its rank)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, launch
from tracker_points import assert_tracked_once, expected_points, tracker_artifacts, tracker_points

pytestmark = pytest.mark.slow

RUN = ["model=tiny", "train.max_steps=16", "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=8",
       "checkpoint.interval_steps=5"]


# W&B across a run's attempts: test_preemption's soak (one W&B run over five attempts)
@pytest.mark.parametrize("kind", ["mlflow"])
def test_a_killed_attempt_and_its_continuation_log_each_point_once(tmp_path, kind):
    run_dir = tmp_path / "run"
    # rank 0 dies in step 13 (from 0) after logging 13 steps done; the next attempt resumes from step 10
    killed = launch(f"tracking={kind}", *RUN, "debug.kill_rank=0", "debug.kill_step=13", "preemption.in_job_restarts=0", run_dir=run_dir,
                    check=False)
    assert killed.returncode != 0
    ids, before = tracker_points(kind, run_dir)
    last = max(step for _, step in before)
    assert len(ids) == 1 and (last == 13 if kind == "mlflow" else last >= 5), sorted(before)
    launch(f"tracking={kind}", *RUN, run_dir=run_dir)
    assert_tracked_once(kind, run_dir, ids)
    assert {step for key, step in expected_points(run_dir) if key == "train/loss"} == set(range(1, 17))
    report = subprocess.run([sys.executable, "-m", "launch.report", str(run_dir)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "report/scaling.md" in tracker_artifacts(kind, run_dir)  # the report, attached to the same run
    assert tracker_points(kind, run_dir)[0] == ids
