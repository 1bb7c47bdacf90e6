"""The work of hydra_plugins.gptlaunch_launcher: plan every sweep point, then run them.

1. Every point is composed and planned (launch.app.prepare: config checks, Slurm checks against sinfo, data,
   the resolved config written to the point's run folder). Any bad point stops the sweep before anything runs.
2. cluster=slurm points: the budget guard, then one executor per group of equal resources (launch.sweep).
3. Other points (cluster=local, srun) run one after another here, through the app's own task function.
4. The Slurm jobs are waited for; each point's JobReturn holds its result (job id, hosts, world size, summary).
5. The scaling report of the whole sweep is written into the sweep folder.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import OmegaConf, open_dict

from gpt.errors import UserError
from launch.app import Prepared, prepare
from launch.point_label import point_labels

DEFAULT_SUBDIR = "${hydra.job.override_dirname}"  # configs/config.yaml; any other launcher uses it as it is

log = logging.getLogger(__name__)


def _prepare_task(cfg) -> Prepared:
    return prepare(cfg)


def launch_sweep(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    setup_globals()
    config, context = launcher.config, launcher.hydra_context
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)

    # 1. plan every point
    points = []
    # Left at its default, each point's folder is named by the keys that vary across the sweep.
    labels = point_labels(job_overrides) if _default_subdir(config) else None
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        sweep_config = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
            if labels:  # a one-point sweep keeps the name a node sweep would give it
                sweep_config.hydra.sweep.subdir = labels[i] or f"nodes={sweep_config.nodes}"
        ret = run_job(hydra_context=context, task_function=_prepare_task, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        points.append((idx, overrides, sweep_config, ret))
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    _stop_on_bad_points(points)

    prepared: list[Prepared] = [ret._return_value for *_, ret in points]
    slurm = [(n, p) for n, p in enumerate(prepared) if p.resources is not None]
    returns: list[JobReturn | None] = [None] * len(points)

    # 2. budget and submission of every Slurm point, before anything else runs
    submitted = []
    if slurm:
        from launch.sweep import SlurmPoint, budget_gate, submit

        slurm_points = [SlurmPoint(p.label, p.plan.run_dir, str(p.cfg.name), p.resources) for _, p in slurm]
        limit = slurm[0][1].cfg.get("budget", {}).get("max_node_hours")
        try:
            budget_gate(slurm_points, limit)
            submitted = submit(slurm_points, sweep_dir / "slurm")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    # 3. points that run here, one after another
    for n, (idx, overrides, sweep_config, _) in enumerate(points):
        if prepared[n].resources is None:
            log.info("#%d : %s", idx, " ".join(filter_overrides(overrides)))
            returns[n] = run_job(hydra_context=context, task_function=launcher.task_function, config=sweep_config,
                                 job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            configure_log(config.hydra.hydra_logging, config.hydra.verbose)

    # 4. wait for the Slurm jobs
    if submitted:
        from launch.sweep import print_outcome, wait

        outcomes = wait(submitted, launcher.poll_s, launcher.progress, on_done=print_outcome)
        failed = []
        for (n, _), outcome in zip(slurm, outcomes):
            ret = points[n][3]
            ret.return_value = outcome.result
            ret.status = JobStatus.COMPLETED if outcome.ok else JobStatus.FAILED
            returns[n] = ret
            if not outcome.ok:
                failed.append(outcome)
        if failed:
            ids = ", ".join(f"{o.submitted.job_id} ({o.submitted.point.label})" for o in failed)
            print(f"error: {len(failed)} of {len(outcomes)} job(s) failed: {ids}; errors and logs above",
                  file=sys.stderr, flush=True)
            sys.exit(1)

    # 5. the sweep's scaling report, from the run folders alone (`python -m launch.report DIR` rebuilds it)
    from launch.report import write_report

    report = write_report(sweep_dir)
    print(f"scaling report: {report}\n  tensorboard --logdir {sweep_dir}", flush=True)
    return [r for r in returns if r is not None]


def _default_subdir(config) -> bool:
    return OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") == DEFAULT_SUBDIR


def _stop_on_bad_points(points) -> None:
    """A sweep runs whole or not at all: one line per bad point, then exit 2 (a bug keeps its traceback)."""
    bad = []
    run_dirs: dict[str, str] = {}
    for idx, overrides, _, ret in points:
        label = " ".join(filter_overrides(overrides)) or f"#{idx}"
        if ret.status != JobStatus.COMPLETED:
            error = ret._return_value
            if not isinstance(error, UserError):
                raise error
            bad.append(f"sweep point #{idx} ({label}): {error}")
            continue
        run_dir = str(ret._return_value.plan.run_dir)
        if run_dir in run_dirs:
            bad.append(f"sweep points {run_dirs[run_dir]} and #{idx} ({label}) would share the run folder {run_dir}: "
                       "name each point's folder, e.g. hydra.sweep.subdir='${hydra.job.override_dirname}'")
        run_dirs.setdefault(run_dir, f"#{idx} ({label})")
    if bad:
        for line in bad:
            print(f"error: {line}", file=sys.stderr)
        print(f"error: nothing was submitted or run ({len(bad)} of {len(points)} sweep point(s) are not valid)",
              file=sys.stderr, flush=True)
        sys.exit(2)
