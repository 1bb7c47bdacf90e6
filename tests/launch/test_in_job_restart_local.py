"""In-job restarts under cluster=local (launch.recovery.rounds): the launcher starts a new round of ranks instead of
failing, resumes from the newest checkpoint exactly, and never loops on a fault that repeats without progress."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import launch, read_metrics

RUN = ["model=tiny", "strategy=ddp", "cluster.tasks_per_node=2", "train.max_steps=16", "train.warmup_steps=2",
       "train.log_interval=1", "train.eval_interval=0", "checkpoint.interval_steps=5"]


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_killed_local_rank_restarts_the_ranks_and_finishes_exactly(tmp_path, data_overrides):
    reference = launch(*RUN, *data_overrides, run_dir=tmp_path / "reference")
    assert reference.returncode == 0
    proc = launch(*RUN, *data_overrides, "debug.kill_rank=1", "debug.kill_step=8", run_dir=tmp_path / "run")
    log = lines(tmp_path / "run")
    assert [(a.get("in_job_restart"), a.get("round", 0)) for a in log] == [(1, 0), (None, 1)], log
    # the launcher saw rank 1 killed, or rank 0's watchdog saw it gone first: either names it
    assert log[0].get("lost_rank") == 1 or "rank 1 on " in log[0].get("hang", ""), log[0]
    assert log[1]["ended"] == "finished", log[1]
    assert log[0]["note"].startswith("restarting inside the allocation (in-job restart 1 of at most 3"), log[0]
    assert log[1]["first_step"] == 5, log[1]
    assert "restarting inside the allocation (round 1)" in proc.stderr, proc.stderr[-3000:]
    ours = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run")}
    assert ours == {r["step"]: r["loss"] for r in read_metrics(tmp_path / "reference")}  # bitwise, every step


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_hang_on_every_attempt_restarts_once_then_fails_clearly(tmp_path, data_overrides):
    """No second recovery without a newer checkpoint: one in-job restart, then the run stops naming the hang."""
    proc = launch(*RUN, *data_overrides, "debug.hang_rank=1", "debug.hang_step=7", "debug.hang_every_attempt=true",
                  "watchdog.step_s=4", run_dir=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    log = lines(tmp_path)
    assert [(a["ended"], a.get("in_job_restart")) for a in log] == [("hang", 1), ("hang", None)], log
    assert log[1]["note"].startswith("not requeued: the attempt before hung too, and no checkpoint newer than step 5"), \
        log[1]["note"]
    assert "watchdog:" in proc.stderr.splitlines()[-1] or "hang" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_killed_rank_without_restarts_is_a_failed_run_exit_1(tmp_path, data_overrides):
    """A failed run is exit code 1 (2 is for the user's errors): a rank killed with no in-job restart left."""
    proc = launch(*RUN, *data_overrides, "debug.kill_rank=1", "debug.kill_step=3", "preemption.in_job_restarts=0",
                  run_dir=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rank 1 was killed by SIGKILL" in proc.stderr.splitlines()[-1] or "hang" in proc.stderr, proc.stderr[-2000:]
