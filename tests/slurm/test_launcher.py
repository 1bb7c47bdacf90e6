"""`python -m launch -m nodes=1,2,4 cluster=slurm`: one real Slurm job per sweep point, each with its own node
count; bad sweeps are refused before anything is submitted."""
from __future__ import annotations

import csv
import json
import re

import pytest

from slurm_helpers import GOLDEN, SLURM, TINY, environments, losses, normalise, output, run_launch, train_records


def attempts(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]

pytestmark = pytest.mark.slurm


@pytest.mark.timeout(300)
def test_sweep_over_node_counts_gives_one_job_per_point(slurm_cluster, tmp_path, data_overrides):
    sweep = tmp_path / "sweep"
    proc = run_launch(slurm_cluster.env, "-m", "nodes=1,2,4", *SLURM, *TINY, *data_overrides,
                      f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, output(proc)
    assert "budget.max_node_hours=100" in proc.stdout and "1.17" in proc.stdout  # 7 nodes x 10 min
    jobs = dict((n, jid) for jid, n in re.findall(r"submitted job (\d+) for nodes=(\d): .*; log: \S+", proc.stdout))
    assert sorted(jobs) == ["1", "2", "4"] and len(set(jobs.values())) == 3, output(proc)

    for n, jid in jobs.items():
        run_dir, nodes = sweep / f"nodes={n}", int(n)
        assert f"job {jid} (nodes={n}) COMPLETED" in proc.stdout
        envs = environments(run_dir)
        assert sorted(e["rank"] for e in envs) == list(range(nodes))
        for e in envs:  # each rank's own record of its Slurm job
            assert e["world_size"] == nodes and e["num_nodes"] == nodes
            assert e["scheduler"]["SLURM_JOB_ID"] == jid and e["scheduler"]["SLURM_JOB_NUM_NODES"] == n
            assert e["scheduler"]["SLURM_NTASKS"] == n
        assert len({e["host"] for e in envs}) == nodes
        assert {e["host"] for e in envs} <= slurm_cluster.node_names()
        assert len({e["master"] for e in envs}) == 1 and not envs[0]["master"].startswith(("localhost", "127."))
        info = slurm_cluster.job_info(jid)
        assert info["NumNodes"] == n and info["JobState"] == "COMPLETED"
        assert json.loads((run_dir / "slurm_job.json").read_text())["job_id"] == jid
        rendezvous = json.loads((run_dir / "environment" / "rendezvous.json").read_text()) if nodes > 1 else None
        assert rendezvous is None or len(set(rendezvous["hosts"])) == nodes

    # the global batch is fixed, so every node count trains the same model
    assert losses(sweep / "nodes=2") == pytest.approx(losses(sweep / "nodes=1"), rel=1e-4)
    assert losses(sweep / "nodes=4") == pytest.approx(losses(sweep / "nodes=1"), rel=1e-4)
    # the sweep ends in its scaling report: one row per job, numbers from the run folders
    with open(sweep / "report" / "scaling.csv") as f:
        rows = {r["point"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["nodes=1", "nodes=2", "nodes=4"]
    for n, row in rows.items():
        records = [r for e in environments(sweep / n) for r in train_records(sweep / n, e["rank"])]
        assert row["nodes"] == row["ranks"] == n.split("=")[1]
        assert min(r["tokens_per_s"] for r in records) <= float(row["tokens_per_s"]) <= max(
            r["tokens_per_s"] for r in records)
    assert float(rows["nodes=1"]["efficiency"]) == 1.0
    # what was really submitted is what the golden files say
    for n, golden in (("1", "one_node"), ("4", "four_nodes")):
        submitted = (sweep / "slurm" / f"{jobs[n]}_submission.sh").read_text()
        assert normalise(submitted, sweep / "slurm") == (GOLDEN / f"{golden}.sh").read_text()


@pytest.mark.timeout(180)
def test_bad_points_stop_the_sweep_before_anything_is_submitted(slurm_cluster, tmp_path, data_overrides):
    sweep = tmp_path / "sweep"
    proc = run_launch(slurm_cluster.env, "-m", "nodes=1,8", "cluster.partition=debug,nope", *SLURM, *TINY,
                      *data_overrides, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2, output(proc)
    assert "nodes=8 is more than partition 'debug' has (4 node(s))" in proc.stderr
    assert "cluster.partition='nope' is not a partition of this cluster; its partitions: debug" in proc.stderr
    assert "nothing was submitted or run (3 of 4 sweep point(s) are not valid)" in proc.stderr
    assert "Traceback" not in proc.stderr and "submitted job" not in proc.stdout
    assert not (sweep / "slurm").exists()


@pytest.mark.timeout(180)
def test_budget_guard_refuses_a_costly_run(slurm_cluster, tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    proc = run_launch(slurm_cluster.env, "nodes=4", "cluster=slurm", "cluster.time_min=480", "preemption.max_restarts=1",
                      "budget.max_node_hours=40", *TINY, *data_overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, output(proc)  # 32 node-hours expected, 64 if the one restart runs as long
    assert "error: this sweep may use 64.00 node-hours in the worst case (32.00 expected" in proc.stderr
    assert "above budget.max_node_hours=40" in proc.stderr and "budget.max_node_hours=64" in proc.stderr
    assert "32.00       64.00" in proc.stdout  # the table: expected and worst
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "slurm_job.json").exists() and not (run_dir / "slurm").exists()


@pytest.mark.timeout(180)
def test_points_with_equal_resources_share_one_job_array(slurm_cluster, tmp_path, data_overrides):
    """Three points, one array; the point whose rank 0 is preempted (SIGUSR2 at step 3) requeues its own task
    alone, which resumes from its checkpoint while the other tasks finish."""
    sweep = tmp_path / "sweep"
    proc = run_launch(slurm_cluster.env, "-m", "nodes=1", "debug.signal_rank=0,1,2", "debug.signal_at_step=3", *SLURM,
                      *TINY, "checkpoint.interval_steps=2", "preemption.max_restarts=2", *data_overrides,
                      f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=r${debug.signal_rank}")
    assert proc.returncode == 0, output(proc)
    jobs = re.findall(r"submitted job (\d+)_(\d) for (r\d):", proc.stdout)
    assert len(jobs) == 3 and len({array for array, _, _ in jobs}) == 1, output(proc)  # one array, three tasks
    for array, task, label in jobs:
        assert f"job {array}_{task} ({label}) COMPLETED" in proc.stdout
        envs = environments(sweep / label)
        assert {(e["scheduler"]["SLURM_ARRAY_JOB_ID"], e["scheduler"]["SLURM_ARRAY_TASK_ID"]) for e in envs} == {
            (array, task)}
        ends = [a["ended"] for a in attempts(sweep / label)]
        assert ends == (["preempted:SIGUSR2", "finished"] if label == "r0" else ["finished"]), (label, ends)
        assert {a["job_id"] for a in attempts(sweep / label)} == {f"{array}_{task}"}
    assert "requeued job" in proc.stderr and f"job {jobs[0][0]}_{jobs[0][1]} (r0): attempt 0 ended" in proc.stderr
    assert "#SBATCH --array=0-2%3" in (sweep / "slurm" / f"{jobs[0][0]}_submission.sh").read_text()
