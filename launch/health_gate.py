"""The health checks of gpt.health at the start of every attempt, and what follows: the figures in
RUN_DIR/health-<attempt>.json, a warning naming each node below health.min_fraction (or failing storage), and with
health.action=exclude a requeue without those nodes (Slurm's ExcNodeList), recorded in attempts.jsonl."""
from __future__ import annotations

import logging
from pathlib import Path

from gpt.distributed import DistEnv, Rendezvous, from_rank0
from gpt.health import Verdict, bus_bandwidth_gbps, measure
from gpt.progress import PROGRESS
from gpt.run_config import DebugConfig, HealthConfig
from launch.attempts import log_attempt, max_restarts
from launch.job_env import JobEnvironment

log = logging.getLogger("launch.health")


def check_health(run_dir: Path, env: DistEnv, job: JobEnvironment, cfg, attempt: int, device,
                 rendezvous: Rendezvous | None) -> bool:
    """Every rank takes part. True (on every rank) when the job was requeued without a flagged node."""
    hcfg = HealthConfig.from_cfg(cfg.get("health") or {})
    if not hcfg.enabled:
        return False
    slow = attempt == 1 and DebugConfig.from_cfg(cfg.get("debug") or {}).slow_node == env.node_rank
    PROGRESS.phase("startup", "health checks")
    nodes = measure(hcfg, env.node_rank, env.num_nodes, env.hostname, env.rank, device, cfg.train.precision,
                    run_dir, slow)
    bus = bus_bandwidth_gbps(env.world_size, rendezvous.all_reduce_bytes, rendezvous.all_reduce_ms) \
        if rendezvous else None
    verdict = Verdict(nodes, hcfg.min_fraction, bus)
    excluded = False
    if env.is_main:
        verdict.write(run_dir / f"health-{attempt}.json")
        log.info("%s", verdict.summary())
        for node in verdict.flagged:
            log.warning("health: %s (health.min_fraction=%g)", node.describe(verdict.median), hcfg.min_fraction)
        if verdict.flagged and hcfg.action == "exclude":
            excluded = exclude(run_dir, job, cfg, verdict)
    return from_rank0(excluded)


def exclude(run_dir: Path, job: JobEnvironment, cfg, verdict: Verdict) -> bool:
    hosts = sorted({n.host for n in verdict.flagged})
    restarts = max_restarts(cfg)
    requeued, how = job.requeue_excluding(hosts, restarts)
    (log.warning if requeued else log.error)("health: %s", how)
    if requeued:
        log_attempt(run_dir, job, {"first_step": None, "last_step": None, "ended": f"excluded {', '.join(hosts)}",
                                   "health": verdict.as_dict(), "requeued": True, "note": how})
    return requeued
