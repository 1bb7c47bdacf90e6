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
from omegaconf import DictConfig

from gpt.errors import ConfigError, UserError
from launch.plan import Plan, make_plan

log = logging.getLogger("launch")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BACKENDS = ("local", "slurm", "srun")


class RunFailed(UserError):
    """The run was planned and started, and failed (exit code 1, not 2)."""


@dataclass
class Prepared:
    """A validated, planned run: its resolved config is in plan.run_dir, nothing runs yet."""

    cfg: DictConfig
    plan: Plan
    resources: object | None = None  # launch.slurm.SlurmResources for cluster=slurm

    @property
    def label(self) -> str:
        return self.plan.run_dir.name


def prepare(cfg: DictConfig) -> Prepared:
    """Everything that can be checked before a process starts or a job is submitted."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    backend = cfg.cluster.get("name")
    if backend not in BACKENDS:
        raise ConfigError("cluster.name", backend, f"one of {', '.join(BACKENDS)} (cluster=local|slurm|srun)")
    resources = None
    if backend == "slurm":
        from launch.cluster_checks import check_against_cluster, read_partitions, require_slurm
        from launch.slurm import SlurmResources

        require_slurm()
        resources = SlurmResources.from_config(cfg)
        check_against_cluster(resources, read_partitions())
    elif backend == "srun":
        from launch.srun import resolve_allocation

        cfg = resolve_allocation(cfg)
    return Prepared(cfg, make_plan(cfg, run_dir), resources)


def run(cfg: DictConfig) -> Path:
    prepared = prepare(cfg)
    plan = prepared.plan
    log.info("running %s on %d rank(s): %d node(s) x %d task(s), cluster=%s", cfg.name, plan.world_size,
             plan.nodes, plan.tasks_per_node, cfg.cluster.name)
    if cfg.cluster.name == "local":
        from launch.local import run_local

        run_local(plan.run_dir, plan.nodes, plan.tasks_per_node)
    elif cfg.cluster.name == "srun":
        from launch.srun import SrunFailed, run_srun

        try:
            run_srun(plan.run_dir, plan.nodes, plan.tasks_per_node)
        except SrunFailed as e:
            raise RunFailed(str(e)) from None
    else:
        from launch.sweep import SlurmPoint, run_points

        point = SlurmPoint(prepared.label, plan.run_dir, str(cfg.name), prepared.resources)
        [outcome] = run_points([point], plan.run_dir / "slurm", cfg.budget.get("max_node_hours"))
        if not outcome.ok:
            raise RunFailed(f"job {outcome.submitted.job_id} failed (run folder: {plan.run_dir})")
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
        sys.exit(1)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
