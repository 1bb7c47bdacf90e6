"""Each rank's entry point, whoever started it (the local backend, srun, submitit): find this rank's place,
join the process group, train, leave.

    python -m launch.worker RUN_DIR     # reads RUN_DIR/config.yaml, written by the launcher
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from omegaconf import OmegaConf

from gpt.distributed import DistEnv, init_process_group, leave, pick_device, preflight
from gpt.errors import UserError
from gpt.runinfo import write_environment
from launch.environment import detect

log = logging.getLogger("launch.worker")


def setup_logging(run_dir: Path, env: DistEnv) -> None:
    """Every line says which rank wrote it; each rank also keeps its own log file in the run folder."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"[rank{env.rank} %(asctime)s %(levelname)s] %(message)s", "%H:%M:%S")
    file = logging.FileHandler(run_dir / "logs" / f"rank{env.rank}.log")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if env.is_main else logging.WARNING)
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    for handler in (file, console):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def run_rank(run_dir: Path) -> dict:
    from gpt.trainer import Trainer  # after logging is set up, so import-time warnings carry the rank

    env = detect()
    setup_logging(run_dir, env)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    write_environment(run_dir, env)
    device = pick_device(cfg.train.device, env)
    # Until checkpoint-on-signal lands (issue 5), Slurm's warning signal (USR2 before the time limit, sent to
    # every process of the step) must not kill a rank: its default action would.
    if signal.getsignal(signal.SIGUSR2) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGUSR2, lambda *_: log.warning("got SIGUSR2: the job's time limit is near"))
    timeout = OmegaConf.select(cfg, "rendezvous.timeout_s", default=None)
    rendezvous = init_process_group(env, device, join_timeout_s=timeout)
    if rendezvous is not None:
        rendezvous = preflight(rendezvous, device)
        if env.is_main:
            log.info("rendezvous at %s:%d: %s", env.master_addr, env.master_port, rendezvous.describe())
            (run_dir / "environment" / "rendezvous.json").write_text(json.dumps(
                {"master": f"{env.master_addr}:{env.master_port}", "hosts": rendezvous.hosts,
                 "join_s": rendezvous.join_s, "all_reduce_bytes": rendezvous.all_reduce_bytes,
                 "all_reduce_ms": rendezvous.all_reduce_ms}, indent=1))
    summary = Trainer(cfg, env, run_dir).fit()
    leave()
    if env.is_main:  # what a launcher reports as the run's result
        (run_dir / "summary.json").write_text(json.dumps(
            {"world_size": env.world_size, "num_nodes": env.num_nodes, **summary}, indent=1))
    return summary


def main() -> None:
    run_dir = Path(sys.argv[1])
    code = 0
    try:
        run_rank(run_dir)
    except UserError as e:
        log.error("%s", e)
        code = 2
    except BaseException:
        log.exception("rank failed")
        code = 1
    # A hard exit skips gloo's racy teardown ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
