"""Will the time limit leave room to train: what planning knows of an attempt's time (its start-up and its step,
measured in the run folder where an earlier attempt ran, else a prior for the start-up) and the steps left, handed
to the backend, which knows its time limit, its warning's lead and how early its scheduler may send it
(launch.backends.Backend.time_limit_lines). Each problem is one warning line that says what would work; a warning,
never a refusal: start-up and step times vary. Torch-free."""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from gpt.run_folder import RunFolder, read_metrics_lines
from launch.run.identity import newest_step

log = logging.getLogger(__name__)

PRIOR_STARTUP_S = 30.0  # an attempt's start-up to its first step, until the run has measured one
STEP_RECORDS = 50  # rank 0's newest train records a step time is the median of


@dataclass(frozen=True)
class AttemptTimes:
    startup_s: float
    startup_source: str  # "measured over N attempt(s)", or the prior
    step_s: float | None  # the median step time of the run's newest train records; None before it trained
    steps_left: int  # train.max_steps less the newest checkpoint's step


def attempt_times(run_dir: Path, max_steps: int) -> AttemptTimes:
    folder = RunFolder(run_dir)
    measured = [a.goodput["startup_s"] for a in folder.attempts.read()
                if a.goodput and isinstance(a.goodput.get("startup_s"), (int, float)) and a.goodput["startup_s"] > 0]
    steps = [r["step_time_s"] for r in read_metrics_lines(folder.metrics_file(0))
             if isinstance(r, dict) and r.get("kind") == "train" and isinstance(r.get("step_time_s"), (int, float))]
    steps = steps[-STEP_RECORDS:]
    startup = (statistics.median(measured), f"measured over {len(measured)} attempt(s)") if measured else \
        (PRIOR_STARTUP_S, "a prior until the run has started once")
    return AttemptTimes(*startup, statistics.median(steps) if steps else None,
                        max(max_steps - (newest_step(run_dir) or 0), 0))


def check_time_limit(run, run_dir: Path, backend) -> None:
    """Planning's time-limit check of `run` (a LaunchConfig) on `backend`: its lines logged as warnings. A run whose
    ranks do not save at a signal (preemption.enabled=false) is not checked: its time limit ends it."""
    if not run.preemption.enabled:
        return
    for line in backend.time_limit_lines(run, attempt_times(run_dir, run.train.max_steps)):
        log.warning("%s", line)
