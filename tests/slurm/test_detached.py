"""Runs that need no launcher on the login node: hydra.launcher.detach=true, then launch.status, launch.logs,
launch.cancel and launch.list; the sweep's report from an afterany job; code snapshots; a killed waiting launcher."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, wait_until
from slurm_helpers import SLURM, TINY, launch_cmd, output, run_launch, train_records

pytestmark = pytest.mark.slurm
SLOW = [o for o in TINY if not o.startswith("train.max_steps")] + [
    "train.max_steps=150", "debug.delay_rank=0", "debug.delay_s=0.1"]  # about a minute: time to act on it


def verb(env, name: str, *args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"launch.{name}", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def steps_done(run_dir: Path) -> int:
    try:
        return len(train_records(run_dir))
    except (OSError, ValueError):
        return 0


@pytest.mark.timeout(180)
def test_detached_sweep_needs_no_launcher_for_its_status_and_report(slurm_cluster, tmp_path, data_overrides):
    from gpt.data.prepare import prepare

    sweep = tmp_path / "sweep"
    data = dict(o.split("=", 1) for o in data_overrides)
    prepare(data["data.text_path"], data["data.dir"])  # what is timed below is the submission, not a first preparation
    started = time.monotonic()
    proc = run_launch(slurm_cluster.env, "-m", "nodes=1,2", *SLURM, *TINY, *data_overrides, "hydra.launcher.detach=true",
                      f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, output(proc)
    # the launcher is gone once it submitted (the status below finds the jobs not yet done): its own start-up is a few
    # CPU-seconds, which a machine loaded by other tests may stretch, and a launcher that waited would take minutes
    assert time.monotonic() - started < 60, output(proc)
    jobs = re.findall(r"submitted job (\d+) for", proc.stdout)
    report_job = re.search(r"report job (\d+) builds", proc.stdout).group(1)
    assert len(jobs) == 2 and f"python -m launch.status {sweep}" in proc.stdout, output(proc)
    assert slurm_cluster.job_info(report_job)["Dependency"].startswith(f"afterany:{jobs[0]}")

    first = verb(slurm_cluster.env, "status", str(sweep))
    assert first.returncode == 3, output(first)  # still running (or waiting)
    assert re.search(rf"nodes=1: job {jobs[0]} (RUNNING|PENDING)", first.stdout), output(first)
    assert f"report: job {report_job} PENDING (Dependency)" in first.stdout, output(first)

    slurm_cluster.wait_state(report_job)
    final = verb(slurm_cluster.env, "status", str(sweep))
    assert final.returncode == 0, output(final)
    assert re.search(rf"nodes=2: job {jobs[1]} COMPLETED, step 6/6, [\d,]+ tokens/s, 1 attempt\(s\), 0 restart\(s\), "
                     r"goodput \d+%, finished", final.stdout), output(final)
    assert f"report: job {report_job} COMPLETED" in final.stdout
    rows = csv.DictReader((sweep / "report" / "scaling.csv").open())
    assert sorted(r["point"] for r in rows if r["point"].startswith("nodes=")) == ["nodes=1", "nodes=2"]  # on the cluster
    listing = verb(slurm_cluster.env, "list", str(tmp_path))
    assert "sweep/nodes=1: finished, step 6/6" in listing.stdout, output(listing)


@pytest.mark.timeout(240)
def test_logs_follow_a_requeue_and_cancel_saves_then_the_same_command_continues(slurm_cluster, tmp_path,
                                                                                   data_overrides):
    run_dir = tmp_path / "run"
    args = [*SLURM, *SLOW, *data_overrides, f"hydra.run.dir={run_dir}"]
    proc = run_launch(slurm_cluster.env, *args, "hydra.launcher.detach=true")
    assert proc.returncode == 0, output(proc)
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    follow = subprocess.Popen([sys.executable, "-m", "launch.logs", str(run_dir), "-f"], cwd=REPO,
                              env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: steps_done(run_dir) >= 15, what="15 steps")
        slurm_cluster.run("scancel", "--signal=USR2", job)  # preempted: it saves and requeues itself
        wait_until(lambda: len(json.loads("[" + ",".join((run_dir / "attempts.jsonl").read_text().splitlines())
                                          + "]")) >= 1 if (run_dir / "attempts.jsonl").exists() else False,
                   what="the first attempt's record")
        before = steps_done(run_dir)
        wait_until(lambda: steps_done(run_dir) >= before + 15, what="15 steps of the second attempt")
        status = verb(slurm_cluster.env, "status", str(run_dir))
        assert status.returncode == 3 and "2 attempt(s)" not in status.stdout and "1 restart(s)" in status.stdout, \
            output(status)

        cancel = verb(slurm_cluster.env, "cancel", str(run_dir))
        assert cancel.returncode == 0 and "sent the preemption signal" in cancel.stdout, output(cancel)
        assert slurm_cluster.wait_state(job) in ("CANCELLED", "COMPLETED")  # saved and stopped, not requeued
        logged, _ = follow.communicate(timeout=60)  # it stops by itself once the job has ended
    finally:
        follow.kill()
    attempts = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["ended"] for a in attempts][:2] == ["preempted:SIGUSR2", "cancelled by the user"], attempts
    assert not attempts[1].get("requeued"), attempts
    saved = attempts[1]["last_step"]
    assert saved > before  # the cancel saved where the second attempt was
    first = attempts[0]["last_step"]  # followed across the requeue: both attempts' lines
    assert f"stopped at step {first} after SIGUSR2" in logged and f"at step {first} (" in logged, logged[-2000:]
    assert f"cancelled by the user at step {saved}, checkpoint saved" in logged, logged[-2000:]
    cancelled = verb(slurm_cluster.env, "status", str(run_dir))  # one restart: the preemption's, not the cancel's
    assert cancelled.returncode == 0 and "1 restart(s)" in cancelled.stdout, output(cancelled)
    assert cancelled.stdout.rstrip().endswith("cancelled by the user"), output(cancelled)

    again = run_launch(slurm_cluster.env, *args, timeout=200)
    assert again.returncode == 0, output(again)
    assert f"continuing {run_dir} from step {saved}" in again.stdout + again.stderr, output(again)
    assert verb(slurm_cluster.env, "status", str(run_dir)).returncode == 0


@pytest.mark.timeout(180)
def test_a_held_job_runs_the_code_submitted_not_the_edited_checkout(slurm_cluster, tmp_path, data_overrides):
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{REPO}", str(checkout)], check=True)
    worker = checkout / "launch" / "rank" / "worker.py"
    worker.write_text(worker.read_text() + "\n# an uncommitted comment: the checkout is dirty\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(launch_cmd(*SLURM, *TINY, *data_overrides, "hydra.launcher.detach=true", "+cluster.sbatch.hold=true",
                                     f"hydra.run.dir={run_dir}"), cwd=checkout, env=slurm_cluster.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, output(proc)
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    assert "JobHeldUser" in verb(slurm_cluster.env, "status", str(run_dir), cwd=checkout).stdout
    # a deliberate change in the training code while the job waits: a rank that imported it would fail
    trainer = checkout / "gpt" / "train" / "trainer.py"
    trainer.write_text(trainer.read_text().replace("from __future__ import annotations\n", "from __future__ import "
                                                   "annotations\nraise RuntimeError('the edited checkout ran')\n", 1))
    slurm_cluster.run("scontrol", "release", job)
    assert slurm_cluster.wait_state(job) == "COMPLETED", (run_dir / "logs" / "rank0.log").read_text()[-2000:]
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    code = json.loads((run_dir / "code.json").read_text())
    assert code["commit"] == head.strip() and code["dirty"] is True
    assert "an uncommitted comment" in (Path(code["path"]) / "launch" / "rank" / "worker.py").read_text()
    assert "uncommitted comment" in (Path(code["path"]) / "uncommitted.diff").read_text()


@pytest.mark.timeout(240)
def test_a_submit_folder_with_a_space_and_a_run_name_with_a_command_run_the_snapshot_and_nothing_else(
        slurm_cluster, tmp_path, data_overrides):
    """The batch script quotes the snapshot's path: the job imports the snapshot (a space once split the path, and the
    job imported the live checkout while code.json named the snapshot), and `$(...)` in a run name runs nowhere."""
    checkout = tmp_path / "a checkout"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{REPO}", str(checkout)], check=True)
    imported = tmp_path / "imported"  # every rank's worker says where it was imported from
    worker = checkout / "launch" / "rank" / "worker.py"
    said = f"from __future__ import annotations\nopen({str(imported)!r}, 'a').write(__file__ + '\\n')\n"
    worker.write_text(worker.read_text().replace("from __future__ import annotations\n", said, 1))
    name = "x$(>pwned)"  # a command a shell runs: it creates the file pwned
    proc = subprocess.run(launch_cmd(*SLURM, *TINY, *data_overrides, "nodes=2", f"run='{name}'"), cwd=checkout,
                          env=slurm_cluster.env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, output(proc)
    run_dir = checkout / "runs" / name
    assert len(train_records(run_dir)) == 6
    code = Path(json.loads((run_dir / "code.json").read_text())["path"])
    assert code.parent == run_dir / "slurm" / "code"
    assert set(imported.read_text().splitlines()) == {str(code / "launch" / "rank" / "worker.py")}  # every import
    script = next((run_dir / "slurm").glob("*_submission.sh")).read_text()
    assert f"export PYTHONPATH='{code}'" in script, script
    assert not list(tmp_path.rglob("pwned")) and not (REPO / "pwned").exists()


@pytest.mark.timeout(180)
def test_a_killed_waiting_launcher_loses_nothing(slurm_cluster, tmp_path, data_overrides):
    sweep = tmp_path / "sweep"
    args = ["-m", "nodes=1", *SLURM, *TINY[:-1], "train.max_steps=40", "debug.delay_rank=0", "debug.delay_s=0.1",
            *data_overrides, f"hydra.sweep.dir={sweep}"]
    waiter = subprocess.Popen(launch_cmd(*args), cwd=REPO, env=slurm_cluster.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first = ""
    while "submitted job" not in first:
        first += waiter.stdout.readline()
    os.killpg(waiter.pid, signal.SIGKILL)
    waiter.wait()
    job = re.search(r"submitted job (\d+)", first).group(1)
    again = run_launch(slurm_cluster.env, *args, timeout=150)
    assert again.returncode == 0, output(again)
    assert f"nodes=1: job {job}, submitted earlier, still runs or waits; waiting for it" in again.stdout, output(again)
    assert f"job {job} (nodes=1) COMPLETED" in again.stdout and "submitted job" not in again.stdout
    assert (sweep / "report" / "scaling.csv").is_file()


@pytest.mark.timeout(240)
def test_a_plain_scancel_is_a_cancel_not_a_preemption_nor_a_failure(slurm_cluster, tmp_path, data_overrides):
    """scancel sends SIGTERM, as a preemption does: the ranks save, see that the job was cancelled (COMPLETING, not
    requeued, before its time limit), and stop without requeueing; the waiting launcher says so and exits 0, and so
    does launch.status."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(launch_cmd(*SLURM, *SLOW, *data_overrides, f"hydra.run.dir={run_dir}"), cwd=REPO,
                            env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: steps_done(run_dir) >= 15, what="15 steps")
        job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
        slurm_cluster.run("scancel", job)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    said = out + err
    assert proc.returncode == 0, said[-3000:]
    assert f"job {job} (" in said and ") cancelled by the user; the same command continues the run" in said, said[-3000:]
    assert "preemption signal" not in said and "failed" not in said, said[-3000:]
    [attempt] = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert attempt["ended"] == "cancelled by the user" and not attempt["requeued"], attempt
    assert (run_dir / "checkpoints" / f"step_{attempt['last_step']:08d}").is_dir(), attempt
    status = verb(slurm_cluster.env, "status", str(run_dir))
    assert status.returncode == 0 and f"job {job} CANCELLED" in status.stdout, output(status)
    assert "0 restart(s)" in status.stdout and status.stdout.rstrip().endswith("cancelled by the user"), output(status)
