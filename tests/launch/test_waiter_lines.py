"""What the login-node waiter says while a job runs: one line per attempt that requeued the job, once."""
from __future__ import annotations

import json
from pathlib import Path

from launch.backends import Point
from launch.backends.slurm.submit import Submitted, Watch


def attempt(job_id: str, restart: int, **fields) -> str:
    return json.dumps({"job_id": job_id, "restart": restart, **fields}) + "\n"


def test_each_requeue_of_this_job_is_told_once(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    point = Point(label="nodes=3", run_dir=run_dir, job_name="gptlaunch", resources=None)
    job = Submitted(point, "19", tmp_path)
    log = run_dir / "attempts.jsonl"
    log.write_text(attempt("7", 0, ended="finished", requeued=False)  # an earlier job of the same run
                   + attempt("19", 0, ended="excluded gl-n2", last_step=None, requeued=True,
                             note="requeued job 19 (restart 1 of at most 10), without gl-n2 (ExcNodeList)"))
    watch = Watch()
    watch.tell_requeues([job])
    with open(log, "a") as f:
        f.write(attempt("19", 1, ended="preempted:SIGUSR2", last_step=40, requeued=True,
                        note="requeued job 19 (restart 2 of at most 10)") + '{"job_id": "19", "rest')  # being written
    watch.tell_requeues([job])
    watch.tell_requeues([job])
    assert capsys.readouterr().err.splitlines() == [
        "job 19 (nodes=3): attempt 0 ended (excluded gl-n2) before its first step: requeued job 19 (restart 1 of "
        "at most 10), without gl-n2 (ExcNodeList)",
        "job 19 (nodes=3): attempt 1 ended (preempted:SIGUSR2) at step 40: requeued job 19 (restart 2 of at most 10)",
    ]
