"""Where an attempt's start-up time goes, from the moment its batch script (or the local launcher) started to
its first training step. Each phase is the gap between two marks; rank 0 writes them to attempts.jsonl.

    scheduler_s        the previous attempt's last record -> this attempt's start (a requeue: the scheduler's
                       completing and pending time; absent on a first attempt)
    launcher_s         attempt start -> this rank's interpreter runs the worker (planning, srun, submitit)
    imports_s          the worker's imports (torch, gptlaunch)
    rendezvous_s       process group joined and the preflight all-reduce done
    health_s           the run folder's lease taken and the node health checks done (launch.recovery.health_gate)
    model_s, data_s, checkpoint_load_s, first_step_s    measured by the trainer
    kernel_check_s, build_s, setup_s    inside model_s: the attention kernel's check, the model built (its weights
                       initialised or loaded, float8, the strategy made), the strategy's setup (the layout's
                       wrappers, compile's, the optimizer); on a GPU each as the host saw it (its kernels may finish
                       later)
    compile_s          inside first_step_s: torch.compile's time (train.compile), with compile_cache_hits and
                       compile_cache_misses, Inductor's cache lookups (gpt.train.compile_cache)
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from gpt.run_folder import RunFolder
from launch.rank.job_env import job_environment

ATTEMPT_START = "GPTLAUNCH_ATTEMPT_START"  # epoch seconds; set by whoever starts an attempt
# a token srun passes to the ranks of one step: their environment records say which step wrote them
STEP_TOKEN = "GPTLAUNCH_STEP"
PHASES = ("scheduler_s", "launcher_s", "imports_s", "rendezvous_s", "health_s", "model_s", "data_s",
          "checkpoint_load_s", "first_step_s")
COMPILE = ("compile_s", "compile_cache_hits", "compile_cache_misses")  # parts of first_step_s, not phases of their own
MODEL_PARTS = ("kernel_check_s", "build_s", "setup_s")  # parts of model_s


def attempt_start_env() -> dict[str, str]:
    return {ATTEMPT_START: f"{time.time():.3f}"}


def previous_attempt_end(run_dir: Path) -> float | None:
    """When the attempt before this one wrote its last line, if this attempt is a requeue of the same job."""
    attempts = RunFolder(run_dir).attempts.read()
    if not attempts:
        return None
    last = attempts[-1]
    job = job_environment()  # an array task's id as its attempts record it
    if job.job_id is None or job.restart == 0 or last.job_id != job.job_id:
        return None
    return last.time


class StartupClock:
    """Marks taken in a rank as it starts; `breakdown()` turns them and the trainer's phases into seconds."""

    def __init__(self, run_dir: Path, process_start: float):
        start = os.environ.get(ATTEMPT_START)
        self.attempt_start = float(start) if start and start.replace(".", "", 1).isdigit() else None  # else not ours
        self.previous_end = previous_attempt_end(run_dir)
        self.process_start = process_start
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def breakdown(self, trainer_phases: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.attempt_start is not None:
            if self.previous_end is not None:
                out["scheduler_s"] = self.attempt_start - self.previous_end
            out["launcher_s"] = self.process_start - self.attempt_start
        out["imports_s"] = self.marks["imported"] - self.process_start
        if "rendezvous" in self.marks:
            out["rendezvous_s"] = self.marks["rendezvous"] - self.marks["imported"]
        if "health" in self.marks and "rendezvous" in self.marks:
            out["health_s"] = self.marks["health"] - self.marks["rendezvous"]
        out.update({k: v for k, v in trainer_phases.items() if k in PHASES or k in COMPILE or k in MODEL_PARTS})
        first = trainer_phases.get("first_step_at")
        if first is not None:
            out["to_first_step_s"] = first - (self.attempt_start or self.process_start)
        return {k: round(v, 3) for k, v in out.items()}

    @staticmethod
    def describe(breakdown: dict[str, float]) -> str:
        """The phases inside the total; a requeue's wait in the scheduler came before the attempt started, after."""
        inside = [k for k in PHASES if k in breakdown and k != "scheduler_s"]
        parts = [f"{k[:-2].replace('_', ' ')} {breakdown[k]:.1f}" for k in inside]
        total = breakdown.get("to_first_step_s")
        head = f"start-up {total:.1f} s to the first step" if total is not None else "start-up"
        waited = breakdown.get("scheduler_s")
        after = f", after {waited:.1f} s in the scheduler since the previous attempt" if waited is not None else ""
        model = ", ".join(f"{k[:-2].replace('_', ' ')} {breakdown[k]:.1f}" for k in MODEL_PARTS if k in breakdown)
        model = f"; the model's: {model}" if model else ""
        return f"{head} ({', '.join(parts)}){after}{model}{StartupClock.describe_compile(breakdown)}"

    @staticmethod
    def describe_compile(breakdown: dict[str, float]) -> str:
        if "compile_s" not in breakdown:
            return ""
        hits, misses = int(breakdown.get("compile_cache_hits", 0)), int(breakdown.get("compile_cache_misses", 0))
        return (f"; compiling took {breakdown['compile_s']:.1f} s of the first step (compile cache: {hits} hits, "
                f"{misses} misses)")
