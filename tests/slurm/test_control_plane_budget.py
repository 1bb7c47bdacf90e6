"""The control plane's budgets over a 2-node job's steady state on the real local Slurm cluster: at most one Slurm
client call per job per minute from inside the job and one call per poll from the launcher's waiter; at most one
file-system metadata operation per node per second in the run folder. One run serves both tests."""
from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from control_counters import FsOps, SlurmCalls
from slurm_helpers import SLURM, TINY, launch_cmd, output
from helpers import REPO, whole_lines

pytestmark = pytest.mark.slurm

NODES = 2
WINDOW_S = 12.0  # the steady state counted: from a few steps in, well before the end
RUN = [o for o in TINY if not o.startswith("train.max_steps")] + [
    "train.max_steps=80", "debug.delay_rank=0", "debug.delay_s=0.25", "cluster.tasks_per_node=2"]


@dataclass
class Counted:
    calls: SlurmCalls
    fs: FsOps
    since: float
    until: float
    proc: subprocess.CompletedProcess
    nodes: set[str]  # the cluster's node names: a call from one of them is the job's


@pytest.fixture(scope="module")
def counted(slurm_cluster, tmp_path_factory, data_overrides) -> Counted:
    tmp = tmp_path_factory.mktemp("budget")
    run_dir = tmp / "run"
    run_dir.mkdir()
    calls = SlurmCalls(tmp / "shims", path=slurm_cluster.env["PATH"])
    cmd = launch_cmd(*SLURM, f"nodes={NODES}", *RUN, *data_overrides, f"hydra.run.dir={run_dir}")
    with FsOps(run_dir) as fs:
        proc = subprocess.Popen(cmd, cwd=REPO, env=calls.env(slurm_cluster.env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        since = steady(run_dir, proc)
        time.sleep(WINDOW_S)
        until = time.time()
        out, err = proc.communicate(timeout=240)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert done.returncode == 0, output(done)
    assert trained_after(run_dir, until), "the window was not steady state: the run had ended"
    return Counted(calls, fs, since, until, done, slurm_cluster.node_names())


def steady(run_dir: Path, proc: subprocess.Popen, timeout: float = 180) -> float:
    """When the run is a few steps in: its start-up's files are written by then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(records(run_dir)) >= 5:
            return time.time() + 1.0
        time.sleep(0.5)
    raise AssertionError(f"no steady state within {timeout} s (exit {proc.poll()})")


def records(run_dir: Path) -> list[dict]:
    try:
        lines = whole_lines(run_dir / "metrics" / "rank0.jsonl")
    except FileNotFoundError:
        return []
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def trained_after(run_dir: Path, when: float) -> bool:
    return any(r.get("time", 0) > when for r in records(run_dir))


@pytest.mark.timeout(300)
def test_slurm_client_calls_in_steady_state_keep_the_budget(counted):
    calls = counted.calls.calls(counted.since, counted.until)
    in_job = [c for c in calls if c.host in counted.nodes]
    launcher = [c for c in calls if c.host not in counted.nodes]
    print(f"Slurm client calls over {WINDOW_S:.0f} s of steady state: {len(in_job)} from inside the job, "
          f"{len(launcher)} from the launcher ({sorted({c.command for c in launcher})})")
    assert len(in_job) <= max(1, WINDOW_S / 60), in_job  # one per job per minute at most
    polls = WINDOW_S / 0.5 + 1  # hydra.launcher.poll_s=0.5: one call per poll at most, for all the jobs
    assert all(c.command == "squeue" for c in launcher) and len(launcher) <= polls, launcher


@pytest.mark.timeout(300)
def test_file_system_metadata_operations_in_steady_state_keep_the_budget(counted):
    """The job's operations in its run folder, per node and second, TensorBoard's event files included (each rank
    keeps its file open: none in steady state). Left out, and bounded on their own: the launcher's listing of the
    run folder (one per poll, looking for a hang report)."""
    ops = counted.fs.by_path(counted.since, counted.until)
    seconds = counted.until - counted.since
    tensorboard = sum(n for k, n in ops.items() if k.split(" ", 1)[1].startswith("tensorboard/"))
    listings = ops["open ."]
    job = sum(ops.values()) - listings
    print(f"run folder over {seconds:.0f} s of steady state ({NODES} nodes x 2 ranks): the job {job / seconds:.2f} "
          f"metadata operations per second (TensorBoard {tensorboard / seconds:.2f}), the launcher "
          f"{listings / seconds:.2f}: {dict(ops.most_common(8))}")
    assert not counted.fs.overflowed
    assert job / seconds <= NODES, ops  # one per node per second at most (the lease's beat is 1 per second per job)
    assert tensorboard == 0, ops  # a record is a write to the open event file
    assert listings <= seconds / 0.5 + 1, ops  # hydra.launcher.poll_s=0.5: one listing per poll at most


@pytest.mark.timeout(120)
def test_one_poll_of_a_sweep_asks_squeue_once_and_sacct_once_whatever_the_number_of_jobs(slurm_cluster, tmp_path,
                                                                                         monkeypatch):
    from launch.backends.slurm import commands

    calls = SlurmCalls(tmp_path / "shims", path=slurm_cluster.env["PATH"])
    held = [slurm_cluster.sbatch("#!/bin/bash\nsleep 60\n", "--hold", cwd=tmp_path) for _ in range(4)]
    forgotten = ["999990", "999991", "999992"]  # jobs squeue no longer lists (past MinJobAge)
    try:
        monkeypatch.setenv("PATH", calls.env(slurm_cluster.env)["PATH"])
        monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
        infos = commands.job_infos(held + forgotten)
    finally:
        slurm_cluster.run("scancel", *held, check=False)
    assert [infos[j].state for j in held] == ["PENDING"] * 4 and {infos[j].state for j in forgotten} == {"GONE"}
    mine = Counter(c.command for c in calls.calls() if c.pid == os.getpid())
    # scontrol once per job that neither squeue nor sacct knows (never one of this user's: once in its life)
    assert mine == {"squeue": 1, "sacct": 1, "scontrol": len(forgotten)}, calls.calls()
