"""`python -m launch`: compose the config with Hydra, validate and plan, then hand the plan to a backend."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gpt.errors import UserError
from launch.local import run_local
from launch.plan import make_plan

log = logging.getLogger("launch")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run(cfg: DictConfig) -> Path:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    plan = make_plan(cfg, run_dir)
    log.info("running %s on %d rank(s): %d node(s) x %d task(s), cluster=%s", cfg.name, plan.world_size,
             plan.nodes, plan.tasks_per_node, cfg.cluster.name)
    if cfg.cluster.name != "local":
        raise UserError(f"cluster={cfg.cluster.name} is not available; use cluster=local")
    run_local(plan.run_dir, plan.nodes, plan.tasks_per_node)
    log.info("done. Run folder: %s\n  tensorboard --logdir %s\n  python -m gpt.generate %s", run_dir,
             run_dir / "tensorboard", run_dir)
    return run_dir


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
