"""`python -m launch`: compose the config with Hydra, validate and plan, then hand the plan to a backend.

Backends (the `cluster` config group): `local` (ranks are processes here), `slurm` (a Slurm job per sweep point,
submitted through submitit), `srun` (already inside an allocation: srun starts the ranks). With -m, Hydra hands
the sweep to our launcher (hydra_plugins/gptlaunch_launcher), which plans every point before running any.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from launch import launch_config
from gpt.data.inputs import corpus_of
from gpt.errors import EXIT_FAILED, EXIT_UNKNOWN, EXIT_USER, ConfigError, UserError
from gpt.run_folder import CANCELLED, RunFolder, close_folder, keep_to_user
from launch import hydra_errors
from launch.run.attempts import failed_saves_line, requeued
from launch.backends import RunFailed, RunStopped, backend_for, in_a_submitted_task, scheduler
from launch.backends.job_state import JobStanding, SchedulerUnavailable
from launch.launcher_section import launcher_section
from launch.rank.job_env import JobEnvironment, job_environment
from launch.run.identity import check_run_folder
from launch.run import launch_lock
from launch.run.job_record import cancelled_by_user, record_job
from launch.run.take_lease import AskJob, check_free
from launch.planning.plan import make_plan, resolved
from launch.planning.planned_run import PlannedRun

log = logging.getLogger("launch")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
launch_config.register()  # configs/config.yaml composes onto it


def plan_run(cfg: DictConfig) -> PlannedRun:
    """Everything that can be checked before a process starts or a job is submitted: the config is parsed here,
    once, and every part of planning receives its typed sections. A scheduler that does not answer (sinfo, whether
    the run's job still waits) stops the launch in one line, nothing submitted: an outage is not "no job"."""
    try:
        return _plan(cfg)
    except SchedulerUnavailable as e:
        print(f"error: {e.scheduler} does not answer ({e}): nothing was submitted; run this command again once it "
              "answers", file=sys.stderr, flush=True)
        sys.exit(EXIT_UNKNOWN)


def _plan(cfg: DictConfig) -> PlannedRun:
    """The run planned, its folder's launch lock held from the first look at it (launch.run.launch_lock) until its job
    is submitted or its ranks end (run, launch.hydra_launcher), or here where there is nothing to run."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # this process's own job, if any; the jobs a run folder records are the scheduler's, whichever backend runs this
    # launch (cluster=local asks it too: a queued or requeued job keeps its folder)
    job = job_environment()

    def ask(job_id: str) -> JobStanding | None:
        return job.job_state(job_id) if job.job_id else scheduler().job_state(job_id)

    if in_a_submitted_task(HydraConfig.get()):  # every task of the job plans its run at once, as one of its ranks
        return _plan_folder(cfg, run_dir, job, ask)
    # a run another launch started here, whose rank 0 holds the folder by now, is refused at once, not waited for
    launch_lock.hold(run_dir, while_waiting=lambda: check_free(run_dir, job.job_id, job.restart, ask))
    try:
        planned = _plan_folder(cfg, run_dir, job, ask)
    except BaseException as e:
        launch_lock.release(run_dir)
        if isinstance(e, UserError):
            _forget_refused(run_dir)
        raise
    if planned.finished or planned.live_job:
        launch_lock.release(run_dir)
    return planned


def _forget_refused(run_dir: Path) -> None:
    """A refused command leaves no run folder behind: one that holds nothing but what this launch made in it (its
    launch lock, Hydra's log of it) goes; a folder with anything else is the run's, and stays as it was."""
    made = {RunFolder(run_dir).launch_lock.name, f"{HydraConfig.get().job.name}.log"}
    try:
        if not set(os.listdir(run_dir)) <= made:
            return
        for name in made:
            (run_dir / name).unlink(missing_ok=True)
        run_dir.rmdir()
    except OSError:  # another launch's file meanwhile, or a folder this user cannot change: left as it is
        pass


def _plan_folder(cfg: DictConfig, run_dir: Path, job: JobEnvironment, ask: AskJob) -> PlannedRun:
    hydra_cfg = HydraConfig.get()
    run = resolved(launch_config.parse(cfg), run_dir, list(hydra_cfg.overrides.task))  # once: planning reads it so
    for folder in [run_dir, *([run_dir.parent] if hydra_cfg.mode == RunMode.MULTIRUN else [])]:
        close_folder(folder, run.share_with_group)
    backend = backend_for(run.cluster.name, hydra_cfg)
    launcher = launcher_section(hydra_cfg.launcher)
    run, resources = backend.check(run)
    queue = backend.queue
    if launcher.detach and queue is None:
        raise ConfigError("hydra.launcher.detach", True, f"false with cluster={backend.name}: only cluster=slurm jobs "
                          "run without the launcher")
    if run.eval.after_save == "job" and queue is None:
        raise ConfigError("eval.after_save", "job", f"none with cluster={backend.name}: evaluation jobs are Slurm "
                          "jobs (cluster=slurm); python -m gpt.evaluate RUN --step N scores a checkpoint here")
    if run.launcher.early_stop != "none" and hydra_cfg.mode != RunMode.MULTIRUN:
        raise ConfigError("launcher.early_stop", run.launcher.early_stop, "none for a single run: early stopping "
                          "compares the points of a sweep (python -m launch -m ...)")
    checked, live = None, queue.live_job(run_dir) if queue else None
    if live is None and (corpus := corpus_of(run.data)) is not None:  # else planning names the corpus
        checked = check_run_folder(run, corpus, run_dir, job, ask)
    budget = run.budget if queue else None
    finished = checked is not None and checked.existing is not None and checked.existing.finished
    plan = make_plan(run, run_dir, backend, live, keep_config=finished)
    if live is None and not finished:  # every check passed: the folder gets its records (a finished run keeps its own)
        if checked is not None:
            checked.record(run_dir)
            if queue is None:  # the ranks run in this process's job (sbatch's script, salloc, a stock launcher)
                record_job(run_dir, job)
        record_overrides(RunFolder(run_dir).hydra_overrides, list(hydra_cfg.overrides.task))
    return PlannedRun(run, plan, backend, launcher, resources, budget, checked and checked.existing, live)


def record_overrides(path: Path, overrides: list[str]) -> None:
    """The command's overrides, as Hydra would keep them: the report names a sweep's points by the keys that vary."""
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))


def run(cfg: DictConfig) -> Path:
    planned = plan_run(cfg)
    plan, backend, queue = planned.plan, planned.backend, planned.backend.queue
    if planned.finished:
        longer = "" if planned.existing.stopped_early else (
            " Train it longer with a higher train.max_steps (its schedule must not change: set train.decay_steps), or "
            "start a new run under another name (run=NAME).")
        log.info("%s %s; nothing to do.%s", plan.run_dir, planned.existing.done(), longer)
        return plan.run_dir
    if planned.existing is not None:
        log.info("continuing %s from step %d", plan.run_dir, planned.existing.step)
    log.info("running %s on %d rank(s): %d node(s) x %d task(s), cluster=%s", planned.run.name, plan.world_size,
             plan.nodes, plan.tasks_per_node, backend.name)
    if queue is not None:
        try:
            submitted, _ = queue.submit_all([planned], plan.run_dir / backend.name)
        finally:
            launch_lock.release(plan.run_dir)
        if planned.launcher.detach:
            queue.print_follow_up(plan.run_dir, [j for s in submitted for j in s.job_ids])
            return plan.run_dir
        [outcome] = queue.wait(submitted, planned.launcher.poll_s, planned.launcher.progress)
        if outcome.cancelled:  # said by the waiter: the user's cancel is no failure
            return plan.run_dir
        if outcome.stopped is not None:  # said by the waiter, with how to continue: not a failure, not finished
            raise RunStopped(plan.run_dir)
        if not outcome.ok:
            raise RunFailed(f"job {outcome.submitted.job_id} failed (run folder: {plan.run_dir})")
    else:
        try:
            job = backend.run(plan)  # the ranks' job environment: their launch's attempts lines
        finally:
            launch_lock.release(plan.run_dir)
        if requeued(plan.run_dir, job):
            log.info("requeued: this job runs again and continues %s from its newest checkpoint", plan.run_dir)
            return plan.run_dir
        if job.job_id and cancelled_by_user(plan.run_dir, job.job_id):
            log.info("job %s %s; the same command continues %s from its newest checkpoint", job.job_id, CANCELLED,
                     plan.run_dir)
            return plan.run_dir
    if failed := failed_saves_line(RunFolder(plan.run_dir).attempts.read()):
        log.warning("%s", failed)
    log.info("done. Run folder: %s\n  tensorboard --logdir %s\n  python -m gpt.generate %s", plan.run_dir,
             RunFolder(plan.run_dir).tensorboard, plan.run_dir)
    return plan.run_dir


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """The task function: Hydra has composed `cfg` (for a sweep, our launcher calls it for each point)."""
    hydra_errors.composed()
    try:
        run(cfg)
    except RunStopped:
        sys.exit(EXIT_FAILED)  # as launch.status's "stopped": the run did not finish
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.exit(EXIT_FAILED)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER)


def main() -> None:
    """`python -m launch`: Hydra's own errors (an unknown key, a wrong type) are one line and exit code 2 too."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Optuna's sweeper imports it: a line per plugin at INFO
    keep_to_user(share_with_group=False)  # what Hydra writes before the config is read (its log); plan_run may share
    with hydra_errors.composing(sys.argv[1:]):
        hydra_main()
