"""Preemption, time limits and requeue on the real local Slurm cluster (2 nodes): the job comes back by itself
each time, resumes from its newest checkpoint, and ends with the uninterrupted run's losses (bitwise) and final
weights. Through both entry points: `python -m launch cluster=slurm` (submitit) and `sbatch slurm/multi_node.sh`.
"""
from __future__ import annotations

import json
import re
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gpt.checkpoint.store import AFTER_DIVERGENCE, list_checkpoints, read_meta, step_of
from launch.backends.slurm.commands import FINAL
from slurm_helpers import REPO, SLURM, TINY, launch_cmd, losses
from tracker_points import assert_tracked_once

pytestmark = pytest.mark.slurm

STEPS = 80
# Slow enough to be interrupted mid-run (about 0.1 s a step), a checkpoint every 5 steps.
RUN = [o for o in TINY if not o.startswith(("train.max_steps", "checkpoint.interval_steps"))] + [
    f"train.max_steps={STEPS}", "checkpoint.interval_steps=5", "debug.delay_rank=0", "debug.delay_s=0.1",
    "preemption.max_restarts=40", "preemption.in_job_restarts=0"]  # these tests exercise the requeue


@pytest.fixture
def reference(reference_run, data_overrides) -> Path:
    return reference_run(*RUN, *data_overrides)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from gpt.checkpoint.writer import load_model

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
                 name: str = "launcher", sbatch_flags: tuple[str, ...] = ("--nodes=2",)):
        self.cluster, self.run_dir = cluster, run_dir
        self.out, self.err = (tmp_path / f"{name}.out").open("w"), (tmp_path / f"{name}.err").open("w")
        self.job_id: str | None = None
        if sbatch:
            self.proc = None
            self.log = tmp_path / "job.out"
            submit = subprocess.run(
                ["sbatch", "--parsable", *sbatch_flags, "--time=10", f"--output={self.log}",
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
        elif kind.startswith("kill:"):  # kill -9 of that rank's process
            self.kill_rank(int(kind.split(":")[1]))
        elif kind.startswith("batch:"):  # the batch shell only, as Slurm's --signal=B:USR2@T warning comes
            self.cluster.run("scancel", "--batch", f"--signal={kind.split(':')[1]}", job)
        else:
            self.cluster.run("scancel", f"--signal={kind}", job)

    def kill_rank(self, rank: int) -> None:
        pid = json.loads((self.run_dir / "environment" / f"rank{rank}.json").read_text())["pid"]
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        assert b"launch.rank.worker" in cmdline  # only ever kill the process this test's job started
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
                         sbatch: bool = False, seed: int = 5, wait_s: float = 300) -> Job:
    overrides = [*RUN, *data_overrides, *extra] if sbatch else ["nodes=2", *SLURM, *RUN, *data_overrides, *extra]
    job = Job(slurm_cluster, tmp_path, overrides, tmp_path / "run", sbatch=sbatch)
    rng = random.Random(seed)
    for restarts, kind in enumerate(kinds):
        job.training(restarts)
        time.sleep(rng.uniform(0, 0.3))
        job.interrupt(kind)
    code = job.wait(timeout=wait_s)
    assert code == 0, job.text()
    return job


@pytest.mark.timeout(400)
def test_sbatch_path_comes_back_after_a_batch_shell_warning_a_step_signal_and_a_killed_rank(slurm_cluster, tmp_path,
                                                                                          data_overrides, reference):
    """multi_node.sh: USR2 to the batch shell (how --signal=B:USR2@T arrives) is passed on to every rank; TERM to
    the step reaches the ranks directly; a rank killed (kill -9 of rank 1, on the node that is not the batch host)
    is seen by the task wrapper srun runs (the same as cluster=slurm's), which requeues the job. Each time the job
    requeues itself, the same job id finds its folder, and the run ends exactly as the uninterrupted one."""
    job = interrupt_and_finish(slurm_cluster, tmp_path, data_overrides, ["batch:USR2", "TERM", "kill:1"],
                               sbatch=True, extra=["tracking=mlflow"])
    assert_same_run(job.run_dir, reference)
    assert_tracked_once("mlflow", job.run_dir)  # one MLflow run over the four attempts, each point once
    log = attempts(job.run_dir)
    assert [a["ended"] for a in log[:2]] == ["preempted:SIGUSR2", "preempted:SIGTERM"], log
    killed, last = log[2:]
    assert killed["lost_rank"] == 1 and killed["requeued"] is True and "killed by SIGKILL" in killed["ended"], log
    assert last["ended"] == "finished" and last["restart"] == 3, last
    text = job.log.read_text()
    assert f"multi_node.sh: job {job.job_id} (restart 3) on 2 node(s)" in text, text[-3000:]
    # each attempt says how it ended: two requeues, a lost rank that requeued, then done. The lost rank's attempt
    # says it on its task's line; its batch shell's own "requeued" line comes only when srun ends within KillWait of
    # the requeue, before Slurm kills the batch step (on a loaded machine it does, 5 s after)
    assert 2 <= text.count("requeued: this job runs again") <= 3 and text.count("done. Run folder") == 1, text[-6000:]
    assert f"rank 1 on {slurm_cluster.node_prefix}" in text and "requeued job" in text, text[-6000:]


@pytest.mark.timeout(600)
def test_time_limit_warning_saves_and_requeues_before_the_kill(slurm_cluster, tmp_path, data_overrides, reference):
    """--time=2 with the warning 30 s ahead (Slurm checks every 30 s, so it comes 60 to 90 s into an attempt):
    Slurm never requeues a TIMEOUT itself. An attempt spends 8 s or more starting, so 80 steps of 1.1 s (88 s) never
    fit in one; one that starts slowly on a loaded machine (25 s) still trains 30-odd steps, so three attempts or so
    finish. (With --time=1 the warning came 30 s in, and slow start-ups left attempts of one step each.)"""
    job = interrupt_and_finish(slurm_cluster, tmp_path, data_overrides, [], wait_s=540,
                               extra=["cluster.time_min=2", "cluster.signal_delay_s=30", "debug.delay_s=1.1"])
    assert_same_run(job.run_dir, reference)
    log = attempts(job.run_dir)
    assert len(log) >= 2 and all(a["ended"] == "preempted:time limit" for a in log[:-1]), log  # not a preemption
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
    assert job.training(restarts=1) > 5  # requeued by the killed rank's task, and resumed from step 5
    kill_inside_the_save(time.time() - 5)
    assert job.wait(timeout=120) == 1
    text = job.text()
    assert f"rank 0 on {slurm_cluster.node_prefix}" in text and "killed by SIGKILL" in text, text
    assert "not requeued: the attempt before lost a rank too, and no checkpoint newer than step 5" in text, text
    assert "the same command continues the run from its newest checkpoint (step 5)" in text, text
    assert "stopped because rank 0 was lost" in text and "Connection closed by peer" not in text, text  # its peer
    first, second = attempts(job.run_dir)
    assert first["lost_rank"] == 0 and first["requeued"] is True and first["last_step"] == 5, first
    # it trained 10 steps, the 5 past its checkpoint lost once the next attempt trained them again
    assert "requeued job" in first["note"] and first["goodput"]["steps"] == 10, first
    assert second["goodput"]["steps_replayed"] == 5, second
    assert second["lost_rank"] == 0 and second["requeued"] is False and second["first_step"] == 5, second
    again = Job(slurm_cluster, tmp_path, [a for a in args if not a.startswith("debug.save_sleep")], job.run_dir,
                name="again")
    assert again.wait() == 0, again.text()
    assert "resumed from" in (job.run_dir / "logs" / "rank0.log").read_text()
    assert not partial.exists()
    assert_same_run(job.run_dir, reference)
    assert attempts(job.run_dir)[-1]["first_step"] == 5


@pytest.mark.timeout(300)
def test_a_plain_scancel_is_never_said_to_be_requeued(slurm_cluster, tmp_path, data_overrides):
    """scancel sends the ranks SIGTERM, as a preemption does: they save, and rank 0 finds the job COMPLETING with
    no new restart before its time limit, which is the user's cancel: not a requeue, nor a failure."""
    job = Job(slurm_cluster, tmp_path, ["nodes=2", *SLURM, *RUN, *data_overrides], tmp_path / "run")
    job.training(0)
    slurm_cluster.run("scancel", job.id())
    assert job.wait() == 0
    text = job.text() + (job.run_dir / "logs" / "rank0.log").read_text()
    assert "requeued by Slurm" not in text and f"job {job.id()} (run) cancelled by the user" in text, text
    assert "preemption signal" not in text and "failed" not in text, text
    first = attempts(job.run_dir)[0]
    assert first["requeued"] is False and first["ended"] == "cancelled by the user", first
    assert first["note"].startswith("the same command continues the run from"), first  # "cancelled" said once


@pytest.mark.timeout(120)
def test_a_job_cancelled_while_pending_names_no_log_it_never_wrote(slurm_cluster, tmp_path, data_overrides):
    job = Job(slurm_cluster, tmp_path, ["nodes=2", *SLURM, *RUN, *data_overrides, "+cluster.sbatch.hold=true"],
              tmp_path / "run")
    slurm_cluster.wait_state(job.id(), {"PENDING"}, timeout=60)
    slurm_cluster.run("scancel", job.id())
    assert job.wait(timeout=60) == 0  # the user's cancel: no failure
    text = job.text()
    assert f"job {job.id()} (run) cancelled by the user; the same command continues the run from the start" in text, \
        text
    assert "job log" not in text, text


@pytest.mark.timeout(300)
def test_sbatch_path_at_its_restart_limit_names_the_limit(slurm_cluster, tmp_path, data_overrides):
    """A rank killed when the job has no restart left: the job's last line names the limit and how to continue,
    not "a rank failed"."""
    args = [o for o in RUN if not o.startswith("preemption.max_restarts")] + ["preemption.max_restarts=0"]
    job = Job(slurm_cluster, tmp_path, [*args, *data_overrides], tmp_path / "run", sbatch=True)
    job.training(0)
    job.kill_rank(1)
    assert job.wait() != 0
    last = [x for x in job.log.read_text().splitlines() if x.startswith("error: ")][-1]
    # srun's own code depends on which signal reached it first as the step ended (1, or 143 for SIGTERM)
    assert re.match(r"error: srun exited with code \d+: rank 1 on ", last) and "was killed by SIGKILL" in last, last
    assert "restart limit reached (0 of preemption.max_restarts=0); the same command continues the run from" in last
    text = job.log.read_text()  # the survivor says its peer is gone in one line, no gloo traceback
    assert "Traceback" not in text and "rank failed: a collective failed, a peer is gone (" in text, text[-3000:]


@pytest.mark.timeout(400)
def test_survivors_that_abort_after_a_killed_peer_requeue_once_naming_it(slurm_cluster, tmp_path, data_overrides):
    """NCCL's abort, mirrored on CPU (debug.abort_on_collective_error): rank 1 of 4 kills itself at step 12, and its
    three peers die of SIGABRT once their collective fails. Their tasks take them for survivors: one attempts line,
    naming rank 1, one requeue; the job resumes from step 10 and finishes."""
    job = Job(slurm_cluster, tmp_path, ["nodes=2", "cluster.tasks_per_node=2", *SLURM, *RUN, *data_overrides,
                                        "debug.kill_rank=1", "debug.kill_step=12",
                                        "debug.abort_on_collective_error=true"], tmp_path / "run")
    assert job.wait() == 0, job.text()
    first, *rest = attempts(job.run_dir)
    assert first["lost_rank"] == 1 and first["requeued"] is True and "killed by SIGKILL" in first["ended"], first
    assert [a["ended"] for a in rest] == ["finished"] and rest[0]["first_step"] == 10, rest
    assert "killed by SIGABRT" not in job.text(), job.text()
    logs = "".join((job.run_dir / "logs" / f"rank{r}.log").read_text() for r in (0, 2, 3))
    assert logs.count("debug.abort_on_collective_error: a collective failed; aborting") == 3, logs[-3000:]


@pytest.mark.timeout(360)
def test_soak_four_interruptions_of_every_kind_come_back_and_resume_exactly(slurm_cluster, tmp_path, data_overrides,
                                                                           reference):
    """USR2 (Slurm's warning), TERM (a preemption) and an outside `scontrol requeue`, then USR2 again: the job comes
    back by itself each time, and an attempt that resumed after each kind (from its own save, or from a periodic
    checkpoint after the requeue's hard stop) is interrupted again and resumes too; the run equals the
    uninterrupted one, and one W&B run holds its five attempts. (It ran ten interruptions, seven drawn at random,
    then five: more of the same pairs, at 17 s an attempt.)"""
    kinds = ["USR2", "TERM", "requeue", "USR2"]
    job = interrupt_and_finish(slurm_cluster, tmp_path, data_overrides, kinds,
                               extra=["debug.delay_s=0.15", "tracking=wandb"])
    assert_same_run(job.run_dir, reference)
    assert_tracked_once("wandb", job.run_dir)  # one W&B run over every attempt
    log = attempts(job.run_dir)
    ends = [a["ended"] for a in log]
    assert ends[:2] == ["preempted:SIGUSR2", "preempted:SIGTERM"] and ends[-1] == "finished", log
    assert {a["job_id"] for a in log} == {job.job_id}
    assert log[-1]["restart"] == len(kinds) and log[-1]["last_step"] == STEPS, log
    # every attempt resumed where the one before stopped (or from a periodic checkpoint for a hard stop)
    assert all(b["first_step"] <= a["last_step"] for a, b in zip(log, log[1:])), log
    assert int(slurm_cluster.job_info(job.job_id)["Restarts"]) == len(kinds)


@pytest.mark.timeout(300)
def test_a_rollback_survives_a_requeue(slurm_cluster, tmp_path, data_overrides):
    """divergence.policy=rollback with checkpoint.keep=1 on one node: the NaN batch 12 rolls the run back to step 10,
    then USR2 requeues it. The resumed attempt keeps step 10's checkpoint (the newest from before the divergence)
    and marks its own saves after it; it counts on from the first attempt's rollback, so the NaN batch 40 (step 37)
    finds max_rollbacks=1 spent and stops the run, naming it. The first attempt's goodput counts the 3 steps the
    rollback undid (10..12) as lost."""
    args = ["nodes=1", *SLURM, *RUN, *data_overrides, "debug.delay_s=0.2", "checkpoint.keep=1",
            "divergence.policy=rollback", "divergence.max_rollbacks=1", "debug.nan_at_step=12",
            "debug.spike_at_step=40", "debug.spike_factor=nan"]
    job = Job(slurm_cluster, tmp_path, args, tmp_path / "run")
    deadline = time.monotonic() + 120
    while not rolled_back_and_trained_to(job.run_dir, 16):
        assert time.monotonic() < deadline and job.alive(), job.text()
        time.sleep(0.1)
    job.interrupt("USR2")
    code, text, log = job.wait(), job.text(), attempts(job.run_dir)
    assert len(log) == 2 and log[0]["ended"] == "preempted:SIGUSR2" and log[0]["last_step"] < 37, log  # in time
    assert code == 1 and "again after 1 rollbacks without progress" in text and "diverged at step 37" in text, text
    assert log[0]["goodput"]["steps_undone"] == 3, log
    checkpoints = list_checkpoints(job.run_dir / "checkpoints")
    assert step_of(checkpoints[0]) == 10 and len(checkpoints) == 2, checkpoints  # keep=1, and the one before
    newest = read_meta(checkpoints[-1])
    assert newest[AFTER_DIVERGENCE] == 12 and newest["rollbacks"] == {"count": 1, "diverged_at": 12}, newest


@pytest.mark.timeout(300)
def test_a_skipped_divergence_keeps_its_good_checkpoint_across_a_requeue(slurm_cluster, tmp_path, data_overrides):
    """divergence.policy=skip with checkpoint.keep=1: the NaN batch of step 12 is left out, and USR2 requeues the
    job once it saved step 15. The resumed attempt still keeps step 10's checkpoint (the newest from before the
    divergence, which keep=1 would have pruned) and marks every save of its own as after it, to the last step."""
    args = ["nodes=1", *SLURM, *RUN, *data_overrides, "checkpoint.keep=1", "divergence.policy=skip",
            "debug.nan_at_step=12"]
    job = Job(slurm_cluster, tmp_path, args, tmp_path / "run")
    deadline = time.monotonic() + 120
    while not any(step_of(p) >= 15 for p in list_checkpoints(job.run_dir / "checkpoints")):
        assert time.monotonic() < deadline and job.alive(), job.text()
        time.sleep(0.1)
    job.interrupt("USR2")
    code, text, log = job.wait(), job.text(), attempts(job.run_dir)
    assert code == 0 and [a["ended"] for a in log] == ["preempted:SIGUSR2", "finished"], (log, text)
    assert log[0]["last_step"] < STEPS, log  # the requeue came before the end
    checkpoints = list_checkpoints(job.run_dir / "checkpoints")
    assert [step_of(p) for p in checkpoints] == [10, STEPS], checkpoints
    assert AFTER_DIVERGENCE not in read_meta(checkpoints[0]) and read_meta(checkpoints[-1])[AFTER_DIVERGENCE] == 12


def rolled_back_and_trained_to(run_dir: Path, step: int) -> bool:
    """Rank 0's metrics hold a rollback, and a step at least `step` (the rollback dropped the records after it)."""
    try:
        lines = (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return False
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return any(r["kind"] == "rollback" for r in records) and \
        any(r["kind"] == "train" and r["step"] >= step for r in records)
