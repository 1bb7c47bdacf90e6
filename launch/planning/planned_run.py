"""A run checked and planned on the login node, before any process starts or job is submitted."""
from __future__ import annotations

from dataclasses import dataclass

from launch.backends.cluster_config import BudgetConfig
from launch.launch_config import LaunchConfig
from launch.launcher_section import LauncherSection
from launch.backends import Backend, Point
from launch.planning.plan import Plan
from launch.run.identity import Existing


@dataclass
class PlannedRun:
    """A validated, planned run: its resolved config is in plan.run_dir, nothing runs yet."""

    run: LaunchConfig
    plan: Plan
    backend: Backend
    launcher: LauncherSection  # how this launch submits and waits (hydra.launcher)
    resources: object | None = None  # what a submitting backend's job asks for
    budget: BudgetConfig | None = None  # what a submitting backend's jobs may cost
    existing: Existing | None = None  # what the run folder already holds (None: a new run)
    live_job: str | None = None  # its job from an earlier launch, still pending or running: waited for, not resubmitted

    @property
    def finished(self) -> bool:
        return self.existing is not None and self.existing.finished

    @property
    def label(self) -> str:
        return self.plan.run_dir.name

    def point(self) -> Point:
        return Point(self.label, self.plan.run_dir, self.run.name, self.resources)
