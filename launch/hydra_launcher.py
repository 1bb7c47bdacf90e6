"""The work of hydra_plugins.gptlaunch_launcher: plan every sweep point, then run them.

1. Every point is composed and planned (launch.app.plan_run: config checks, Slurm checks against sinfo, data,
   the resolved config written to the point's run folder). Any bad point stops the sweep before anything runs.
2. Points that are jobs (cluster=slurm): the budget guard, then submission (launch.backends.<name>).
3. Points that run here (cluster=local, srun) run one after another, through the app's own task function.
4. The jobs are waited for; each point's JobReturn holds its result (job id, hosts, world size, summary), which is
   also its objective for a sweeper that chooses the next points from results (PointReturn).
5. The scaling report of the whole sweep is written into the sweep folder.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import OmegaConf, open_dict

from gpt.errors import EXIT_FAILED, EXIT_USER, UserError
from gpt.run_folder import RunFolder
from launch import hydra_errors
from launch.app import plan_run
from launch.backends import Queue
from launch.planning.planned_run import PlannedRun
from launch.planning.labels import point_labels
from launch.run import launch_lock

DEFAULT_SUBDIR = "${hydra.job.override_dirname}"  # configs/config.yaml; any other launcher uses it as it is

log = logging.getLogger(__name__)


class PointReturn(dict):
    """A sweep point's return value: its result (job id, hosts, summary...) and, as a float, its objective:
    launcher.objective, a value of its training summary. Hydra's Optuna sweeper reads `float(return_value)`."""

    def __init__(self, values: dict, objective: str):
        super().__init__(values)
        self.objective = objective

    def __float__(self) -> float:
        summary = self.get("summary") or {}
        if not isinstance(summary.get(self.objective), (int, float)):
            raise ValueError(f"launcher.objective={self.objective}: the run {self.get('run_dir')} has no such value "
                             f"in its summary (it has {', '.join(sorted(summary)) or 'none'})")
        return float(summary[self.objective])


def point_return(planned: PlannedRun, values: dict | None = None) -> PointReturn:
    """The point's result, with its summary from the run folder when the values carry none (a local run's)."""
    values = dict(values or {"run_dir": str(planned.plan.run_dir)})
    if values.get("summary") is None:
        values["summary"] = RunFolder(planned.plan.run_dir).read_summary()
    return PointReturn(values, planned.run.launcher.objective)


def _plan_task(cfg) -> PlannedRun | UserError:
    """A user's error comes back as the point's value (to be listed with the others); a bug raises."""
    try:
        return plan_run(cfg)
    except UserError as e:
        return e


def launch_sweep(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    hydra_errors.composed()
    setup_globals()
    config, context = launcher.config, launcher.hydra_context
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)

    # 1. plan every point (each holds its folder's launch lock until its job is submitted or its ranks end)
    points = _plan_points(config, context, job_overrides, initial_job_idx)
    try:
        _stop_on_bad_points(points)
    except SystemExit:
        launch_lock.release_all()  # nothing of this sweep runs: a caller that goes on (a search, a test) plans again
        raise

    planned: list[PlannedRun] = [ret.return_value for *_, ret in points]
    _check_objective(config, planned, detached_search=launcher.search is not None)
    returns: list[JobReturn | None] = [None] * len(points)
    for n, p in enumerate(planned):  # a run again: the points that finished before say so, and run no more
        if p.finished and p.backend.queue:
            print(f"{p.label} {p.existing.done()}; nothing to do", flush=True)
            points[n][3].status, returns[n] = JobStatus.COMPLETED, points[n][3]
            returns[n].return_value = point_return(p)
    jobs = [(n, p) for n, p in enumerate(planned) if p.backend.queue and not p.finished]

    # 2. budget and submission of every point that is a job, before anything else runs (a job from an earlier
    # launch that still waits or runs is picked up instead)
    submitted = []
    if jobs:
        queue = jobs[0][1].backend.queue
        submitted, snapshot = _submit([p for _, p in jobs], sweep_dir)
        if jobs[0][1].launcher.detach:
            return _detach(launcher, queue, sweep_dir, submitted, jobs, points, returns, snapshot)

    # 3. points that run here, one after another: one that fails is a failed point, and the others still run
    failed_here = _run_here(launcher, points, planned, returns)

    # 4. wait for the jobs
    if submitted:
        section = jobs[0][1].launcher
        _collect(queue.wait(submitted, section.poll_s, section.progress), jobs, points, returns,
                 stop=not chooses_from_results(config))

    # 5. the sweep's scaling report, from the run folders alone (`python -m launch.report DIR` rebuilds it)
    from launch.report import write_report

    report = write_report(sweep_dir)
    print(f"report: {report}\n  tensorboard --logdir {sweep_dir}", flush=True)
    if failed_here and not chooses_from_results(config):  # a sweeper that does records them as failed trials
        print(f"error: {len(failed_here)} of {len(points)} point(s) failed: {', '.join(failed_here)}; errors above",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_FAILED)
    return [r for r in returns if r is not None]


def _run_here(launcher: Any, points, planned: list[PlannedRun], returns: list) -> list[str]:
    """Run the points that are not jobs, through the app's task function, into `returns`; the labels of those whose
    run failed (exit 1). A user's error or Ctrl-C (exit 2) stops the sweep, as it stops a single run."""
    config, failed = launcher.config, []
    for n, (idx, _, sweep_config, ret) in enumerate(points):
        if planned[n].backend.queue:
            continue
        log.info("#%d : %s", idx, planned[n].label)
        try:
            returns[n] = run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function,
                                 config=sweep_config, job_dir_key="hydra.sweep.dir",
                                 job_subdir_key="hydra.sweep.subdir")
        except SystemExit as e:
            if e.code != EXIT_FAILED:
                raise
            ret.return_value, ret.status = point_return(planned[n]), JobStatus.FAILED
            returns[n] = ret
            failed.append(planned[n].label)
        else:
            if returns[n].status == JobStatus.COMPLETED:  # a failed one raises its error where it is read
                returns[n].return_value = point_return(planned[n])
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return failed


def _submit(jobs: list[PlannedRun], sweep_dir: Path) -> tuple[list, Any]:
    """Every point that is a job submitted (or its live job picked up): (submitted, the code snapshot)."""
    backend = jobs[0].backend
    if any(p.backend.name != backend.name for p in jobs):
        print("error: the points of one sweep must use one cluster backend", file=sys.stderr)
        sys.exit(EXIT_USER)
    try:
        return backend.queue.submit_all(jobs, sweep_dir / backend.name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER)
    finally:
        for p in jobs:  # each point's job submitted: the next launch may look at its folder
            launch_lock.release(p.plan.run_dir)


def _plan_points(config: Any, context: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
    """(index, overrides, config, Hydra's return holding the point's PlannedRun) for each point, planned in order."""
    points = []
    # Left at its default, each point's folder is named by the keys that vary across the sweep.
    labels = point_labels(job_overrides, swept_keys(config)) if _default_subdir(config) else None
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        if labels and chooses_from_results(config):  # its trials may repeat a point: each is a run of its own
            labels[i] = ",".join(x for x in (f"trial={idx}", labels[i]) if x)
        sweep_config = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
            if labels:  # a one-point sweep keeps the name a node sweep would give it
                sweep_config.hydra.sweep.subdir = labels[i] or f"nodes={sweep_config.nodes}"
        ret = run_job(hydra_context=context, task_function=_plan_task, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        points.append((idx, overrides, sweep_config, ret))
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return points


def swept_keys(config: Any) -> list[str]:
    """The keys the command line or the sweeper's params sweep: they name every point, also where a sweeper that
    chooses points from results (hydra/sweeper=optuna) launches them one batch, or one point, at a time."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    params = config.hydra.sweeper.get("params") or {}
    return list(dict.fromkeys([o.key_or_group for o in task if o.is_sweep_override()] + list(params)))


def _collect(outcomes, jobs, points, returns, stop: bool) -> None:
    """Each job's outcome as its point's JobReturn; exit 1 naming the failed jobs, unless the sweeper goes on
    without them (`stop` false: it records each failed point as a failed trial); or, silently, when a point stopped
    (the waiter said how and how the same command continues it: the exit is a single run's, launch.status's)."""
    failed, stopped = [], False
    for (n, planned), outcome in zip(jobs, outcomes):
        ret = points[n][3]
        ret.return_value = point_return(planned, outcome.result)
        ret.status = JobStatus.COMPLETED if outcome.ok or outcome.cancelled else JobStatus.FAILED
        returns[n] = ret
        stopped = stopped or outcome.stopped is not None
        if not outcome.ok and not outcome.cancelled and outcome.stopped is None:  # a cancel, a stop: no failure
            failed.append(outcome)
    if not stop:
        return
    if failed:
        ids = ", ".join(f"{o.submitted.job_id} ({o.submitted.point.label})" for o in failed)
        print(f"error: {len(failed)} of {len(outcomes)} job(s) failed: {ids}; errors and logs above",
              file=sys.stderr, flush=True)
    if failed or stopped:
        sys.exit(EXIT_FAILED)


def _detach(launcher: Any, queue: Queue, sweep_dir: Path, submitted, jobs, points, returns,
            snapshot) -> list[JobReturn]:
    """Return once the scheduler accepted every job: a dependency job builds the report after them, or, for a
    detached search, goes on with the search (and builds the report after each batch)."""
    # packed points (hydra.launcher.pack) share their job: each id once
    ids = list(dict.fromkeys(s.job_id for s in submitted))
    all_ids = list(dict.fromkeys(j for s in submitted for j in s.job_ids))
    if launcher.search:
        launcher.search_job = queue.submit_search(sweep_dir, ids, jobs[0][1].resources, snapshot, *launcher.search)
        queue.print_follow_up(sweep_dir, all_ids)
        print(f"search: job {launcher.search_job} goes on with the search once they have ended (its log: "
              f"{sweep_dir / 'slurm' / f'search-{launcher.search_job}.out'}); launch.cancel cancels it too",
              flush=True)
    else:
        queue.print_follow_up(sweep_dir, all_ids, queue.submit_report(sweep_dir, ids, jobs[0][1].resources, snapshot))
    for (n, _), s in zip(jobs, submitted):
        ret = points[n][3]
        ret.return_value, ret.status = {"job_id": s.job_id, "run_dir": str(s.point.run_dir)}, JobStatus.COMPLETED
        returns[n] = ret
    return [r for r in returns if r is not None]


def chooses_from_results(config: Any) -> bool:
    """A sweeper other than Hydra's grid (Optuna, Nevergrad, Ax): it chooses the next points from the results."""
    return not str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper")


def _check_objective(config: Any, planned: list[PlannedRun], detached_search: bool) -> None:
    """Such a sweeper needs every point's objective when the point returns (unless a job of its own goes on with a
    detached search). One line, before anything runs."""
    if not chooses_from_results(config):
        return
    if str(config.hydra.sweeper._target_).startswith("hydra_plugins.hydra_optuna_sweeper."):
        print("error: hydra/sweeper=optuna is hydra-optuna-sweeper's here, which needs optuna<3: "
              "`pip uninstall hydra-optuna-sweeper` leaves gptlaunch's (hydra_plugins/gptlaunch_optuna)",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_USER)
    for p in planned:
        run = p.run
        why = ("hydra.launcher.detach=true returns before any point has a result"
               if p.launcher.detach and not detached_search else
               "the runs never evaluate (train.eval_interval=0)"
               if run.launcher.objective == "val_loss" and not run.train.eval_interval else None)
        if why:
            print(f"error: {config.hydra.sweeper._target_} chooses points from their launcher.objective="
                  f"{run.launcher.objective}, and {why}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER)


def _default_subdir(config) -> bool:
    return OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") == DEFAULT_SUBDIR


def _stop_on_bad_points(points) -> None:
    """A sweep runs whole or not at all: one line per bad point, then exit 2 (a bug keeps its traceback)."""
    bad = []
    run_dirs: dict[str, str] = {}
    for idx, overrides, _, ret in points:
        label = " ".join(filter_overrides(overrides)) or f"#{idx}"
        value = ret.return_value  # raises a bug's exception as it was
        if isinstance(value, UserError):
            bad.append(f"sweep point #{idx} ({label}): {value}")
            continue
        run_dir = str(value.plan.run_dir)
        if run_dir in run_dirs:
            bad.append(f"sweep points {run_dirs[run_dir]} and #{idx} ({label}) would share the run folder {run_dir}: "
                       "name each point's folder, e.g. hydra.sweep.subdir='${hydra.job.override_dirname}'")
        run_dirs.setdefault(run_dir, f"#{idx} ({label})")
    if bad:
        for line in bad:
            print(f"error: {line}", file=sys.stderr)
        print(f"error: nothing was submitted or run ({len(bad)} of {len(points)} sweep point(s) are not valid)",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_USER)
