"""A point that fails in a sweep on this machine is a failed point, as a failed job is on a cluster: the others
still run, the report is written, and the sweep exits 1 naming it; a search records it as a failed trial and goes
on. (A user's error or Ctrl-C still stops the sweep, as it stops a single run.)"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from helpers import launch

RUN = ["model=tiny", "strategy=single", "train.max_steps=6", "train.eval_interval=3", "train.log_interval=1",
       "train.warmup_steps=2", "checkpoint.interval_steps=2"]


def ended(point: Path) -> list[str]:
    return [json.loads(line)["ended"] for line in (point / "attempts.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_diverged_point_fails_alone_and_the_sweep_runs_the_rest_and_reports(tmp_path: Path, data_overrides):
    sweep = tmp_path / "sweep"
    proc = launch(*RUN, "debug.nan_at_step=1000,3,1001", *data_overrides, run_dir=sweep, multirun=True, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert ended(sweep / "debug.nan_at_step=1000") == ended(sweep / "debug.nan_at_step=1001") == ["finished"]
    assert ended(sweep / "debug.nan_at_step=3")[0].startswith("diverged: the run diverged at step 3")
    assert proc.stderr.rstrip().endswith("error: 1 of 3 point(s) failed: debug.nan_at_step=3; errors above")
    report = (sweep / "report" / "scaling.md").read_text()
    assert "`debug.nan_at_step=3` at step 4 of 6 (diverged)" in report, report


@pytest.mark.slow
def test_a_diverged_trial_is_a_failed_trial_and_the_search_goes_on(tmp_path: Path, data_overrides):
    sweep = tmp_path / "sweep"
    proc = launch("hydra/sweeper=optuna", "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=2",
                  "debug.nan_at_step=choice(3,1000)", *RUN, *data_overrides, run_dir=sweep, multirun=True)
    with sqlite3.connect(sweep / "optuna.db") as db:
        states = dict(db.execute("SELECT number, state FROM trials").fetchall())
    assert sorted(states.values()) == ["COMPLETE", "FAIL"], states
    failed = next(n for n, s in states.items() if s == "FAIL")
    assert f"optuna: trial {failed} failed: its run failed (run folder " in proc.stderr, proc.stderr[-3000:]
