"""Preemption: signal handlers only raise a flag; the training loop asks, at a step boundary (and between
evaluation batches), whether ANY rank saw a signal (an OR over all ranks, folded into the step's one small
all_reduce), so every rank stops at the same step and saves together. Then one rank requeues the Slurm job.

Kept light (no torch at import): the worker installs the handlers first thing, so a signal that arrives while
torch imports or the process group forms is not lost (and does not kill the rank).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from gpt.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR2")
EXIT_PREEMPTED = 3  # a rank saved a checkpoint after a signal and the job was not requeued: run again to resume


def parse_signals(names: Iterable[Any]) -> list[signal.Signals]:
    out = []
    for name in names:
        text = str(name).upper()
        text = text if text.startswith("SIG") else "SIG" + text
        signum = getattr(signal, text, None)
        if not isinstance(signum, signal.Signals) or signum in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError("preemption.signals", name, "signal names that can be caught, e.g. [SIGTERM, SIGUSR2]")
        out.append(signum)
    return out


class PreemptionFlag:
    """Installs handlers for `signals` that only record which signal came (the first one wins)."""

    _installed: "PreemptionFlag | None" = None

    def __init__(self, signals: Iterable[Any] = DEFAULT_SIGNALS):
        self.signals = parse_signals(signals)
        self.received: int | None = None
        for signum in self.signals:
            signal.signal(signum, self._handle)
        PreemptionFlag._installed = self

    @classmethod
    def installed(cls, signals: Iterable[Any] = DEFAULT_SIGNALS) -> "PreemptionFlag":
        """The process's flag: the one the worker installed early, re-pointed at `signals` (the config's)."""
        flag = cls._installed
        if flag is None:
            return cls(signals)
        wanted = parse_signals(signals)
        for signum in flag.signals:
            if signum not in wanted:
                signal.signal(signum, signal.SIG_DFL)
        for signum in wanted:
            signal.signal(signum, flag._handle)
        flag.signals = wanted
        return flag

    def _handle(self, signum: int, frame) -> None:
        # Nothing else here: a handler may run in the middle of a collective or a checkpoint write.
        if self.received is None:
            self.received = signum

    @property
    def raised(self) -> bool:
        return self.received is not None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def any_rank(self, device=None) -> bool:
        """True on every rank when any rank has received a signal. A collective: every rank must call it."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag)
        return bool(flag.item() > 0)


# --- Slurm ----------------------------------------------------------------------------------------------
def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or None


def restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _job_state(job_id: str) -> str | None:
    try:
        proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    for word in proc.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return None


def requeue(max_restarts: int) -> tuple[bool, str]:
    """Ask Slurm to run this job again (same job id). Returns (requeued, why not / how).

    Only while the job is RUNNING: a job that `scancel` cancelled, or that `scontrol requeue` from outside is
    already requeueing, is left to Slurm."""
    job = slurm_job_id()
    if job is None:
        return False, "not a Slurm job"
    restarts = restart_count()
    if restarts >= max_restarts:
        return False, f"restart limit reached ({restarts} of preemption.max_restarts={max_restarts})"
    state = _job_state(job)
    if state is not None and state != "RUNNING":
        return False, f"job {job} is {state}: Slurm decides what happens next"
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return False, "scontrol is not on PATH inside the job: cannot requeue (resubmit the same command to resume)"
    except subprocess.SubprocessError as e:
        return False, f"scontrol requeue {job} failed: {e}"
    if proc.returncode != 0:
        return False, f"scontrol requeue {job} failed: {proc.stderr.strip() or proc.stdout.strip()}"
    return True, f"requeued job {job} (restart {restarts + 1} of at most {max_restarts})"


def log_attempt(run_dir: Path, record: dict[str, Any]) -> None:
    """One line per attempt in RUN_DIR/attempts.jsonl (rank 0 writes it)."""
    record = {"job_id": slurm_job_id(), "restart": restart_count(), "time": time.time(), **record}
    with open(run_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
