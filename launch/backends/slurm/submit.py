"""Submitting planned cluster=slurm points: the budget guard, one submitit executor per group of points with equal
resources (a job array when the group has several), and job ids and log paths as they are submitted. Waiting for
them is launch.backends.slurm.wait."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.backends.cluster_config import BudgetConfig
from gpt.errors import UserError, error_line
from gpt.run_folder import RunFolder, write_json
from launch.backends import Point
from launch.backends.slurm import chain
from launch.backends.slurm import commands as slurm_commands
from launch.backends.slurm.resources import make_executor
from launch.backends.slurm.step import workdir
from launch.backends.slurm.task import RankTask
from launch.planning.budget import PointCost, check_budget, table

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Submitted:
    point: Point
    job_id: str
    folder: Path
    links: tuple[str, ...] = ()  # a chain's jobs, oldest first (cluster.chain); job_id is the last one
    packed: bool = False  # a step of a packed allocation (hydra.launcher.pack), whose one task reports every point

    @property
    def job_ids(self) -> tuple[str, ...]:
        return self.links or (self.job_id,)

    def paths(self, task: int = 0):
        from submitit.core.utils import JobPaths

        return JobPaths(self.folder, job_id=self.job_id, task_id=task)

    @property
    def num_tasks(self) -> int:
        """The tasks srun starts, each with its result file: a spare node's too (it may be the one that says why
        the job ended)."""
        r = self.point.resources
        return 1 if self.packed else r.allocated_nodes * r.tasks_per_node


def budget_gate(points: list[Point], budget: BudgetConfig, out=sys.stdout) -> None:
    """Print what the sweep may cost; refuse above the limit (before anything is submitted)."""
    costs = [PointCost(p.label, p.resources, p.resources.restarts) for p in points]
    print(table(costs, budget.max_node_hours, budget.applies_to), file=out, flush=True)
    check_budget(costs, budget.max_node_hours, budget.applies_to)


def submit(points: list[Point], folder: Path, out=sys.stdout) -> list[Submitted]:
    """One executor per group of points with equal resources; one job (or one job array) per group. If Slurm
    refuses a group, the jobs already submitted are cancelled: a sweep starts whole or not at all."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault((p.resources, p.job_name), []).append(p)
    submitted: list[Submitted] = []
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for (resources, job_name), group in groups.items():
            here = workdir()
            # the container (if any) sees the submit folder, the run folders with their checkpoints, and the logs
            mounted = resources.mounting(here, folder, *(p.run_dir for p in group))
            for p, links in zip(group, submit_group(mounted, job_name, group, folder, here)):
                s = Submitted(p, links[-1], folder, tuple(links) if len(links) > 1 else ())
                submitted.append(s)
                paths = s.paths(0)
                chained = {"chain": links} if len(links) > 1 else {}
                write_json(RunFolder(p.run_dir).slurm_job, {
                    "job_id": s.job_id, **chained, "stdout": str(paths.stdout), "stderr": str(paths.stderr),
                    "submission": str(paths.submission_file), "resources": resources.describe(),
                    "inherited": inherited_rank_variables(dict(resources.step.env))}, indent=1)
                jobs = f"jobs {' '.join(links)} (one after another)" if len(links) > 1 else f"job {s.job_id}"
                print(f"submitted {jobs} for {p.label}: {resources.describe()}; log: {show_path(paths.stdout)}",
                      file=out, flush=True)
    except KeyboardInterrupt:
        slurm_commands.cancel([s.job_id for s in submitted])
        raise UserError(f"interrupted while submitting; cancelled the {len(submitted)} job(s) already submitted"
                        f"{': ' + ' '.join(s.job_id for s in submitted) if submitted else ''}") from None
    except Exception as e:
        slurm_commands.cancel([s.job_id for s in submitted])
        done = f"; cancelled the {len(submitted)} job(s) already submitted" if submitted else ""
        raise UserError(f"Slurm refused a job of this sweep: {error_line(e, prefer_error=True)}{done}") from None
    return submitted


def submit_group(resources, job_name: str, group: list[Point], folder: Path, here: Path) -> list[list[str]]:
    """Each point's job ids: one job, a job array for several points, or a chain of links per point."""
    if resources.chain > 1:
        return [[job.job_id for job in chain.submit_links(
            make_executor(resources, folder, chain.job_name(job_name, p.run_dir), here), RankTask(str(p.run_dir)),
            resources.chain)] for p in group]
    executor = make_executor(resources, folder, job_name, here)
    if len(group) == 1:
        return [[executor.submit(RankTask(str(group[0].run_dir))).job_id]]
    with executor.batch():
        jobs = [executor.submit(RankTask(str(p.run_dir))) for p in group]
    return [[job.job_id] for job in jobs]


def inherited_rank_variables(site_env: dict[str, str]) -> dict[str, str]:
    """torchrun-style variables of this (submitting) shell: sbatch passes them into the job, where Slurm's own
    must decide instead (launch.backends.slurm.task drops them). Not those the site sets (cluster.env: a
    MASTER_ADDR or MASTER_PORT the site needs)."""
    return {k: os.environ[k] for k in RANK_VARIABLES if k in os.environ and k not in site_env}


def show_path(path: Path) -> str:
    """A path as the user typed it: relative to where they are when that is shorter."""
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else str(path)
    except ValueError:
        return str(path)
