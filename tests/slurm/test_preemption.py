"""Preemption, time limits and requeue on the real local Slurm cluster (2 nodes): the job comes back by itself
each time, resumes from its newest checkpoint, and ends with the uninterrupted run's losses (bitwise) and final
weights. Through both entry points: `python -m launch cluster=slurm` (submitit) and `sbatch slurm/multi_node.sh`.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launch.backends.slurm.commands import FINAL
from slurm_helpers import local_reference, REPO, SLURM, TINY, launch_cmd, losses

pytestmark = pytest.mark.slurm

STEPS = 80
# Slow enough to be interrupted mid-run (about 0.1 s a step), a checkpoint every 5 steps.
RUN = [o for o in TINY if not o.startswith(("train.max_steps", "checkpoint.interval_steps"))] + [
    f"train.max_steps={STEPS}", "checkpoint.interval_steps=5", "debug.delay_rank=0", "debug.delay_s=0.1",
    "preemption.max_restarts=40"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_overrides) -> Path:
    return local_reference(tmp_path_factory.mktemp("reference") / "run", *RUN, *data_overrides)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from gpt.checkpoint import load_model

    model, meta, _ = load_model(run_dir)
    assert meta["step"] == STEPS
    return model.state_dict()


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert losses(run_dir) == losses(reference)  # bitwise, every step, once
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def attempts(run_dir: Path) -> list[dict]:
    f = run_dir / "attempts.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


class Job:
    """A training job submitted through the launcher (which waits for it), or with sbatch slurm/multi_node.sh
    (sbatch=True: nothing waits for it), and ways to interrupt it."""

    def __init__(self, cluster, tmp_path: Path, overrides: list[str], run_dir: Path, sbatch: bool = False,
                 name: str = "launcher"):
        self.cluster, self.run_dir = cluster, run_dir
        self.out, self.err = (tmp_path / f"{name}.out").open("w"), (tmp_path / f"{name}.err").open("w")
        self.job_id: str | None = None
        if sbatch:
            self.proc = None
            self.log = tmp_path / "job.out"
            submit = subprocess.run(
                ["sbatch", "--parsable", "--nodes=2", "--time=10", f"--output={self.log}",
                 str(REPO / "slurm" / "multi_node.sh"), *overrides, f"hydra.run.dir={run_dir}"],
                cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=60)
            assert submit.returncode == 0, submit.stderr
            self.job_id = submit.stdout.strip().split(";")[0]
        else:
            self.proc = subprocess.Popen(launch_cmd(*overrides, f"hydra.run.dir={run_dir}"), cwd=REPO,
                                         env=cluster.env, stdout=self.out, stderr=self.err)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.cluster.job_state(self.id()) not in FINAL

    def id(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while self.job_id is None and time.monotonic() < deadline:
            f = self.run_dir / "slurm_job.json"
            if f.exists():
                self.job_id = json.loads(f.read_text())["job_id"]
            time.sleep(0.2)
        assert self.job_id, "the job was never submitted"
        return self.job_id

    def training(self, restarts: int, timeout: float = 120) -> int:
        """Wait until attempt `restarts` (0: the first) runs and has trained a step; returns that step."""
        deadline = time.monotonic() + timeout
        job = self.id()
        while True:  # a record newer than the moment the attempt is seen running is that attempt's
            assert time.monotonic() < deadline and self.alive(), self.text()
            info = self.cluster.job_info(job)
            if info.get("JobState") == "RUNNING" and int(info.get("Restarts", 0)) == restarts:
                since = time.time()
                break
            time.sleep(0.1)
        metrics = self.run_dir / "metrics" / "rank0.jsonl"
        while time.monotonic() < deadline:
            assert self.alive(), self.text()
            if metrics.exists():
                for line in reversed(metrics.read_text().splitlines()):
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if r["time"] > since and r["kind"] == "train":
                        return r["step"]
                    break
            time.sleep(0.1)
        raise AssertionError(f"no training after {since}: {self.text()}")

    def interrupt(self, kind: str) -> None:
        job = self.id()
        if kind == "requeue":
            self.cluster.run("scontrol", "requeue", job)
        elif kind.startswith("batch:"):  # the batch shell only, as Slurm's --signal=B:USR2@T warning comes
            self.cluster.run("scancel", "--batch", f"--signal={kind.split(':')[1]}", job)
        else:
            self.cluster.run("scancel", f"--signal={kind}", job)

    def kill_rank(self, rank: int) -> None:
        pid = json.loads((self.run_dir / "environment" / f"rank{rank}.json").read_text())["pid"]
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        assert b"launch.worker" in cmdline  # only ever kill the process this test's job started
        os.kill(pid, signal.SIGKILL)

    def wait(self, timeout: float = 300) -> int:
        try:
            if self.proc is None:
                state = self.cluster.wait_state(self.id(), timeout=timeout)
                return 0 if state == "COMPLETED" else 1
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            if self.job_id:
                self.cluster.run("scancel", self.job_id, check=False)

    def text(self) -> str:
        self.out.flush(), self.err.flush()
        text = Path(self.out.name).read_text()[-3000:] + "\n" + Path(self.err.name).read_text()[-5000:]
        if self.proc is None and self.log.exists():
            text += self.log.read_text()[-6000:]
        return text


def interrupt_and_finish(slurm_cluster, tmp_path, data_overrides, kinds: list[str], extra: list[str] = (),
                         sbatch: bool = False, seed: int = 5) -> Job:
    overrides = [*RUN, *data_overrides, *extra] if sbatch else ["nodes=2", *SLURM, *RUN, *data_overrides, *extra]
    job = Job(slurm_cluster, tmp_path, overrides, tmp_path / "run", sbatch=sbatch)
    rng = random.Random(seed)
    for restarts, kind in enumerate(kinds):
        job.training(restarts)
        time.sleep(rng.uniform(0, 0.3))
        job.interrupt(kind)
    code = job.wait()
    assert code == 0, job.text()
    return job


@pytest.mark.timeout(300)
def test_usr2_term_and_outside_requeue_each_come_back_and_resume_exactly(slurm_cluster, tmp_path, data_overrides,
                                                                          reference):
    kinds = ["USR2", "TERM", "requeue"]
    job = interrupt_and_finish(slurm_cluster, tmp_path, data_overrides, kinds)
    assert_same_run(job.run_dir, reference)
    log = attempts(job.run_dir)
    ends = [a["ended"] for a in log]
    assert ends[:2] == ["preempted:SIGUSR2", "preempted:SIGTERM"] and ends[-1] == "finished", log
    assert {a["job_id"] for a in log} == {job.job_id}
    assert [a["restart"] for a in log][-1] == 3
    assert log[-1]["last_step"] == STEPS
    # every attempt resumed where the one before stopped (or from a periodic checkpoint for a hard stop)
    assert all(b["first_step"] <= a["last_step"] for a, b in zip(log, log[1:]))
    assert slurm_cluster.job_info(job.job_id).get("Restarts") == "3"


@pytest.mark.timeout(300)
def test_sbatch_path_comes_back_after_a_batch_shell_warning_and_a_step_signal(slurm_cluster, tmp_path, data_overrides,
                                                                               reference):
    """multi_node.sh: USR2 to the batch shell (how --signal=B:USR2@T arrives) is passed on to every rank; TERM to
    the step reaches the ranks directly. Both times the job requeues itself and the same job id finds its folder."""
    job = interrupt_and_finish(slurm_cluster, tmp_path, data_overrides, ["batch:USR2", "TERM"], sbatch=True)
    assert_same_run(job.run_dir, reference)
    ends = [a["ended"] for a in attempts(job.run_dir)]
    assert ends == ["preempted:SIGUSR2", "preempted:SIGTERM", "finished"], ends
    text = job.log.read_text()
    assert f"multi_node.sh: job {job.job_id} (restart 2) on 2 node(s)" in text, text[-3000:]
    # each attempt says how it ended: two requeues, then done
    assert text.count("requeued: this job runs again") == 2 and text.count("done. Run folder") == 1, text[-6000:]


@pytest.mark.timeout(300)
def test_time_limit_warning_saves_and_requeues_before_the_kill(slurm_cluster, tmp_path, data_overrides, reference):
    """--time=1 with the warning 30 s ahead (Slurm checks every 30 s): Slurm never requeues a TIMEOUT itself."""
    job = interrupt_and_finish(slurm_cluster, tmp_path, data_overrides, [],
                               extra=["cluster.time_min=1", "cluster.signal_delay_s=30", "debug.delay_s=0.6"])
    assert_same_run(job.run_dir, reference)
    log = attempts(job.run_dir)
    assert len(log) >= 2 and all(a["ended"] == "preempted:SIGUSR2" for a in log[:-1]), log
    assert log[-1]["ended"] == "finished"


@pytest.mark.timeout(400)
def test_a_killed_rank_requeues_once_then_fails_clearly_and_the_same_command_resumes(slurm_cluster, tmp_path,
                                                                                      data_overrides, reference):
    """A rank killed (kill -9, here in the middle of writing the step-10 checkpoint) while its host lives: its task
    requeues the job, which resumes from step 5. Killed again at the same save, with nothing newer saved since,
    the job fails with a message naming the rank (a crash that repeats is not retried for ever); the same command
    again resumes from step 5 (the partial step 10 is ignored, then removed)."""
    args = ["nodes=2", *SLURM, *RUN, *data_overrides, "debug.save_sleep_s=30", "debug.save_sleep_step=10"]
    job = Job(slurm_cluster, tmp_path, args, tmp_path / "run")
    partial = job.run_dir / "checkpoints" / ".tmp-step_00000010"

    def kill_inside_the_save(since: float) -> None:
        deadline = time.monotonic() + 120
        while not ((partial / ".metadata").exists() and (partial / ".metadata").stat().st_mtime > since):
            assert time.monotonic() < deadline and job.alive(), job.text()
            time.sleep(0.1)
        job.kill_rank(0)

    kill_inside_the_save(0)
    assert job.training(restarts=1) >= 5  # requeued by the killed rank's task, and resumed from step 5
    kill_inside_the_save(time.time() - 5)
    assert job.wait(timeout=120) == 1
    text = job.text()
    assert "rank 0 on gl-n" in text and "killed by SIGKILL" in text, text
    assert "not requeued: the attempt before lost a rank too, and no checkpoint newer than step 5" in text, text
    assert "the same command continues the run from its newest checkpoint (step 5)" in text, text
    assert "stopped because rank 0 was lost" in text and "Connection closed by peer" not in text, text  # its peer
    first, second = attempts(job.run_dir)
    assert first["lost_rank"] == 0 and first["requeued"] is True and first["last_step"] == 5, first
    assert "requeued job" in first["note"] and first["goodput"]["steps"] == 5, first
    assert second["lost_rank"] == 0 and second["requeued"] is False and second["first_step"] == 5, second
    again = Job(slurm_cluster, tmp_path, [a for a in args if not a.startswith("debug.save_sleep")], job.run_dir,
                name="again")
    assert again.wait() == 0, again.text()
    assert "resumed from" in (job.run_dir / "logs" / "rank0.log").read_text()
    assert not partial.exists()
    assert_same_run(job.run_dir, reference)
    assert attempts(job.run_dir)[-1]["first_step"] == 5


@pytest.mark.timeout(300)
def test_sbatch_path_requeues_a_job_whose_rank_was_killed(slurm_cluster, tmp_path, data_overrides, reference):
    """multi_node.sh: srun runs the same task wrapper as cluster=slurm, which sees its rank killed (kill -9 of rank
    1, on the node that is not the batch host) and requeues the job; it resumes and finishes exactly."""
    job = Job(slurm_cluster, tmp_path, [*RUN, *data_overrides], tmp_path / "run", sbatch=True)
    job.training(0)
    job.kill_rank(1)
    assert job.wait() == 0, job.text()
    assert_same_run(job.run_dir, reference)
    first, last = attempts(job.run_dir)[0], attempts(job.run_dir)[-1]
    assert first["lost_rank"] == 1 and first["requeued"] is True and "killed by SIGKILL" in first["ended"], first
    assert last["ended"] == "finished" and last["restart"] == 1, last
    assert "rank 1 on gl-n" in job.log.read_text() and "requeued job" in job.log.read_text(), job.text()


@pytest.mark.timeout(480)
def test_soak_ten_random_interruptions_lose_nothing(slurm_cluster, tmp_path, data_overrides, reference):
    rng = random.Random(1234)
    kinds = [rng.choice(["USR2", "TERM", "requeue"]) for _ in range(10)]
    job = interrupt_and_finish(slurm_cluster, tmp_path, data_overrides, kinds, extra=["debug.delay_s=0.15"])
    assert_same_run(job.run_dir, reference)
    log = attempts(job.run_dir)
    assert log[-1]["ended"] == "finished" and log[-1]["restart"] == 10, log
    assert int(slurm_cluster.job_info(job.job_id)["Restarts"]) == 10
