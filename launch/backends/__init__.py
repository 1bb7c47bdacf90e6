"""Backends: how a planned point becomes processes. Each is one module (or package) behind `Backend`, named
by `cluster.name` (configs/cluster/<name>.yaml). Kept light: a Slurm task imports this package first thing.

A backend either runs a point here and waits for it (local, srun), or submits it as a job to a scheduler
(slurm). What a new one (PBS, LSF, ...) implements is written in docs/backends.md.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.config.schema import RunConfig
from gpt.errors import ConfigError, UserError

REGISTRY = {  # cluster.name -> "module:class"
    "local": "launch.backends.local:LocalBackend",
    "srun": "launch.backends.srun:SrunBackend",
    "slurm": "launch.backends.slurm.backend:SlurmBackend",
}


class RunFailed(UserError):
    """The run was planned and started, and failed (exit code 1, not 2)."""


@dataclass
class Point:
    """A planned sweep point that a submitting backend turns into a job."""

    label: str  # e.g. "nodes=2"
    run_dir: Path
    job_name: str
    resources: Any  # the backend's own request, from Backend.check


class Backend:
    """The interface. `check` runs before anything starts; then `run` (here) or `submit` + `wait` (jobs)."""

    name = "?"
    submits = False  # True: every point is a job of a scheduler, submitted from here

    def check(self, run: RunConfig) -> tuple[RunConfig, Any]:
        """Validate what can be checked without running anything, against the real cluster if there is
        one. Returns the run's config (resolved where the backend fills values in) and the resources a submitted
        job asks for (None for backends that run here)."""
        return run, None

    def run(self, plan) -> None:
        """Run one planned point here and return when it has finished (backends that do not submit)."""
        raise NotImplementedError

    def budget_gate(self, points: list, budget) -> None:
        """Show what the points may cost; refuse it above budget, before anything is written or submitted."""
        raise NotImplementedError

    def submit(self, points: list, folder) -> list:
        """Submit every point; nothing is left half-submitted."""
        raise NotImplementedError

    def wait(self, submitted: list, poll_s: float, progress: bool) -> list:
        """Wait for the submitted jobs, reporting each as it ends; returns their outcomes in order."""
        raise NotImplementedError

    def job_state(self, job_id: str) -> str | None:
        """That job's state as this backend's scheduler says it (launch.backends.slurm.commands: a state word or
        GONE; None: it cannot tell, and a run folder's lease goes by its beat)."""
        return None


def get_backend(name: object) -> Backend:
    if name not in REGISTRY:
        raise ConfigError("cluster.name", name, f"one of {', '.join(REGISTRY)} (cluster=local|slurm|srun)")
    module, cls = REGISTRY[str(name)].split(":")
    return getattr(importlib.import_module(module), cls)()

