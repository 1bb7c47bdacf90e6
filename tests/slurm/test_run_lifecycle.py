"""A run is one thing from its first submission to its last step: after a stop that Slurm does not undo (the
restart limit, scancel), the same command continues it; a sweep run again finishes only what did not finish."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, wait_until
from slurm_helpers import local_reference, SLURM, TINY, launch_cmd, losses, output

pytestmark = pytest.mark.slurm
STEPS = 60
RUN = [o for o in TINY if not o.startswith(("train.max_steps", "checkpoint.interval_steps"))] + [
    f"train.max_steps={STEPS}", "checkpoint.interval_steps=5", "debug.delay_rank=0", "debug.delay_s=0.1"]
# what a user's shell may hold from an earlier torchrun: sbatch passes it into the job, where it must not count
STALE = {"RANK": "5", "WORLD_SIZE": "9", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "1"}


@pytest.fixture
def reference(reference_run, data_overrides) -> Path:
    return reference_run(*RUN, *data_overrides)


def attempts(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]


def trained(run_dir: Path, steps: int, timeout: float = 150) -> None:
    metrics, deadline = run_dir / "metrics" / "rank0.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} did not train {steps} steps in {timeout} s")


def same_run(run_dir: Path, reference: Path) -> None:
    from gpt.checkpoint.writer import load_model

    assert losses(run_dir) == losses(reference)  # every step once, bitwise
    a, b = load_model(run_dir)[0].state_dict(), load_model(reference)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def sbatch(cluster, log: Path, overrides: list[str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--time=10", f"--output={log}",
                           str(REPO / "slurm" / "multi_node.sh"), *overrides], cwd=REPO,
                          env={**cluster.env, **STALE}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


@pytest.mark.timeout(420)
def test_sbatch_stopped_at_its_restart_limit_is_continued_by_the_same_command(slurm_cluster, tmp_path,
                                                                              data_overrides, reference):
    run_dir = tmp_path / "run"
    command = [*RUN, *data_overrides, "preemption.max_restarts=0", f"hydra.run.dir={run_dir}"]
    first = sbatch(slurm_cluster, tmp_path / "first.out", command)
    trained(run_dir, 10)
    slurm_cluster.run("scancel", "--signal=USR2", first)
    slurm_cluster.wait_state(first, timeout=120)  # not requeued: the limit is 0
    assert attempts(run_dir)[-1]["requeued"] is False
    second = sbatch(slurm_cluster, tmp_path / "second.out", command)  # the same command, resubmitted
    assert slurm_cluster.wait_state(second, timeout=240) == "COMPLETED", (tmp_path / "second.out").read_text()
    log = attempts(run_dir)
    assert [(a["job_id"], a["ended"]) for a in log] == [(first, "preempted:SIGUSR2"), (second, "finished")]
    assert log[1]["first_step"] == log[0]["last_step"] > 0
    same_run(run_dir, reference)
    text = (tmp_path / "first.out").read_text()
    assert "ignoring RANK WORLD_SIZE MASTER_ADDR MASTER_PORT inherited from the submitting shell" in text


@pytest.mark.timeout(420)
def test_cluster_slurm_cancelled_then_the_same_command_continues(slurm_cluster, tmp_path, data_overrides, reference):
    run_dir = tmp_path / "run"
    command = launch_cmd("nodes=2", *SLURM, *RUN, *data_overrides, f"hydra.run.dir={run_dir}")
    env = {**slurm_cluster.env, **STALE}
    with (tmp_path / "first.out").open("w") as out:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        trained(run_dir, 10)
        job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
        slurm_cluster.run("scancel", job)
        assert first.wait(timeout=120) == 0  # the user's cancel: neither a preemption nor a failure
    assert "cancelled by the user" in (tmp_path / "first.out").read_text(), (tmp_path / "first.out").read_text()[-3000:]
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, output(again)
    assert f"continuing {run_dir} from step" in again.stdout + again.stderr
    assert attempts(run_dir)[-1]["ended"] == "finished" and attempts(run_dir)[-1]["first_step"] > 0
    same_run(run_dir, reference)
    job_log = Path(json.loads((run_dir / "slurm_job.json").read_text())["stderr"]).read_text()
    assert "ignoring MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE inherited" in job_log


@pytest.mark.timeout(420)
def test_a_sweep_run_again_finishes_only_what_did_not_finish(slurm_cluster, tmp_path, data_overrides):
    sweep = tmp_path / "sweep"
    command = launch_cmd("-m", "nodes=1,2", *SLURM, *RUN, *data_overrides, f"hydra.sweep.dir={sweep}")
    with (tmp_path / "first.out").open("w") as out:
        first = subprocess.Popen(command, cwd=REPO, env=slurm_cluster.env, stdout=out, stderr=subprocess.STDOUT)
        trained(sweep / "nodes=2", 10)
        job = json.loads((sweep / "nodes=2" / "slurm_job.json").read_text())["job_id"]
        slurm_cluster.run("scancel", job)
        code = first.wait(timeout=240)
    said = (tmp_path / "first.out").read_text()
    assert code == 0 and f"job {job} (nodes=2) cancelled by the user" in said, said[-3000:]  # a cancel fails nothing
    assert attempts(sweep / "nodes=1")[-1]["ended"] == "finished"
    again = subprocess.run(command, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, output(again)
    said = again.stdout + again.stderr
    assert said.count("submitted job") == 1 and "for nodes=2" in said and "nodes=1 finished at step 60" in said
    assert attempts(sweep / "nodes=2")[-1]["ended"] == "finished"
    scaling = (sweep / "report" / "scaling.csv").read_text()
    assert len(scaling.strip().splitlines()) == 3  # a header and both points


@pytest.mark.timeout(420)
def test_a_node_failure_is_requeued_by_slurm_and_says_so(slurm_cluster, tmp_path, data_overrides, reference):
    run_dir = tmp_path / "run"
    command = launch_cmd("nodes=2", *SLURM, *RUN, *data_overrides, f"hydra.run.dir={run_dir}")
    with (tmp_path / "out").open("w") as out:
        launcher = subprocess.Popen(command, cwd=REPO, env=slurm_cluster.env, stdout=out, stderr=subprocess.STDOUT)
        trained(run_dir, 12)
        job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
        lost = sorted(e["host"] for e in map(json.loads, (p.read_text() for p in
                                                          (run_dir / "environment").glob("rank*.json"))))[-1]
        # the node's slurmd stops answering (it would re-register at once and Slurm return the node to service)
        slurmd = int(subprocess.run(["pgrep", "-x", "-f", f"slurmd -D -N {lost}"], capture_output=True,
                                    text=True).stdout.split()[0])
        try:
            os.kill(slurmd, signal.SIGSTOP)
            slurm_cluster.run("scontrol", "update", f"nodename={lost}", "state=down", "reason=test-node-failure")
            deadline = time.monotonic() + 120
            while not (run_dir / "attempts.jsonl").is_file() and time.monotonic() < deadline:
                time.sleep(0.1)
            os.kill(slurmd, signal.SIGCONT)  # the attempt is recorded: the node may come back
            slurm_cluster.run("scontrol", "update", f"nodename={lost}", "state=resume", check=False)
            assert launcher.wait(timeout=300) == 0, (tmp_path / "out").read_text()[-4000:]
        finally:
            os.kill(slurmd, signal.SIGCONT)
            slurm_cluster.run("scontrol", "update", f"nodename={lost}", "state=resume", check=False)
            if launcher.poll() is None:
                launcher.kill()
    log = attempts(run_dir)
    # the ranks were told (SIGTERM) and saved: the attempts line, the waiter and the goodput line name the node
    assert log[0]["ended"] == f"node failure: {lost} down (test-node-failure)" and log[0]["job_id"] == job, log
    assert "requeued by Slurm after a node failure" in log[0]["note"], log
    said = (tmp_path / "out").read_text()
    assert f"attempt 0 ended (node failure: {lost} down (test-node-failure))" in said, said[-3000:]
    finished = [x for x in (run_dir / "logs" / "rank0.log").read_text().splitlines() if "run finished" in x]
    assert f"interruptions: node failure: {lost} down" in finished[-1], finished
    assert log[-1]["ended"] == "finished" and log[-1]["restart"] >= 1
    same_run(run_dir, reference)


def running_again(cluster, job: str, restarts: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job_info(job)
        if info.get("JobState") == "RUNNING" and int(info.get("Restarts", 0)) == restarts:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job} never ran its restart {restarts}")


def ranks_started(run_dir: Path, restart: int, ranks: int = 2) -> bool:
    """Whether restart `restart` of the job has started all its `ranks` ranks (their imports have just begun): each
    task wrapper that starts one has its signal relay set, and so has the batch shell of multi_node.sh its traps.
    (One rank up is not enough: on a loaded machine the other node's wrapper was still starting, and USR2 killed
    it.)"""
    started = 0
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launch.rank.worker" in cmdline and str(run_dir).encode() in cmdline and \
                f"SLURM_RESTART_COUNT={restart}".encode() in environ:
            started += 1
    return started >= ranks


@pytest.mark.timeout(420)
# sbatch here; under cluster=slurm a preemption as the tasks start is test_slurm_preemption's (one path each)
@pytest.mark.parametrize("path", ["sbatch --batch"])
def test_a_signal_during_start_up_ends_in_a_requeue_never_failed(path, slurm_cluster, tmp_path, data_overrides,
                                                                  reference):
    """USR2 as soon as a requeued attempt has started its ranks, long before they have imported torch."""
    run_dir = tmp_path / "run"
    signal_args = ["--batch"] if path.startswith("sbatch") else []
    if path.startswith("sbatch"):
        job = sbatch(slurm_cluster, tmp_path / "job.out", [*RUN, *data_overrides, f"hydra.run.dir={run_dir}"])
        launcher = None
    else:
        launcher = subprocess.Popen(launch_cmd("nodes=2", *SLURM, *RUN, *data_overrides, f"hydra.run.dir={run_dir}"),
                                    cwd=REPO, env=slurm_cluster.env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        trained(run_dir, 1)
        job = json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
    try:
        trained(run_dir, 10)
        slurm_cluster.run("scancel", "--signal=USR2", *signal_args, job)
        running_again(slurm_cluster, job, 1)
        # not a fixed sleep after the restart: a signal sent before the step exists is dropped, and one sent before
        # the task wrapper (or the batch shell) is ready kills it
        wait_until(lambda: ranks_started(run_dir, 1), what="the restarted attempt's ranks")
        slurm_cluster.run("scancel", "--signal=USR2", *signal_args, job)
        if launcher is not None:
            assert launcher.wait(timeout=300) == 0
        else:
            assert slurm_cluster.wait_state(job, timeout=300) == "COMPLETED", (tmp_path / "job.out").read_text()
    finally:
        if launcher is not None and launcher.poll() is None:
            launcher.kill()
        slurm_cluster.run("scancel", job, check=False)
    log = attempts(run_dir)
    assert all(a["ended"] == "preempted:SIGUSR2" and a["requeued"] for a in log[:-1]) and len(log) >= 3, log
    assert log[-1]["ended"] == "finished"
    same_run(run_dir, reference)


@pytest.mark.timeout(420)
def test_resume_path_initialises_and_requeues_continue_from_the_runs_own_checkpoints(slurm_cluster, tmp_path,
                                                                                    data_overrides):
    """resume=PATH only starts the run: after two USR2 requeues each attempt continues from the run's own newest
    checkpoint, and the whole run equals one uninterrupted local run initialised from PATH."""
    source = local_reference(tmp_path / "source", *[o for o in RUN if not o.startswith("train.max_steps")],
                             "train.max_steps=20", *data_overrides)
    init = [*RUN, *data_overrides, f"resume={source}"]
    uninterrupted = local_reference(tmp_path / "uninterrupted", *init)
    run_dir = tmp_path / "run"
    with (tmp_path / "out").open("w") as out:
        launcher = subprocess.Popen(launch_cmd("nodes=2", *SLURM, *init, f"hydra.run.dir={run_dir}"), cwd=REPO,
                                    env=slurm_cluster.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            job = None
            for restarts, steps in enumerate((5, 15)):
                trained(run_dir, steps)
                job = job or json.loads((run_dir / "slurm_job.json").read_text())["job_id"]
                slurm_cluster.run("scancel", "--signal=USR2", job)
                running_again(slurm_cluster, job, restarts + 1)
            assert launcher.wait(timeout=300) == 0, (tmp_path / "out").read_text()[-4000:]
        finally:
            if launcher.poll() is None:
                launcher.kill()
    log = attempts(run_dir)
    assert [a["ended"] for a in log] == ["preempted:SIGUSR2"] * 2 + ["finished"], log
    assert log[0]["first_step"] == 20  # from PATH, then from the run's own
    assert [b["first_step"] for b in log[1:]] == [a["last_step"] for a in log[:-1]], log
    assert "is not used: this run continues from its own checkpoints" in (run_dir / "logs" / "rank0.log").read_text()
    same_run(run_dir, uninterrupted)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad, key", [("checkpoint.keep=0", "checkpoint.keep"),
                                      ("preemption.signals=[SIGFOO]", "preemption.signals"),
                                      ("resume=/no/such/run", "resume"),
                                      ("rendezvous.timeout_s=-1", "rendezvous.timeout_s"),
                                      ("stragglers.windows=0", "stragglers.windows"),
                                      ("+debug.hang_forever=1", "debug.hang_forever")])
def test_bad_values_are_refused_before_sbatch(bad, key, slurm_cluster, tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    proc = subprocess.run(launch_cmd(*SLURM, *TINY, *data_overrides, bad, f"hydra.run.dir={run_dir}"), cwd=REPO,
                          env=slurm_cluster.env, capture_output=True, text=True, timeout=100)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and key in errors[0], output(proc)
    assert not (run_dir / "slurm").exists() and "submitted job" not in proc.stdout + proc.stderr


@pytest.mark.timeout(420)
def test_a_job_killed_at_its_time_limit_is_continued_by_the_next_submission(slurm_cluster, tmp_path, data_overrides):
    """No warning before the limit (preemption off): Slurm kills the job at TIMEOUT with nothing saved since the
    last periodic checkpoint; the command with the limit raised, as the error line advises, continues from it (a
    one-minute limit again would be a race with the 200-odd steps and saves left on a loaded machine), and the
    attempts log says how the first ended."""
    run_dir = tmp_path / "run"
    slow = [o for o in RUN if not o.startswith(("train.max_steps", "debug.delay_s"))]
    command = ["nodes=1", *SLURM, "cluster.time_min=1", "cluster.signal_delay_s=0", "preemption.enabled=false",
               *slow, *data_overrides, "train.max_steps=300", f"hydra.run.dir={run_dir}"]
    first = subprocess.run(launch_cmd(*command, "debug.delay_s=0.5"), cwd=REPO, env=slurm_cluster.env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and "TIMEOUT" in first.stderr, output(first)
    assert ("it reached its time limit (cluster.time_min=1) with preemption.enabled=false: nothing saved it"
            in first.stderr), output(first)
    step = int(re.search(r"the same command continues the run from its newest checkpoint \(step (\d+)\)",
                         first.stderr).group(1))
    again = subprocess.run(launch_cmd(*command, "debug.delay_s=0", "cluster.time_min=10"), cwd=REPO, env=slurm_cluster.env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, output(again)
    log = attempts(run_dir)
    assert log[0]["ended"] == f"stopped by Slurm: job {log[0]['job_id']} ended TIMEOUT", log
    assert log[-1]["ended"] == "finished" and log[-1]["first_step"] == step > 0, log
