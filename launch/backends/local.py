"""The embedded default backend: a sweep point's ranks run as processes on this machine, through the same
per-rank entry point (launch.worker) that srun starts on a cluster."""
from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from gpt.errors import EXIT_PREEMPTED, EXIT_USER, UserError
from launch.backends import Backend
from launch.startup import attempt_start_env
from launch.threads import ThreadPlan

log = logging.getLogger(__name__)


def run_local(run_dir: Path, nodes: int, tasks_per_node: int) -> None:
    world = nodes * tasks_per_node
    # Every rank shares this machine's CPUs. The ranks get their settings in their own environment (through
    # env(1): the elastic agent copies this process's environment, which must stay as the user left it, so that
    # nothing carries over from one sweep point to the next).
    rank_env = {**ThreadPlan.decide(ranks_on_host=world).env(), **attempt_start_env(),
                "GPTLAUNCH_TASKS_PER_NODE": str(tasks_per_node)}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world, rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", run_id=uuid.uuid4().hex, max_restarts=0,
                          start_method="spawn", monitor_interval=0.1)
    args = [f"{k}={v}" for k, v in rank_env.items()] + [sys.executable, "-m", "launch.worker", str(run_dir)]
    try:
        elastic_launch(config, "env")(*args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        log_file = run_dir / "logs" / f"rank{rank}.log"
        if failure.exitcode == EXIT_PREEMPTED:
            raise UserError(f"the run was stopped by a signal and saved a checkpoint in {run_dir / 'checkpoints'}; "
                            f"run the same command (same hydra.run.dir={run_dir}) to resume") from None
        hint = "a configuration error (see above)" if failure.exitcode == EXIT_USER else f"exit code {failure.exitcode}"
        raise UserError(f"rank {rank} failed with {hint}; its log: {log_file}") from None


class LocalBackend(Backend):
    name = "local"

    def run(self, plan) -> None:
        run_local(plan.run_dir, plan.nodes, plan.tasks_per_node)
