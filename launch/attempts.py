"""RUN_DIR/attempts.jsonl: one line per attempt of a run (rank 0 writes it when the attempt ends), with its
start-up breakdown and its goodput record (gpt.goodput).

RUN_DIR/attempt.json marks the attempt in flight (job id, restart, start time) and is removed when its line is
written. An attempt killed outright (kill -9, a lost node, the time limit) writes no line: the next one finds the
mark, asks the scheduler how that job ended, and writes the line for it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gpt.goodput import kept_training_s, read_attempts
from launch.job_env import JobEnvironment


def log_attempt(run_dir: Path, job: JobEnvironment, record: dict[str, Any]) -> None:
    record = {"job_id": job.job_id, "restart": job.restart, "time": time.time(), **record}
    with open(run_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def requeued(run_dir: Path, job: JobEnvironment) -> bool:
    """Whether this attempt of this job ended by requeueing itself (its line in attempts.jsonl says so)."""
    line = this_attempts_line(run_dir, job)
    return bool(line and line.get("requeued"))


def goodput_record(run_dir: Path, started: float, startup: dict[str, float], summary: dict[str, Any]) -> dict:
    """Where this attempt's allocated time went; `started` is when the attempt began (epoch seconds)."""
    earlier = read_attempts(run_dir)
    last = earlier[-1].get("last_step") if earlier else None
    replayed = max(last - summary["first_step"], 0) if isinstance(last, int) else 0
    # start-up ends where the first step begins: that step is training time
    to_first = startup.get("to_first_step_s", 0.0) - startup.get("first_step_s", 0.0)
    return {"allocated_s": round(time.time() - started, 3), "startup_s": round(max(to_first, 0.0), 3),
            "load_s": startup.get("checkpoint_load_s", 0.0), "steps_replayed": replayed, **summary.get("spent", {})}


IN_FLIGHT = "attempt.json"


def begin_attempt(run_dir: Path, job: JobEnvironment, started: float, first_step: int) -> None:
    """Rank 0, before the first step: record the attempt before it (if it left no line), then mark this one."""
    previous = read_mark(run_dir)
    if previous is not None:
        how = job.end_reason(previous.get("job_id")) if previous.get("job_id") else "killed outright"
        log_killed(run_dir, previous, first_step, {"ended": how, "recorded_by": "the next attempt"})
    (run_dir / IN_FLIGHT).write_text(json.dumps({"job_id": job.job_id, "restart": job.restart,
                                                 "started": started, "first_step": first_step}))


def read_mark(run_dir: Path) -> dict[str, Any] | None:
    """The mark of the attempt in flight (or of one that ended without a line)."""
    try:
        return json.loads((run_dir / IN_FLIGHT).read_text())
    except (OSError, ValueError):
        return None


def max_restarts(cfg) -> int:
    """How many times a run's job may requeue itself (preemption.max_restarts; 10 when the config has none)."""
    from omegaconf import OmegaConf

    return int(OmegaConf.select(cfg, "preemption.max_restarts", default=10))


def log_killed(run_dir: Path, mark: dict[str, Any], resumes_from: int, record: dict[str, Any]) -> None:
    """The line of an attempt that ended without writing one (its `mark`), with the training it kept: its steps
    up to the checkpoint the run resumes from."""
    last_alive = _heartbeat(run_dir) or mark["started"]
    began = mark.get("first_step") or 0
    log_attempt(run_dir, JobRecord(mark.get("job_id"), mark.get("restart", 0)), {
        "first_step": began, "last_step": resumes_from, **record,
        "goodput": {"allocated_s": round(max(last_alive - mark["started"], 0.0), 3), "startup_s": 0.0,
                    "train_s": kept_training_s(run_dir, mark["started"], began, resumes_from),
                    "eval_s": 0.0, "save_s": 0.0, "steps": max(resumes_from - began, 0), "saves": 0}})


def this_attempts_line(run_dir: Path, job: JobEnvironment) -> dict[str, Any] | None:
    """The line this attempt of this job has written already (a rank's task recorded it vanishing), if any."""
    if job.job_id is None:
        return None
    mine = [a for a in read_attempts(run_dir) if a.get("job_id") == job.job_id and a.get("restart") == job.restart]
    return mine[-1] if mine else None


def end_attempt(run_dir: Path) -> None:
    (run_dir / IN_FLIGHT).unlink(missing_ok=True)


def _heartbeat(run_dir: Path) -> float | None:
    try:
        return float(json.loads((run_dir / "lock.json").read_text())["heartbeat"])
    except (OSError, ValueError, KeyError):
        return None


class JobRecord(JobEnvironment):
    """A past attempt's job, as its mark recorded it."""

    def __init__(self, job_id: str | None, restart: int):
        super().__init__({})
        self._job_id, self._restart = job_id, restart

    @property
    def job_id(self) -> str | None:
        return self._job_id

    @property
    def restart(self) -> int:
        return self._restart
