"""Hangs on the real local Slurm cluster (2 nodes): the watchdog reports the hang within its budget plus a margin,
naming the rank, its host and the collective; the job requeues itself and finishes exactly as an uninterrupted
run (bitwise losses and final weights)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from slurm_helpers import SLURM, TINY, local_reference, output, run_launch
from test_preemption import assert_same_run, attempts

pytestmark = pytest.mark.slurm

STEPS = 80
STEP_S = 10
RUN = [o for o in TINY if not o.startswith(("train.max_steps", "checkpoint.interval_steps"))] + [
    f"train.max_steps={STEPS}", "checkpoint.interval_steps=20", "debug.delay_rank=0", "debug.delay_s=0.05"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_overrides) -> Path:
    return local_reference(tmp_path_factory.mktemp("reference") / "run", *RUN, *data_overrides)


@pytest.mark.timeout(420)
def test_hang_at_step_50_is_reported_requeued_and_finishes_exactly(slurm_cluster, tmp_path, data_overrides,
                                                                   reference):
    run_dir = tmp_path / "run"
    proc = run_launch(slurm_cluster.env, *SLURM, "nodes=2", *RUN, *data_overrides, "debug.hang_rank=1",
                      "debug.hang_step=50", f"watchdog.step_s={STEP_S}", f"hydra.run.dir={run_dir}", timeout=400)
    assert proc.returncode == 0, output(proc)
    report = json.loads((run_dir / "hang-1.json").read_text())
    hung = report["ranks"][1]
    detected_after = report["time"] - (hung["time"] - hung["idle_s"])
    assert STEP_S <= detected_after < STEP_S + 30, detected_after
    host0, host1 = report["ranks"][0]["host"], hung["host"]
    assert host0 != host1
    line = report["summary"]
    assert line.startswith(f"watchdog: rank 0 on {host0} waited ") and " in all_reduce at step 50; " in line, line
    assert f"rank 1 on {host1} never arrived; it was in debug.hang_rank: hanging at step 50" in line
    assert line in proc.stderr, output(proc)  # the launcher's one line
    log = attempts(run_dir)
    assert [(a["ended"], a.get("requeued")) for a in log] == [("hang", True), ("finished", None)], log
    assert log[0]["restart"] == 0 and log[1]["restart"] == 1  # Slurm counted the requeue as a restart
    assert log[1]["first_step"] == 40  # the newest checkpoint before the hang
    assert_same_run(run_dir, reference)
