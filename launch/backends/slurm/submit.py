"""Submitting a planned run's or sweep's cluster=slurm jobs, for `python -m launch` and the sweep launcher alike.
Points whose job from an earlier launch still waits or runs are picked up, not submitted again (a launcher that was
killed loses nothing: the same command waits for them); the others pass the budget guard, get a code snapshot
(launch.snapshot) and their data preparation jobs, and are submitted: one submitit executor per group of points
with equal resources (a job array when the group has several), or packed (launch.backends.slurm.pack). Waiting for
them is launch.backends.slurm.wait. Torch-free."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from gpt.errors import UserError, error_line
from gpt.run_folder import RunFolder
from launch.backends import Point
from launch.backends.cluster_config import BudgetConfig
from launch.backends.slurm import chain, commands, pack
from launch.backends.slurm.commands import PENDING, RUNNING
from launch.backends.slurm.prepare_job import PreparationJob, preparation_resources, submit_preparation
from launch.backends.slurm.resources import make_executor
from launch.backends.slurm.script_jobs import script_job
from launch.backends.slurm.step import workdir
from launch.backends.slurm.submitted import Submitted, show_path
from launch.backends.slurm.task import RankTask
from launch.planning.budget import PointCost, check_budget, table
from launch.planning.planned_run import PlannedRun
from launch.run_status import job_ids
from launch.snapshot import Snapshot, record_in, take, with_snapshot


def live_job(run_dir: Path) -> str | None:
    """The newest of the run folder's jobs that Slurm still runs or keeps pending, if any: the same command waits
    for it instead of submitting again. Refused when it is held or suspended: it would not go on by itself.
    SlurmUnavailable when Slurm does not answer: an outage is not "no job" (a second job would train the run twice)."""
    ids = list(job_ids(run_dir))
    infos = commands.job_infos(ids) if ids else {}
    live = [infos[j] for j in ids if j in infos and (infos[j].state in PENDING or infos[j].state in RUNNING)]
    if not live:
        refuse_script_job(run_dir, tuple(ids))
        return None
    job = live[-1]
    if job.state == "SUSPENDED":
        unstick = f"resume it (scontrol resume {job.job_id})"
    elif job.reason.startswith("JobHeld"):
        unstick = f"release it (scontrol release {job.job_id})"
    else:
        return job.job_id
    held = f" and held ({job.reason})" if job.reason.startswith("JobHeld") else ""
    raise UserError(f"the run folder {run_dir} belongs to job {job.job_id}, which is {job.state}{held}: {unstick} "
                    f"and it continues this run, or cancel it (scancel {job.job_id}) and run this command again")


def refuse_script_job(run_dir: Path, known: tuple[str, ...]) -> None:
    """A job submitted with sbatch slurm/multi_node.sh for this run folder waits, is held or runs: it continues the
    run when it runs, and a second job would train it twice."""
    job = script_job(run_dir, known)
    if job is not None:
        raise UserError(f"the run folder {run_dir} belongs to job {job.job_id} (sbatch {job.command[0]}), which is "
                        f"{job.state}: it continues this run when it runs. Wait for it (squeue -j {job.job_id}), or "
                        f"cancel it (scancel {job.job_id}) and run this command again")


def submit_jobs(planned: list[PlannedRun], folder: Path, out=sys.stdout) -> tuple[list[Submitted], Snapshot | None]:
    """Every point's job, in the points' order: picked up when it is live, else submitted (one snapshot for all)."""
    fresh = [p for p in planned if p.live_job is None]
    snapshot = None
    submitted: dict[int, Submitted] = {}
    if fresh:
        points = [p.point() for p in fresh]
        for point in points:  # a folder no container can mount, or Slurm would misname, is refused before anything
            point.resources.mounting(workdir(), folder, point.run_dir)  # is queued
            no_filename_pattern(folder, point.run_dir)
        launcher = fresh[0].launcher
        node = pack.smallest_node(points[0].resources) if launcher.pack else None
        if node is not None:  # the plan, and the budget of its allocations
            pack.print_plan(pack.plan(points, node, launcher.pack_nodes), out)
        billed = points if node is None else [k.budget_point() for k in pack.plan(points, node, launcher.pack_nodes)]
        # a refused sweep leaves no snapshot behind; its data preparation jobs are part of its cost
        budget_gate([*preparation_points(fresh), *billed], fresh[0].budget)
        if fresh[0].launcher.snapshot:
            snapshot = take(folder)
            points = [with_snapshot(point, snapshot) for point in points]
            for p in fresh:
                record_in(p.plan.run_dir, snapshot)
            dirty = ", with uncommitted changes" if snapshot.dirty else ""
            print(f"code snapshot: {snapshot.path} (commit {snapshot.commit or 'none: not a git checkout'}{dirty})",
                  file=out, flush=True)
        preparations = prepare_first(fresh, folder, out)
        points = [preparations[p.label].gate(point) if p.label in preparations else point
                  for p, point in zip(fresh, points)]
        jobs = submit(points, folder) if node is None else pack.submit(pack.plan(points, node, launcher.pack_nodes),
                                                                         folder, out)
        by_dir = {s.point.run_dir: s for s in jobs}  # submitted group by group: in another order than the points
        for p in fresh:
            submitted[id(p)] = by_dir[p.plan.run_dir]
        if not fresh[0].launcher.detach:  # detached, Slurm cancels the training jobs if a preparation fails
            for job in {j.job_id: j for j in preparations.values()}.values():
                job.wait([submitted[id(p)].job_id for p in fresh if preparations.get(p.label) == job])
    for p in planned:
        if p.live_job is not None:
            submitted[id(p)] = adopt(p)
            then = "" if p.launcher.detach else "; waiting for it"
            print(f"{p.label}: job {p.live_job}, submitted earlier, still runs or waits{then}", file=out, flush=True)
    return [submitted[id(p)] for p in planned], snapshot


def no_filename_pattern(*folders: Path) -> None:
    """sbatch reads a '%' in --output and --error as a filename pattern (%j, %x, ...), and submitit puts the job's id
    in place of %j in its folder: the job's logs would go elsewhere than the launcher and launch.logs look."""
    for f in folders:
        if "%" in str(f):
            raise UserError(f"{f} has a '%', which Slurm reads in the job's log paths as a filename pattern (%j, %x, "
                            "...): choose a folder without one (run=NAME, hydra.run.dir or hydra.sweep.dir)")


def preparation_points(fresh: list[PlannedRun]) -> list[Point]:
    """The data preparation jobs that prepare_first would submit, as points of the budget (one per data.dir)."""
    by_dir = {p.plan.prepare_job.dir: p for p in fresh if p.plan.prepare_job is not None}
    return [Point(f"data preparation of {Path(d).name}", p.plan.run_dir, p.run.name,
                  preparation_resources(p.plan.prepare_job, p.resources)) for d, p in by_dir.items()]


def prepare_first(fresh: list[PlannedRun], folder: Path, out=sys.stdout) -> dict[str, PreparationJob]:
    """Each point's data preparation job (data.prepare_on=job), by the point's label: one per data.dir."""
    jobs: dict[str, PreparationJob] = {}
    by_dir: dict[str, PreparationJob] = {}
    for p in fresh:
        data = p.plan.prepare_job
        if data is not None:
            if data.dir not in by_dir:
                by_dir[data.dir] = submit_preparation(data, p.resources, p.run.name, folder, out)
            jobs[p.label] = by_dir[data.dir]
    return jobs


def adopt(p: PlannedRun) -> Submitted:
    record = json.loads(RunFolder(p.plan.run_dir).slurm_job.read_text())
    return Submitted(p.point(), p.live_job, Path(record["stdout"]).parent, packed=record.get("packed", False))


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
                s.record(resources)
                jobs = f"jobs {' '.join(links)} (one after another)" if len(links) > 1 else f"job {s.job_id}"
                print(f"submitted {jobs} for {p.label}: {resources.describe()}; log: {show_path(s.paths(0).stdout)}",
                      file=out, flush=True)
    except KeyboardInterrupt:
        commands.cancel([s.job_id for s in submitted])
        raise UserError(f"interrupted while submitting; cancelled the {len(submitted)} job(s) already submitted"
                        f"{': ' + ' '.join(s.job_id for s in submitted) if submitted else ''}") from None
    except Exception as e:
        commands.cancel([s.job_id for s in submitted])
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
