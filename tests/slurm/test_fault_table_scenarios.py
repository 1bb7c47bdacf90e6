"""Cells of docs/fault-tolerance.md's table of every interruption against every entry point that no other Slurm
scenario shows, on the real local cluster (slurm/local_cluster.sh)."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from slurm_helpers import REPO, SLURM, launch_cmd, output
from test_preemption import RUN, Job
from test_slurm_preemption import urgent_job

pytestmark = pytest.mark.slurm
STEPS = 20
SWEEP = [o for o in RUN if not o.startswith("train.max_steps")] + [f"train.max_steps={STEPS}", "nodes=1"]


def attempts(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]


def training(run_dir: Path, deadline: float) -> bool:
    metrics = run_dir / "metrics" / "rank0.jsonl"
    return metrics.exists() and metrics.read_text().count('"train"') >= 3 or time.monotonic() > deadline


@pytest.mark.timeout(300)
def test_a_sweep_preempted_by_slurm_requeues_its_requeue_point_and_the_same_command_finishes_its_cancel_point(
        slurm_cluster, tmp_path, data_overrides):
    """One urgent job takes every node from a sweep's two points: the one in `low` (PreemptMode=REQUEUE) saves, is
    requeued and finishes; the one in `lowcancel` (PreemptMode=CANCEL) saves and ends, not requeued, and the sweep
    says once how to continue it, failing nothing (exit 1, as a single run stopped so). The same command then submits
    only that point and finishes it."""
    sweep = tmp_path / "sweep"
    command = launch_cmd("-m", "cluster.partition=low,lowcancel", *SLURM, *SWEEP, *data_overrides,
                         f"hydra.sweep.dir={sweep}")
    low, cancel = sweep / "cluster.partition=low", sweep / "cluster.partition=lowcancel"
    first = subprocess.Popen(command, cwd=REPO, env=slurm_cluster.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (training(low, deadline) and training(cancel, deadline)):
            time.sleep(0.2)
        urgent_job(slurm_cluster, tmp_path)
        out, err = first.communicate(timeout=180)
    finally:
        first.kill()
    said = out + err
    requeued, finished = attempts(low)
    assert requeued["ended"].startswith("preempted by job ") and requeued["requeued"], requeued
    assert finished["ended"] == "finished", finished
    (ended,) = attempts(cancel)
    assert "PreemptMode=CANCEL" in ended["ended"] and not ended["requeued"], ended
    assert "not requeued: Slurm's preemption cancels job" in said and "the same command continues" in said, said
    # it stopped, it did not fail: said once, as preempted and not requeued (the site's PreemptMode=CANCEL)
    assert "ended FAILED" not in said and "job(s) failed" not in said and said.count("the same command continues") == 1, said
    code = first.returncode
    again = subprocess.run(command, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, output(again)
    assert again.stdout.count("submitted job") == 1 and "cluster.partition=low finished at step" in (
        again.stdout + again.stderr), output(again)
    assert attempts(cancel)[-1]["ended"] == "finished"
    assert code == 1, said[-3000:]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("partition, mode", [("low", "REQUEUE"), ("lowcancel", "CANCEL")])
def test_a_chain_link_preempted_by_slurm_hands_the_run_to_the_next_link_and_is_not_requeued(
        slurm_cluster, tmp_path, data_overrides, partition, mode):
    """A link of `cluster.chain=2` whose nodes an urgent job takes, under either preemption mode: it saves inside its
    grace time and ends, handing the run to the next link, so Slurm does not requeue it (a requeued link would run
    again beside the next one); the next link continues the run and finishes it, and the launcher exits 0."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen(launch_cmd(*SLURM, *SWEEP, *data_overrides, "cluster.chain=2", f"cluster.partition={partition}",
                                        f"hydra.run.dir={run_dir}"),
                             cwd=REPO, env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not training(run_dir, deadline):
            time.sleep(0.2)
        urgent_job(slurm_cluster, tmp_path)
        out, err = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 0, out[-3000:] + err[-3000:]
    links = json.loads((run_dir / "slurm_job.json").read_text())["chain"]
    handed, finished = attempts(run_dir)
    assert handed["ended"].startswith("preempted by job ") and f"PreemptMode={mode}" in handed["ended"], handed
    assert (handed["job_id"], handed["requeued"], handed["next_link"]) == (links[0], False, links[1]), handed
    assert (finished["job_id"], finished["ended"], finished["first_step"]) == (links[1], "finished",
                                                                               handed["last_step"]), finished
    assert slurm_cluster.job_info(links[0]).get("Restarts", "0") == "0"


@pytest.mark.timeout(180)
def test_a_multi_node_sh_job_preempted_under_cancel_saves_and_ends_not_requeued_saying_so_once(
        slurm_cluster, tmp_path, data_overrides):
    """`sbatch --partition=lowcancel slurm/multi_node.sh ...` (nothing waits for it) whose nodes an urgent job takes:
    the ranks save inside the grace time, Slurm's policy ends the job (no restart), and the launcher inside it says
    once how the attempt ended, that it is not requeued and how the same command continues, calling nothing failed."""
    job = Job(slurm_cluster, tmp_path, [*RUN, *data_overrides], tmp_path / "run", sbatch=True,
              sbatch_flags=("--nodes=2", "--partition=lowcancel"))
    job.training(0)
    urgent_job(slurm_cluster, tmp_path)
    job.wait(120)
    (first,) = attempts(job.run_dir)
    assert "the run's partition lowcancel: PreemptMode=CANCEL" in first["ended"] and first["requeued"] is False, first
    assert first["note"].startswith(f"not requeued: Slurm's preemption cancels job {job.id()}; the same command "
                                    "continues the run from its newest checkpoint (step "), first
    said = f"job {job.id()} {first['ended']}: {first['note']}"
    text = job.log.read_text()
    assert text.count(said) == 1 and "error: the ranks stopped" not in text, text[-5000:]
    assert slurm_cluster.job_info(job.id()).get("Restarts", "0") == "0"
