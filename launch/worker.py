"""Each rank's entry point, whoever started it (the local backend, srun, submitit): find this rank's place,
join the process group, train, leave.

    python -m launch.worker RUN_DIR     # reads RUN_DIR/config.yaml, written by the launcher
"""
from __future__ import annotations

import time

STARTED = time.time()  # the interpreter is up; everything after this line is imports (start-up breakdown)

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from gpt.preemption import DEFAULT_SIGNALS, PreemptionFlag  # noqa: E402

from gpt.distributed import DistEnv, Rendezvous, init_process_group, leave, pick_device, preflight  # noqa: E402
from gpt.errors import EXIT_FAILED, EXIT_HANG, EXIT_PREEMPTED, EXIT_USER, UserError  # noqa: E402
from gpt.faults import Faults  # noqa: E402
from gpt.progress import PROGRESS  # noqa: E402
from gpt.run_config import DebugConfig, WatchdogConfig  # noqa: E402
from gpt.watchdog import Watchdog, flight_recorder_env  # noqa: E402
from gpt.runinfo import write_environment  # noqa: E402
from gpt.goodput import read_attempts, run_goodput  # noqa: E402
from launch.attempts import (begin_attempt, end_attempt, goodput_record, log_attempt,  # noqa: E402
                             max_restarts, this_attempts_line)
from launch.environment import detect  # noqa: E402
from launch.health_gate import check_health  # noqa: E402
from launch.job_env import JobEnvironment, job_environment  # noqa: E402
from launch.parent import end_with_launcher  # noqa: E402
from launch.run_lock import RunLock  # noqa: E402
from launch.startup import StartupClock  # noqa: E402
from launch.threads import ThreadPlan  # noqa: E402

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

    clock = StartupClock(run_dir, process_start=STARTED)
    clock.mark("imported")
    env, job = detect(), job_environment()
    setup_logging(run_dir, env)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    threads = apply_threads(env)
    write_environment(run_dir, env, {"threads": threads.threads, "threads_source": threads.source,
                                     "ranks_on_host": threads.ranks_on_host, "scheduler": job.variables()})
    attempt = len(read_attempts(run_dir)) + 1  # read before rank 0 writes this attempt's first line
    start_watchdog(run_dir, env, job, cfg, attempt)
    Faults(DebugConfig.from_cfg(cfg.get("debug") or {}), env.rank, attempt).before_start()
    PROGRESS.phase("startup", "joining the process group")
    rendezvous = join(run_dir, env, cfg)
    clock.mark("rendezvous")
    if env.is_main:  # one writer per run folder, from before the first step to the exit
        ATTEMPT["lock"] = RunLock(run_dir, job.job_id, job.job_running)
    if check_health(run_dir, env, job, cfg, attempt, pick_device(cfg.train.device, env), rendezvous):
        leave()
        return {"preempted": "health", "requeued": True}
    trainer = Trainer(cfg, env, run_dir, attempt)
    if env.is_main:
        begin_attempt(run_dir, job, clock.attempt_start or clock.process_start, trainer.first_step)
    ATTEMPT.update(startup=lambda: clock.breakdown(trainer.startup), first_step=trainer.first_step,
                   trainer=trainer, job=job)
    summary = trainer.fit()
    startup = clock.breakdown(trainer.startup)
    if env.is_main:
        log.info("%s", StartupClock.describe(startup))
    record = {"first_step": summary["first_step"], "last_step": summary["last_step"], "startup": startup,
              "goodput": goodput_record(run_dir, clock.attempt_start or clock.process_start, startup, summary)}
    if summary.get("preempted"):
        return {**summary, "requeued": stop_preempted(run_dir, env, job, cfg, summary, record)}
    leave()
    if env.is_main:  # what a launcher reports as the run's result
        log_attempt(run_dir, job, {**record, "ended": "finished"})
        end_attempt(run_dir)
        log.info("run finished: %s", run_goodput(read_attempts(run_dir)).describe())
        (run_dir / "summary.json").write_text(json.dumps(
            {"world_size": env.world_size, "num_nodes": env.num_nodes, **summary}, indent=1))
    return summary


def join(run_dir: Path, env: DistEnv, cfg) -> Rendezvous | None:
    """The process group, and a preflight all-reduce that proves every rank can talk to every other."""
    device = pick_device(cfg.train.device, env)
    timeout = OmegaConf.select(cfg, "rendezvous.timeout_s", default=None)
    if device.type == "cuda":  # NCCL's flight recorder, dumped into the run folder on a hang
        os.environ.update(flight_recorder_env(run_dir))
    rendezvous = init_process_group(env, device, WatchdogConfig.from_cfg(cfg.get("watchdog") or {}).
                                    process_group_timeout(), join_timeout_s=timeout)
    if rendezvous is None:
        return None
    rendezvous = preflight(rendezvous, device)
    if env.is_main:
        log.info("rendezvous at %s:%d: %s", env.master_addr, env.master_port, rendezvous.describe())
        (run_dir / "environment" / "rendezvous.json").write_text(json.dumps(
            {"master": f"{env.master_addr}:{env.master_port}", "hosts": rendezvous.hosts,
             "join_s": rendezvous.join_s, "all_reduce_bytes": rendezvous.all_reduce_bytes,
             "all_reduce_ms": rendezvous.all_reduce_ms}, indent=1))
    return rendezvous


def stop_preempted(run_dir: Path, env: DistEnv, job: JobEnvironment, cfg, summary: dict, record: dict) -> bool:
    """Every rank has saved (the save ends with a barrier). Rank 0 asks the scheduler to run the job again;
    Slurm then stops every process of this attempt (SIGTERM, which only sets the flag now) and starts the job
    again with the same id. Returns whether it was requeued, on every rank."""
    requeued = False
    if env.is_main:
        restarts = max_restarts(cfg)
        if summary["preempted"] == "SIGINT":  # Ctrl-C: the user stops the run; nothing runs it again
            requeued, how = False, "stopped by Ctrl-C; the same command continues the run"
        elif summary.get("exclusion"):
            requeued, how = job.requeue_excluding([summary["exclusion"]["host"]], restarts)
        else:
            requeued, how = job.requeue(restarts)
        extra = {"straggler": summary["exclusion"]} if summary.get("exclusion") else {}
        log_attempt(run_dir, job, {**record, "ended": f"preempted:{summary['preempted']}", "requeued": requeued,
                                   "note": how, **extra})
        end_attempt(run_dir)
        (log.info if requeued else log.warning)("stopped at step %d after %s, checkpoint saved; %s",
                                                summary["last_step"], summary["preempted"], how)
    requeued = _from_rank0(requeued)
    leave()
    return requeued


ATTEMPT: dict = {}  # what main() logs if the attempt fails


def start_watchdog(run_dir: Path, env: DistEnv, job: JobEnvironment, cfg, attempt: int) -> None:
    """The rank's watchdog, from before it joins the others to its exit."""
    wcfg = WatchdogConfig.from_cfg(cfg.get("watchdog") or {})
    if wcfg.enabled:
        ATTEMPT["watchdog"] = Watchdog(wcfg, run_dir, env.rank, env.world_size, env.hostname, attempt,
                 lambda report: end_hung_attempt(run_dir, env, job, cfg, report),
                 master=(env.master_addr, env.master_port) if env.distributed else None).start()


def end_hung_attempt(run_dir: Path, env: DistEnv, job: JobEnvironment, cfg, report: dict | None) -> None:
    """Called by the watchdog thread while the main thread is stuck: the rank that wrote the hang report says
    so in one line, records the attempt and requeues the job; every rank then ends, so the job can resume.
    Under a scheduler another rank waits a little for that rank to do it (it may be cut off), then requeues
    itself."""
    restarts = max_restarts(cfg)
    if report is None and job.scheduler == "none":  # nothing to requeue: the report is written, end now
        requeued = False
    elif report is None:
        time.sleep(REPORTER_GRACE_S)
        requeued, how = job.requeue(restarts)
    else:
        log.error("%s", report["summary"])
        requeued, how = job.requeue(restarts)
        trainer = ATTEMPT.get("trainer")
        if this_attempts_line(run_dir, job) is None:  # else a vanished rank's task recorded the attempt
            log_attempt(run_dir, job, {
                "first_step": ATTEMPT.get("first_step"), "last_step": trainer.step if trainer is not None else None,
                "ended": "hang", "hang": report["summary"], "hang_report": report["report"], "requeued": requeued,
                "note": how})
        end_attempt(run_dir)
        (log.warning if requeued else log.error)("watchdog: %s", how)
    sys.stdout.flush()
    sys.stderr.flush()
    if requeued:  # Slurm stops every process of this attempt; exiting first would count as a failed task
        time.sleep(REQUEUE_WAIT_S)
    os._exit(EXIT_HANG)


def when_a_rank_vanished(e: BaseException) -> None:
    """A collective that failed because another rank vanished (killed, or its host lost: its heartbeat stops
    without a word) ends the attempt as a hang does: reported, requeued. A rank's own error does not."""
    dog = ATTEMPT.get("watchdog")
    text = str(e)
    if dog is None or not (PROGRESS.failed_in or "peer" in text.lower()):
        return
    dog.end(f"failed: {type(e).__name__}")
    if dog.lost_peers():
        first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
        dog.fire(f"a collective failed ({first})", 0.0, PROGRESS.snapshot()["idle_s"])
    PROGRESS.stop_if_halted()  # the watchdog thread ran out of budget meanwhile: it ends the attempt


REPORTER_GRACE_S = 15.0
REQUEUE_WAIT_S = 60.0


def apply_threads(env: DistEnv) -> ThreadPlan:
    """The thread count the launcher chose for this rank, applied here (OMP_NUM_THREADS alone does not reach
    every pool), and said once per host when the ranks there ask for more threads than it has CPUs."""
    import torch

    plan = ThreadPlan.from_env()
    torch.set_num_threads(plan.threads)
    warning = plan.oversubscribed()
    if warning and env.local_rank == 0:
        log.warning("%s", warning)
    return plan


def _from_rank0(value: bool) -> bool:
    from gpt.distributed import from_rank0

    return from_rank0(value)


def install_flag(run_dir: Path) -> None:
    """The preemption handlers, before torch is imported: a signal during start-up sets the flag too."""
    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
        if not OmegaConf.select(cfg, "preemption.enabled", default=True):
            for signum in (signal.SIGUSR2, signal.SIGTERM):  # a task wrapper may have started us ignoring them
                signal.signal(signum, signal.SIG_DFL)
            return
        signals = OmegaConf.select(cfg, "preemption.signals", default=list(DEFAULT_SIGNALS))
    except Exception:  # reported properly once run_rank reads the config
        signals = list(DEFAULT_SIGNALS)
    try:
        PreemptionFlag(signals)
    except UserError:
        PreemptionFlag(DEFAULT_SIGNALS)  # the trainer reports the bad key


def main() -> None:
    run_dir = Path(sys.argv[1])
    install_flag(run_dir)
    end_with_launcher()
    code = 0
    try:
        summary = run_rank(run_dir)
        if summary.get("preempted") and not summary.get("requeued"):
            code = EXIT_PREEMPTED
    except UserError as e:
        PROGRESS.stop_if_halted()
        log.error("%s", e)
        code = EXIT_USER
        _log_failure(run_dir, str(e))
    except BaseException as e:
        PROGRESS.stop_if_halted()  # a collective the watchdog gave up on failed late: the watchdog ends the rank
        when_a_rank_vanished(e)
        log.exception("rank failed")
        code = EXIT_FAILED
        _log_failure(run_dir, f"{type(e).__name__}: {e}")
    if "watchdog" in ATTEMPT:
        ATTEMPT["watchdog"].end("finished" if code == 0 else f"exit code {code}")
    if "lock" in ATTEMPT:
        ATTEMPT["lock"].release()
    # A hard exit skips gloo's racy teardown ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _log_failure(run_dir: Path, message: str) -> None:
    """Rank 0 of an attempt that began (it holds the run's lock) says how it failed; one refused before that
    writes nothing into another run's log."""
    job = ATTEMPT.get("job") or job_environment()
    if "lock" not in ATTEMPT or this_attempts_line(run_dir, job) is not None:  # a vanished rank's task wrote it
        return
    trainer = ATTEMPT.get("trainer")
    try:
        log_attempt(run_dir, job, {
            "first_step": ATTEMPT.get("first_step"), "last_step": trainer.step if trainer is not None else None,
            "ended": f"failed: {message.splitlines()[0][:300] if message else ''}",
            **({"startup": ATTEMPT["startup"]()} if "startup" in ATTEMPT else {})})
        end_attempt(run_dir)
    except OSError:
        pass


if __name__ == "__main__":
    main()
