"""Hangs that a plain requeue would not fix, on the real local Slurm cluster (2 of its 4 nodes): a node's link cut
during a checkpoint save is seen within the save budget derived from the measured saves (not a flat 600 s) and the
job requeues without that node; a hang that repeats on every attempt stops after the second, naming the host."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from slurm_helpers import SLURM, cut_link, output, run_launch
from test_hangs_and_lost_nodes import (RUN, STEP_S, node_of_rank, of_job, read_report, reference,  # noqa: F401
                                       submit_exclusive, wait_idle)
from test_preemption import assert_same_run, attempts

pytestmark = pytest.mark.slurm

SAVE_FLOOR_S = 15  # the tiny model saves in well under a second: its derived save budget is the floor
SAVE_BUDGET_MAX_S = 60  # a measured budget stays under this even if a save met load (the flat default is 600)


def saving(run_dir: Path, step: int, timeout: float = 150) -> None:
    """Rank 0 is inside the save of `step` (debug.save_sleep_s holds it there; rank 1 waits in the save's barrier)."""
    log, deadline = run_dir / "logs" / "rank0.log", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and f"inside the save of step {step}" in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} did not reach the save of step {step} in {timeout} s")


def ranks_left(node: str, job: str) -> list[int]:
    """The rank processes of `job` still running on `node` (in its network namespace)."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, check=True).stdout.split()
    return [int(p) for p in pids if of_job(int(p), job) and b"launch.rank.worker" in cmdline(int(p))]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def exited(node: str, job: str, timeout: float) -> float | None:
    """Seconds until no rank of `job` runs on `node` any more (None: one still does after `timeout`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not ranks_left(node, job):
            return time.monotonic() - start
        time.sleep(0.5)
    return None


@pytest.mark.timeout(480)
def test_cut_link_during_a_save_is_seen_within_the_measured_save_budget(slurm_cluster, tmp_path, data_overrides,
                                                                       reference):  # noqa: F811
    run_dir = tmp_path / "run"
    job = submit_exclusive(slurm_cluster, tmp_path, run_dir, [
        *RUN, *data_overrides, f"watchdog.step_s={STEP_S}", f"watchdog.save_floor_s={SAVE_FLOOR_S}",
        "debug.save_sleep_s=6", "debug.save_sleep_step=40"])
    node = None
    try:
        saving(run_dir, 40)
        node = node_of_rank(run_dir, 1)
        with cut_link(slurm_cluster, node) as cut:
            report = read_report(run_dir, job, SAVE_BUDGET_MAX_S + 60)
            gone = exited(node, job, timeout=60)  # while still cut off: Slurm cannot stop it, it must end itself
        state = slurm_cluster.wait_state(job, timeout=300)
    finally:
        slurm_cluster.run("scancel", job, check=False)
    assert state == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    print(f"cut link during a save reported {report['time'] - cut:.1f} s after the cut "
          f"({report['budget']}={report['budget_s']} s)")
    # the budget is the measured saves' (10x the longest, at least the floor): the floor, unless a save met load
    assert report["budget"] == "watchdog.save_s (auto)" and SAVE_FLOOR_S <= report["budget_s"] < SAVE_BUDGET_MAX_S, \
        report["summary"]
    assert report["time"] - cut < report["budget_s"] + 30, report["time"] - cut
    assert (report["cut"], report["exclude"]) == ([1], [node]), report["summary"]
    assert gone is not None, "the old attempt's rank on the cut-off node outlived its attempt"
    print(f"the cut-off rank of the old attempt exited {gone:.1f} s after the report, its link still down")
    log = attempts(run_dir)
    assert [(a["ended"], a.get("requeued")) for a in log] == [("hang", True), ("finished", None)], log
    assert log[0]["note"].endswith(f"without {node} (ExcNodeList)"), log[0]["note"]
    assert node not in {node_of_rank(run_dir, r) for r in (0, 1)}  # the resumed attempt ran elsewhere
    assert_same_run(run_dir, reference)
    wait_idle(slurm_cluster, node)


@pytest.mark.timeout(480)
def test_a_hang_on_every_attempt_stops_after_the_second_naming_the_host(slurm_cluster, tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    start = time.time()
    proc = run_launch(slurm_cluster.env, *SLURM, "nodes=2", *RUN, *data_overrides, "debug.hang_rank=1",
                      "debug.hang_step=30", "debug.hang_every_attempt=true", f"watchdog.step_s={STEP_S}",
                      f"hydra.run.dir={run_dir}", timeout=450)
    took = time.time() - start
    assert proc.returncode != 0, output(proc)
    log = attempts(run_dir)
    assert [(a["ended"], a.get("requeued")) for a in log] == [("hang", True), ("hang", False)], log
    assert [a["first_step"] for a in log] == [0, 20]
    host = node_of_rank(run_dir, 1)
    assert f"rank 1 on {host} was in debug.hang_rank: hanging at step 30" in log[1]["hang"], log[1]["hang"]
    assert log[1]["note"].startswith("not requeued: the attempt before hung too, and no checkpoint newer than "
                                     "step 20 was saved since"), log[1]["note"]
    assert log[1]["hang"] in proc.stderr, output(proc)  # the one line names the host
    print(f"a hang on every attempt stopped after 2 attempts, {took:.0f} s in all")
