"""One writer per run folder on the real local Slurm cluster: a job waiting in the queue or suspended keeps its
folder, two launches in one allocation never share one, and every rank of a node killed at once is recorded
once."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_helpers import REPO, SLURM, TINY, output, run_launch
from test_preemption import RUN, Job, attempts

pytestmark = pytest.mark.slurm

SLOW = [o for o in TINY if not o.startswith("train.max_steps")] + ["train.max_steps=150", "debug.delay_rank=0",
                                                                    "debug.delay_s=0.1", "preemption.in_job_restarts=0"]


def digest(run_dir: Path) -> dict[str, str]:
    """What a second submission must not touch: the files a queued job reads or the run keeps."""
    files = [f for f in sorted(run_dir.iterdir()) if f.is_file() and not f.name.startswith(".")]
    files += [f for f in [run_dir / ".hydra" / "overrides.yaml"] if f.is_file()]  # the report's point labels
    return {str(f.relative_to(run_dir)): hashlib.md5(f.read_bytes()).hexdigest() for f in files}


def lease_generations(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "lease").iterdir() if p.name.isdigit())


@pytest.mark.timeout(120)
def test_a_held_job_refuses_the_same_command_naming_it(slurm_cluster, tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    args = [*SLURM, *TINY, *data_overrides, "+cluster.sbatch.hold=true"]
    job = Job(slurm_cluster, tmp_path, args, run_dir)
    try:
        held = job.id()
        assert slurm_cluster.wait_state(held, {"PENDING"}, timeout=30) == "PENDING"
        before = digest(run_dir)
        again = run_launch(slurm_cluster.env, *args, f"hydra.run.dir={run_dir}")
        assert again.returncode == 2, output(again)
        assert f"belongs to job {held}, which is PENDING" in again.stderr and f"scancel {held}" in again.stderr
        assert "Traceback" not in again.stderr
        assert digest(run_dir) == before  # config.yaml, run.json, slurm_job.json untouched
        name = slurm_cluster.run("squeue", "-h", "-j", held, "-o", "%j").stdout.strip()
        # no second job of this run (the other worker's tests share the cluster)
        assert slurm_cluster.run("squeue", "-h", "-n", name, "-o", "%i").stdout.split() == [held]
    finally:
        slurm_cluster.run("scancel", job.id(), check=False)
        job.wait(timeout=60)


@pytest.mark.timeout(120)
def test_a_held_job_refuses_a_local_launch_into_its_folder(slurm_cluster, tmp_path, data_overrides):
    """cluster=local starts its ranks without a scheduler, but the folder's job is the scheduler's: a local launch
    would rewrite the config the held job trains with, and that job would later find the run done."""
    run_dir = tmp_path / "run"
    job = Job(slurm_cluster, tmp_path, [*SLURM, *TINY, *data_overrides, "+cluster.sbatch.hold=true"], run_dir)
    try:
        held = job.id()
        assert slurm_cluster.wait_state(held, {"PENDING"}, timeout=30) == "PENDING"
        before = digest(run_dir)
        local = run_launch(slurm_cluster.env, "cluster=local", *TINY, *data_overrides, f"hydra.run.dir={run_dir}")
        assert local.returncode == 2, output(local)
        [line] = [x for x in local.stderr.splitlines() if f"belongs to job {held}" in x]
        assert "which is PENDING" in line and f"scancel {held}" in line, output(local)
        assert "Traceback" not in local.stderr and digest(run_dir) == before
    finally:
        slurm_cluster.run("scancel", job.id(), check=False)
        job.wait(timeout=60)


@pytest.mark.timeout(120)
def test_a_waiting_multi_node_script_job_refuses_the_launcher_for_its_run(slurm_cluster, tmp_path, data_overrides):
    """`sbatch slurm/multi_node.sh` writes nothing until its job starts: the launcher finds the job by the arguments
    Slurm keeps for it, and refuses to submit its run a second time; another run is not refused."""
    run_dir = tmp_path / "run"
    args = [*TINY, *data_overrides, f"hydra.run.dir={run_dir}"]
    held = subprocess.run(["sbatch", "--parsable", "--hold", f"--output={tmp_path}/%j.out",
                           str(REPO / "slurm" / "multi_node.sh"), *args], env=slurm_cluster.env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    try:
        again = run_launch(slurm_cluster.env, *SLURM, *args)
        assert again.returncode == 2, output(again)
        assert (f"the run folder {run_dir} belongs to job {held} (sbatch {REPO}/slurm/multi_node.sh), which is PENDING"
                in again.stderr and f"scancel {held}" in again.stderr), output(again)
        assert "Traceback" not in again.stderr
        assert not run_dir.exists()  # a refused command leaves no folder (not even Hydra's log and the launch lock)
        other = run_launch(slurm_cluster.env, *SLURM, *TINY, *data_overrides, f"hydra.run.dir={tmp_path / 'other'}",
                           "hydra.launcher.detach=true")
        assert other.returncode == 0, output(other)
    finally:
        slurm_cluster.run("scancel", held, check=False)
        for record in (tmp_path / "other").glob("slurm_job.json"):
            slurm_cluster.run("scancel", json.loads(record.read_text())["job_id"], check=False)


@pytest.mark.timeout(180)
def test_a_suspended_holder_keeps_the_folder_and_finishes_alone(slurm_cluster, tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    args = [*SLURM, *SLOW, *data_overrides]
    job = Job(slurm_cluster, tmp_path, args, run_dir)
    job.training(0)
    slurm_cluster.run("scontrol", "suspend", job.id())
    try:
        time.sleep(3)  # longer than a beat: its lease no longer moves
        again = run_launch(slurm_cluster.env, *args, f"hydra.run.dir={run_dir}")
        assert again.returncode == 2, output(again)
        assert f"job {job.id()}, which is SUSPENDED" in again.stderr, output(again)
    finally:
        slurm_cluster.run("scontrol", "resume", job.id(), check=False)
    assert job.wait(timeout=150) == 0, job.text()
    assert lease_generations(run_dir) == ["1"]  # one writer from start to end
    assert [a["ended"] for a in attempts(run_dir)] == ["finished"]


ALLOC_LAUNCH = "{python} -m launch cluster=srun hydra.run.dir={run} {args} > {out} 2>&1"


@pytest.mark.timeout(180)
def test_two_launches_in_one_allocation_never_share_the_folder(slurm_cluster, tmp_path, data_overrides):
    """The default run name is the same for both, and so is SLURM_JOB_ID: the second is refused while the first
    beats its lease, and the first finishes alone."""
    run_dir, first_out, second_out = tmp_path / "run", tmp_path / "first.out", tmp_path / "second.out"
    # the first runs 30 s: the second launch, started at its first record, checks the lease well before it ends
    args = " ".join([o for o in SLOW if not o.startswith(("train.progress", "train.max_steps"))] +
                    ["train.max_steps=300", *data_overrides])
    launch = ALLOC_LAUNCH.format(python=sys.executable, run=run_dir, args=args, out="{out}")
    script = (f"cd {REPO}\n{launch.format(out=first_out)} &\n"
              f"while [ ! -e {run_dir}/metrics/rank0.jsonl ]; do sleep 0.2; done\n"
              f"{launch.format(out=second_out)}; echo second=$?\nwait $!; echo first=$?\n")
    alloc = subprocess.run(["salloc", "--nodes=1", "--time=5", "bash", "-c", script], cwd=REPO, env=slurm_cluster.env,
                           capture_output=True, text=True, timeout=170)
    said = alloc.stdout + second_out.read_text()
    assert "second=2" in alloc.stdout and "first=0" in alloc.stdout, said + first_out.read_text()[-3000:]
    assert "is in use by another run (job " in said and "its lease is beating" in said, said
    assert lease_generations(run_dir) == ["1"]
    assert [a["ended"] for a in attempts(run_dir)] == ["finished"]


LOCAL = [o for o in TINY if not o.startswith("train.max_steps")] + [
    "cluster=local", "cluster.tasks_per_node=2", "train.decay_steps=16", "checkpoint.interval_steps=5"]


@pytest.mark.timeout(300)
def test_launches_in_one_allocation_keep_their_own_attempts_and_rounds(slurm_cluster, tmp_path, data_overrides):
    """Inside one salloc, SLURM_JOB_ID and restart 0 are every launch's: a killed rank under cluster=local restarts
    the ranks in a round its launcher finds, and a second launch of the run writes its own line instead of taking
    the first's for its own."""
    run_dir, first_out, second_out = tmp_path / "run", tmp_path / "first.out", tmp_path / "second.out"
    launch = f"{sys.executable} -m launch hydra.run.dir={run_dir} " + " ".join([*LOCAL, *data_overrides])
    script = (f"cd {REPO}\n{launch} train.max_steps=16 debug.kill_rank=1 debug.kill_step=8 > {first_out} 2>&1; "
              f"echo first=$?\n{launch} train.max_steps=20 > {second_out} 2>&1; echo second=$?\n")
    alloc = subprocess.run(["salloc", "--nodes=1", "--time=5", "bash", "-c", script], cwd=REPO, env=slurm_cluster.env,
                           capture_output=True, text=True, timeout=280)
    said = alloc.stdout + alloc.stderr + first_out.read_text()[-3000:] + second_out.read_text()[-3000:]
    assert "first=0" in alloc.stdout and "second=0" in alloc.stdout, said
    assert "restarting inside the allocation (round 1)" in first_out.read_text(), said
    lines = attempts(run_dir)
    assert [(a.get("round", 0), a.get("in_job_restart"), a["ended"]) for a in lines] == [
        (0, 1, lines[0]["ended"]), (1, None, "finished"), (0, None, "finished")], lines
    assert len({a["job_id"] for a in lines}) == 1 and lines[0]["launch"] == lines[1]["launch"] != lines[2]["launch"]
    assert lines[2]["first_step"] == 16 and lines[2]["last_step"] == 20, lines[2]


@pytest.mark.timeout(300)
def test_every_rank_of_a_node_killed_at_once_is_one_attempts_line(slurm_cluster, tmp_path, data_overrides):
    job = Job(slurm_cluster, tmp_path, ["nodes=2", "cluster.tasks_per_node=2", *SLURM, *RUN, *data_overrides],
              tmp_path / "run")
    job.training(0)
    hosts = {r: json.loads((job.run_dir / "environment" / f"rank{r}.json").read_text())["host"] for r in range(4)}
    node = [r for r in hosts if hosts[r] == hosts[3]]
    assert len(node) == 2  # every rank of the node that does not hold rank 0
    for r in node:
        job.kill_rank(r)
    assert job.wait() == 0, job.text()
    first = [a for a in attempts(job.run_dir) if a["restart"] == 0]
    assert len(first) == 1 and first[0]["lost_rank"] in node and first[0]["requeued"] is True, attempts(job.run_dir)
    assert attempts(job.run_dir)[-1]["ended"] == "finished"
