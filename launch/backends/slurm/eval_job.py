"""eval.after_save=job: each checkpoint rank 0 commits gets an evaluation job of its own, a one-task CPU job that
runs `python -m gpt.evaluate RUN --step N --record` (its figures into the run's metrics/eval_jobs.jsonl and
tensorboard/eval_jobs). Submitted with no dependency: the checkpoint is complete when it is submitted, and the
training job that saved it is still running (afterok would hold every evaluation until training ends, and never run
one of a job that is requeued or cancelled). Torch-free."""
from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

from gpt.config.evaluation import EvalConfig
from gpt.run_folder import RunFolder, claim, write_json
from gpt.train.hooks import LoopHook
from launch.backends.slurm import commands

log = logging.getLogger(__name__)
EVAL_TIME_MIN = 30
# the training job's own placement, which its evaluation jobs share (Slurm sets these in every job)
PLACEMENT = {"partition": "SLURM_JOB_PARTITION", "account": "SLURM_JOB_ACCOUNT", "qos": "SLURM_JOB_QOS"}


class EvalJobs(LoopHook):
    """Rank 0's hook: an evaluation job per committed checkpoint."""

    def __init__(self, run_dir: Path, cfg: EvalConfig):
        self.run_dir, self.cfg = run_dir, cfg

    def saved(self, step: int, path: Path) -> None:
        submit_eval_job(self.run_dir, step, self.cfg)


def after_save_hook(run, run_dir: Path) -> LoopHook | None:
    return EvalJobs(run_dir, run.eval) if run.eval.after_save == "job" else None


def submit_eval_job(run_dir: Path, step: int, cfg: EvalConfig, environ=os.environ) -> str | None:
    """The evaluation job of the checkpoint of `step`, submitted once whatever saves it again (a requeued attempt
    that saves the same step finds its claim). A submission that fails is logged and recorded, and training goes on.
    Returns the job's id (None: claimed earlier, or failed)."""
    record = RunFolder(run_dir).eval_job(step)
    record.parent.mkdir(exist_ok=True)
    (run_dir / "slurm").mkdir(exist_ok=True)  # its --output's folder: Slurm creates none
    if not claim(record):
        return None
    try:
        job_id = commands.run("sbatch", "--parsable", *eval_flags(run_dir, step, environ), "--wrap",
                              eval_command(run_dir, step, cfg)).strip().split(";")[0]
    except commands.SlurmUnavailable as e:
        log.warning("checkpoint of step %d: its evaluation job was not submitted (%s); training goes on", step, e)
        write_json(record, {"step": step, "error": str(e)})
        return None
    write_json(record, {"step": step, "job_id": job_id})
    log.info("checkpoint of step %d: evaluation job %s submitted (eval.after_save=job)", step, job_id)
    return job_id


def eval_flags(run_dir: Path, step: int, environ) -> list[str]:
    flags = [f"--job-name={run_dir.name}-eval-{step}", "--nodes=1", "--ntasks=1", f"--time={EVAL_TIME_MIN}",
             f"--output={run_dir / 'slurm' / f'eval-{step}-%j.out'}"]
    return flags + [f"--{flag}={environ[var]}" for flag, var in PLACEMENT.items() if environ.get(var)]


def eval_command(run_dir: Path, step: int, cfg: EvalConfig) -> str:
    """From the rank's folder and interpreter (the run's code snapshot, when it runs one: the job inherits the
    rank's environment), on CPU."""
    args = [sys.executable, "-m", "gpt.evaluate", str(run_dir), "--step", str(step), "--device", "cpu", "--record"]
    if cfg.tasks:
        args += ["--tasks", *cfg.tasks, "--limit", str(cfg.limit)]
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(args)}"
