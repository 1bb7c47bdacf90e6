"""`python -m launch`: compose the config with Hydra, validate and plan, then hand the plan to a backend.

Backends (the `cluster` config group): `local` (ranks are processes here), `slurm` (a Slurm job per sweep point,
submitted through submitit), `srun` (already inside an allocation: srun starts the ranks). With -m, Hydra hands
the sweep to our launcher (hydra_plugins/gptlaunch_launcher), which plans every point before running any.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from gpt.errors import EXIT_FAILED, EXIT_USER, UserError
from launch.attempts import requeued
from launch.backends import Backend, Point, RunFailed, get_backend
from launch.backends.slurm.in_job import InJobBackend, under_stock_launcher
from launch.budget import Budget
from launch.job_env import job_environment
from launch.run_identity import Existing, check_run_folder
from launch.plan import Plan, make_plan

log = logging.getLogger("launch")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Prepared:
    """A validated, planned run: its resolved config is in plan.run_dir, nothing runs yet."""

    cfg: DictConfig
    plan: Plan
    backend: Backend
    resources: object | None = None  # what a submitting backend's job asks for
    budget: Budget | None = None  # what a submitting backend's jobs may cost
    existing: Existing | None = None  # what the run folder already holds (None: a new run)

    @property
    def finished(self) -> bool:
        return self.existing is not None and self.existing.finished

    @property
    def label(self) -> str:
        return self.plan.run_dir.name

    def point(self) -> Point:
        return Point(self.label, self.plan.run_dir, str(self.cfg.name), self.resources)


def prepare(cfg: DictConfig) -> Prepared:
    """Everything that can be checked before a process starts or a job is submitted."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if under_stock_launcher(hydra_cfg):  # this process is one task of a job hydra-submitit-launcher submitted
        backend: Backend = InJobBackend()
    else:
        backend = get_backend(cfg.cluster.get("name"))
    cfg, resources = backend.check(cfg)
    budget = Budget.from_cfg(cfg.get("budget")) if backend.submits else None
    existing = None
    if Path(to_absolute_path(cfg.data.text_path)).is_file():  # else planning names the missing corpus
        job = job_environment()  # this process's own job, if any; the backend's scheduler knows the others
        existing = check_run_folder(cfg, run_dir, job,
                                    lambda j: job.job_running(j) if job.job_id else backend.job_running(j))
    return Prepared(cfg, make_plan(cfg, run_dir), backend, resources, budget, existing)


def run(cfg: DictConfig) -> Path:
    prepared = prepare(cfg)
    plan, backend = prepared.plan, prepared.backend
    if prepared.finished:
        log.info("%s finished at step %d; nothing to do. Train it longer with a higher train.max_steps (its schedule "
                 "must not change: set train.decay_steps), or start a new run under another name (run=NAME).",
                 plan.run_dir, prepared.existing.step)
        return plan.run_dir
    if prepared.existing is not None:
        log.info("continuing %s from step %d", plan.run_dir, prepared.existing.step)
    log.info("running %s on %d rank(s): %d node(s) x %d task(s), cluster=%s", cfg.name, plan.world_size,
             plan.nodes, plan.tasks_per_node, backend.name)
    if backend.submits:
        submitted = backend.submit([prepared.point()], plan.run_dir / backend.name, prepared.budget)
        [outcome] = backend.wait(submitted)
        if not outcome.ok:
            raise RunFailed(f"job {outcome.submitted.job_id} failed (run folder: {plan.run_dir})")
    else:
        backend.run(plan)
        if requeued(plan.run_dir, job_environment()):
            log.info("requeued: this job runs again and continues %s from its newest checkpoint", plan.run_dir)
            return plan.run_dir
    log.info("done. Run folder: %s\n  tensorboard --logdir %s\n  python -m gpt.generate %s", plan.run_dir,
             plan.run_dir / "tensorboard", plan.run_dir)
    return plan.run_dir


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.exit(EXIT_FAILED)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER)
