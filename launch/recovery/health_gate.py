"""The health checks of launch.recovery.health at the start of every attempt (per node on CPU, per GPU on GPUs),
and what follows: the figures in RUN_DIR/health-<attempt>.json, a warning naming each node or GPU below
health.min_fraction (or failing storage), and with health.action=exclude a requeue without those nodes (Slurm's
ExcNodeList), recorded in attempts.jsonl."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from gpt.collectives.process_group import DistEnv, Rendezvous, from_rank0, from_rank0_object
from launch.recovery.health import measure_gpus, measure_nodes
from launch.recovery.health_verdict import NodeVerdict, Verdict, bus_bandwidth_gbps
from gpt.resilience.progress import PROGRESS
from gpt.config.sections import DebugConfig, HealthConfig
from gpt.run_folder import Next, RunFolder
from launch.rank.job_env import ROUND_VAR, JobEnvironment
from launch.recovery.decision import Cause, Ending, recover
from launch.recovery.rounds import Rounds

log = logging.getLogger("launch.health")


def check_health(run_dir: Path, env: DistEnv, job: JobEnvironment, attempt: int, device,
                 rendezvous: Rendezvous | None, *, health: HealthConfig, debug: DebugConfig, precision: str,
                 restarts: int) -> bool:
    """Every rank takes part. True (on every rank) when the job was requeued (at most `restarts` times in all)
    without a flagged node."""
    if not health.enabled:
        return False
    slow = attempt == 1 and debug.slow_node == env.node_rank
    PROGRESS.phase("startup", "health checks")
    verdict = measure_gpus(health, env, device, run_dir, slow) if device.type == "cuda" \
        else cpu_verdict(run_dir, env, job, device, rendezvous, health, precision, slow)
    excluded = False
    if env.is_main:
        verdict.write(RunFolder(run_dir).health_record(attempt))
        log.info("%s", verdict.summary())
        for problem in verdict.problems():
            log.warning("health: %s (health.min_fraction=%g)", problem, health.min_fraction)
        if verdict.flagged_hosts and health.action == "exclude":
            excluded = exclude(run_dir, job, restarts, verdict)
    return from_rank0(excluded)


def cpu_verdict(run_dir: Path, env: DistEnv, job: JobEnvironment, device, rendezvous: Rendezvous | None,
                health: HealthConfig, precision: str, slow: bool) -> NodeVerdict:
    """Each node's matmul speed and storage. In an in-job restart the nodes measured in the attempt's earlier rounds
    keep their figures (measured minutes ago, one after another: a second each at a few nodes, and growing), and
    only a node new to the attempt, a spare, takes its turns, judged against them."""
    known = from_rank0_object(known_figures(run_dir, job) if env.is_main else None) if job.round else {}
    nodes = measure_nodes(health, env.node_rank, env.num_nodes, env.hostname, env.rank, device, precision, run_dir,
                          slow, known)
    bus = bus_bandwidth_gbps(env.world_size, rendezvous.all_reduce_bytes, rendezvous.all_reduce_ms) \
        if rendezvous else None
    verdict = NodeVerdict(nodes, health.min_fraction, bus)
    if env.is_main and ROUND_VAR in job.environ:
        remember_figures(run_dir, job, {**known, **{n.host: n.gflops for n in nodes}})
    return verdict


def known_figures(run_dir: Path, job: JobEnvironment) -> dict[str, float]:
    try:
        return {str(h): float(g) for h, g in json.loads(Rounds.of(run_dir, job).health().read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def remember_figures(run_dir: Path, job: JobEnvironment, figures: dict[str, float]) -> None:
    path = Rounds.of(run_dir, job).health()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(figures))
        tmp.replace(path)
    except OSError as e:  # the next round measures every node again
        log.warning("health: cannot keep the nodes' figures in %s: %s", path, e)


def exclude(run_dir: Path, job: JobEnvironment, restarts: int, verdict: Verdict) -> bool:
    """A spare replaces the flagged nodes in an in-job restart, else the job requeues without them, else training goes
    on with them (launch.recovery.decision). Returns whether this attempt ended."""
    hosts = tuple(sorted(set(verdict.flagged_hosts)))
    outcome = recover(Ending(run_dir, job, Cause.HEALTH, f"excluded {', '.join(hosts)}", restarts, hosts,
                             {"first_step": None, "last_step": None, "health": verdict.as_dict()}))
    return outcome.next is not Next.CONTINUE
