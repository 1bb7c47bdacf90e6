"""On demand (marker `large`, not in CI): a 256-point sweep on a large simulated cluster (light nodes, instance
GPTLAUNCH_LARGE_INSTANCE, default 7) is one job array, polled with one squeue per poll, and ends in a report of
every point. Run it as root with `-m large` (setup.cfg deselects the marker otherwise); it starts the cluster."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLUSTER_SH, _describe
from control_counters import SlurmCalls
from slurm_helpers import SLURM, TINY, output, run_launch

pytestmark = [pytest.mark.slurm, pytest.mark.large]

POINTS = 256
NODES = 24  # one CPU each: 24 tiny ranks at a time is what 2 cores and 24 GiB take beside other work


@pytest.fixture(scope="module")
def large_cluster() -> dict[str, str]:
    env = {**os.environ, "GPTLAUNCH_CLUSTER_INSTANCE": os.environ.get("GPTLAUNCH_LARGE_INSTANCE", "7"),
           "GL_CPUS_PER_NODE": "1"}
    if subprocess.run(["bash", str(CLUSTER_SH), "status"], env=env, capture_output=True).returncode != 0:
        up = subprocess.run(["bash", str(CLUSTER_SH), "up", str(NODES)], env=env, capture_output=True, text=True)
        assert up.returncode == 0, up.stdout + up.stderr
    env["SLURM_CONF"] = _describe(env)["SLURM_CONF"]
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return {k: v for k, v in env.items() if not k.startswith(("SLURM_JOB", "SLURM_ARRAY", "SBATCH_"))}


@pytest.mark.timeout(3600)
def test_a_256_point_sweep_is_one_array_polled_once_per_poll_with_a_report_of_every_point(
        large_cluster, tmp_path, data_overrides):
    calls = SlurmCalls(tmp_path / "shims")
    sweep = tmp_path / "sweep"
    start = time.time()
    proc = run_launch(calls.env(large_cluster), "-m", "nodes=1", f"seed=range(0,{POINTS})", *SLURM,
                      f"budget.max_node_hours={POINTS}", *TINY, "train.max_steps=2", *data_overrides,
                      f"hydra.sweep.dir={sweep}", timeout=3500)
    assert proc.returncode == 0, output(proc)
    jobs = re.findall(r"submitted job (\d+)_(\d+) for (seed=\d+):", proc.stdout)
    assert len(jobs) == POINTS and len({array for array, _, _ in jobs}) == 1, output(proc)
    assert len(re.findall(r"job \d+_\d+ \(seed=\d+\) COMPLETED", proc.stdout)) == POINTS
    login = os.uname().nodename
    mine = [c for c in calls.calls() if c.host == login]
    sbatch = [c.time for c in mine if c.command == "sbatch"]
    assert len(sbatch) == 1
    polls = [c for c in mine if c.command == "squeue" and c.time > sbatch[0]]
    seconds = {int(c.time / 0.5) for c in polls}  # hydra.launcher.poll_s=0.5: one squeue per poll
    print(f"\n{POINTS} points: submitted {sbatch[0] - start:.1f} s after the start, done in {time.time() - start:.0f} "
          f"s; {len(polls)} squeue calls over {len(seconds)} poll slots; launcher calls "
          f"{ {k: sum(c.command == k for c in mine) for k in {c.command for c in mine}} }")
    assert len(polls) <= 1.1 * len(seconds) + 2
    with open(sweep / "report" / "comparison.csv") as f:
        assert len(list(csv.DictReader(f))) == POINTS
    assert (sweep / "report" / "scaling.md").stat().st_size < 20_000
