"""Each rank's entry point, whoever started it (the local backend, srun, submitit): find this rank's place,
join the process group, train, leave.

    python -m launch.rank.worker RUN_DIR     # reads RUN_DIR/config.yaml, written by the launcher
"""
from __future__ import annotations

import time

STARTED = time.time()  # the interpreter is up; everything after this line is imports (start-up breakdown)

import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from launch import launch_config  # noqa: E402
from launch.launch_config import LaunchConfig  # noqa: E402
from gpt.resilience.preemption import PreemptionFlag, ctrl_c_pressed, parse_signals  # noqa: E402

from gpt.collectives.process_group import (DistEnv, Rendezvous, all_reduce_values, init_process_group, leave,  # noqa: E402
                                    pick_device, preflight)
from gpt.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER, UserError, error_line,  # noqa: E402
                        failure_line)
from gpt.resilience.faults import Faults, abort_like_nccl  # noqa: E402
from gpt.resilience.lease import install_fence  # noqa: E402
from gpt.resilience.progress import PROGRESS  # noqa: E402
from gpt.config.sections import RendezvousConfig, WatchdogConfig  # noqa: E402
from launch.recovery.watchdog import flight_recorder_env  # noqa: E402
from gpt.train.divergence import Diverged  # noqa: E402
from gpt.train.out_of_memory import RanOutOfMemory  # noqa: E402
from gpt.train.runinfo import write_environment  # noqa: E402
from gpt.train.summary import FitSummary  # noqa: E402
from gpt.resilience.goodput import run_goodput  # noqa: E402
from gpt.run_folder import RunFolder, keep_to_user, write_json  # noqa: E402
from launch.run.attempts import (Attempt, end_attempt, goodput_record, log_attempt,  # noqa: E402
                                 log_failure, this_attempt)
from launch.rank.environment import detect  # noqa: E402
from launch.rank.gpu_plan import GpuPlan, vet_gpus  # noqa: E402
from launch.recovery.health_gate import check_health  # noqa: E402
from launch.rank.job_env import JobEnvironment, job_environment  # noqa: E402
from launch.recovery.endings import (collective_failed, end_out_of_memory, end_stopped, start_watchdog,  # noqa: E402
                                     when_a_rank_vanished)
from launch.rank.parent import end_with_launcher, pause_with_launcher  # noqa: E402
from launch.rank.loop_hooks import rank_hooks  # noqa: E402
from launch.rank.rank_log import EVERY_RANK, setup_logging  # noqa: E402
from launch.run.job_record import record_job  # noqa: E402
from launch.run.take_lease import take_lease  # noqa: E402
from launch.run.startup import STEP_TOKEN, StartupClock  # noqa: E402
from launch.rank.open_files import raised_for  # noqa: E402
from launch.rank.threads import apply_threads  # noqa: E402

log = logging.getLogger("launch.rank.worker")
def run_rank(attempt: Attempt, run: LaunchConfig | None) -> int:
    """`run` is the run folder's config as install_flag read it (None: it could not, and reading it again here
    reports why). Returns the rank's exit code: 0, or EXIT_PREEMPTED for a stop that nothing runs again."""
    from gpt.train.trainer import Trainer  # after logging is set up, so import-time warnings carry the rank

    run_dir, folder = attempt.run_dir, RunFolder(attempt.run_dir)
    clock = attempt.clock = StartupClock(run_dir, process_start=STARTED)
    clock.mark("imported")
    env, job = detect(), job_environment()
    attempt.job = job
    setup_logging(run_dir, env)
    run = run or launch_config.load(folder.config)
    threads = apply_threads(env.local_rank)
    log.info("%s", raised_for(env.world_size, env.is_main), extra={EVERY_RANK: True})  # before any socket
    device = pick_device(run.train.device, env, run.debug.share_gpu)
    gpus = GpuPlan.of(env, os.environ, device.index if device.type == "cuda" else None)
    write_environment(run_dir, env, device, {"threads": threads.threads, "threads_source": threads.source,
                                             "ranks_on_host": threads.ranks_on_host, "gpu_plan": gpus.record(),
                                             "scheduler": job.variables(), "step": os.environ.get(STEP_TOKEN)})
    attempt.number = folder.attempts.next_number()  # read before rank 0 marks this attempt or writes a line
    restarts = run.preemption.max_restarts
    start_watchdog(attempt, env, run.watchdog, restarts)
    Faults(run.debug, env.rank, attempt.number).before_start()
    PROGRESS.phase("startup", "joining the process group")
    rendezvous = join(run_dir, env, device, run.rendezvous, run.watchdog, gpus, run.debug.share_gpu)
    attempt.nodes = list(rendezvous.by_host()) if rendezvous else [env.hostname]
    clock.mark("rendezvous")
    hold_the_folder(attempt, env, job)
    if check_health(run_dir, env, job, attempt.number, device, rendezvous, health=run.health, debug=run.debug,
                    precision=run.train.compute_precision, restarts=restarts):
        leave()
        return 0  # requeued without the sick node
    clock.mark("health")
    trainer = Trainer(run, env, run_dir, attempt.number, run.cluster.signal_delay_s,
                      hooks=rank_hooks(attempt, env, run, run_dir), cannot_spare=lambda host: job.cannot_spare([host]))
    summary = trainer.fit()
    return end_trained(attempt, env, restarts, summary, clock.breakdown(trainer.startup))


def end_trained(attempt: Attempt, env: DistEnv, restarts: int, summary: FitSummary, startup: dict) -> int:
    """The attempt's end once its trainer returned, at the last step or an agreed stop (launch.recovery.endings);
    rank 0 records it, and at the run's end writes its summary (what a launcher reports as the run's result)."""
    run_dir, job, clock, folder = attempt.run_dir, attempt.job, attempt.clock, RunFolder(attempt.run_dir)
    if env.is_main:
        log.info("%s", StartupClock.describe(startup))
    record = {"first_step": summary.first_step, "last_step": summary.last_step, "startup": startup,
              "goodput": goodput_record(run_dir, clock.attempt_start or clock.process_start, startup, summary),
              **({"failed_saves": summary.failed_saves} if summary.failed_saves else {})}
    if summary.preempted:
        return 0 if end_stopped(attempt, env, restarts, summary, record) else EXIT_PREEMPTED
    leave()
    if env.is_main:
        early = summary.stopped_early  # a sweep's point stopped at a rung: done, not failed
        log_attempt(run_dir, job, {**record, "ended": early or "finished"})
        end_attempt(run_dir, this_attempt(job))
        log.info("run %s: %s", early or "finished", run_goodput(folder.attempts.read()).describe())
        write_json(folder.summary, {"world_size": env.world_size, "num_nodes": env.num_nodes, **summary.as_dict()},
                   indent=1)
    return 0


def hold_the_folder(attempt: Attempt, env: DistEnv, job: JobEnvironment) -> None:
    """One writer per run folder, from before the first step to the exit: rank 0 takes the folder's lease, and every
    rank fences its writes with that generation (a rank of an attempt that lost the folder stops writing)."""
    generation = 0
    if env.is_main:
        attempt.lease = take_lease(attempt.run_dir, job.job_id, job.restart, job.job_state, round_=job.round,
                                   launch=job.launch)
        generation = attempt.lease.generation
    write_for(attempt, int(all_reduce_values([generation])[0]))
    if env.is_main:  # the job launch.status, list and cancel ask about, whichever path started it
        record_job(attempt.run_dir, job)


def write_for(attempt: Attempt, generation: int) -> None:
    """Fence this rank's writes with the run folder's `generation`, and beat at once: the node's writer drops a beat
    without it as an earlier attempt's, so a rank that died before its next beat would never be seen by its peers."""
    install_fence(attempt.run_dir, generation)
    if attempt.watchdog is not None:
        attempt.watchdog.beat()


def join(run_dir: Path, env: DistEnv, device, rendezvous_cfg: RendezvousConfig, watchdog: WatchdogConfig,
         gpus: GpuPlan, share_gpu: bool = False) -> Rendezvous | None:
    """The process group, once rank 0 has seen that no two ranks share a GPU, and a preflight all-reduce that proves
    every rank can talk to every other."""
    if device.type == "cuda":  # NCCL's flight recorder, dumped into the run folder on a hang
        os.environ.update(flight_recorder_env(run_dir, os.environ))
    rendezvous = init_process_group(env, device, watchdog.process_group_timeout(),
                                    join_timeout_s=rendezvous_cfg.timeout_s, card=gpus.card(),
                                    vet=lambda cards: vet_gpus(device, list(map(GpuPlan.from_card, cards)), share_gpu),
                                    share_gpu=share_gpu)
    if rendezvous is None:
        return None
    rendezvous = preflight(rendezvous, device)
    if env.is_main:
        log.info("rendezvous at %s:%d: %s", env.master_addr, env.master_port, rendezvous.describe())
        write_json(RunFolder(run_dir).rendezvous, {
            "master": f"{env.master_addr}:{env.master_port}", "hosts": rendezvous.hosts,
            "join_s": rendezvous.join_s, "all_reduce_bytes": rendezvous.all_reduce_bytes,
            "all_reduce_ms": rendezvous.all_reduce_ms}, indent=1)
    return rendezvous


def install_flag(run_dir: Path) -> LaunchConfig | None:
    """The preemption handlers, before torch is imported: a signal during start-up sets the flag too. Returns the
    run's config, read here once for the whole rank (None when it cannot be: run_rank reports why)."""
    try:
        run = launch_config.load(RunFolder(run_dir).config)
    except Exception:
        PreemptionFlag()
        return None
    keep_to_user(run.share_with_group)  # a rank forked from a server made at an earlier launch has its umask
    if run.preemption.enabled:
        PreemptionFlag(run.preemption.signals)
        return run
    for signum in parse_signals(run.preemption.signals):  # a task wrapper started us ignoring them
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the local launcher's ranks start ignoring Ctrl-C
    return run


def wait_for_round() -> None:
    """A standby rank (launch.recovery.standby), its imports done: its round's variables come on stdin; none (the task
    wrapper ended) ends it quietly. Its start-up counts from here."""
    global STARTED
    import gpt.train.trainer  # noqa: F401  the rest of the rank's imports, ahead too
    import torch._dynamo  # noqa: F401  DDP's and FSDP's constructors import it: 1-4 s of a round's model build
    with contextlib.suppress(UserError):  # the round's own read reports it
        # the run's config read ahead too (its schema's first build: 0.14 s idle); the round's read is then cached
        launch_config.load(RunFolder(Path(sys.argv[1])).config)  # while the file stays the same
    line = sys.stdin.readline()
    if not line:
        os._exit(0)
    os.environ.update(json.loads(line))
    STARTED = time.time()


def stopped_with_peer(e: BaseException) -> int:
    """A collective failed after the user's Ctrl-C: the peer that vanished was stopped at once by a second one (two
    presses can reach this rank's handler as one). The user's stop, not a hang to restart from: the launcher records
    it."""
    log.warning("a peer stopped at once (Ctrl-C twice): this rank stops too (%s)", error_line(str(e), limit=200))
    return EXIT_INTERRUPTED


def failed(attempt: Attempt, run: LaunchConfig | None, e: BaseException) -> int:
    """A rank's error that no ending covers: logged and recorded; a peer that vanished ends the attempt as a hang."""
    if run is not None and collective_failed(e):
        abort_like_nccl(run.debug)
    when_a_rank_vanished(attempt, e, run.preemption.max_restarts if run else 0)
    if run is not None and collective_failed(e):  # a peer is gone: its own log and task say why, not this trace
        log.error("rank failed: a collective failed, a peer is gone (%s)", error_line(str(e), limit=200))
    else:
        log.exception("rank failed")
    log_failure(attempt, failure_line(e), peer_gone=collective_failed(e))
    return EXIT_FAILED


def main() -> None:
    if "--standby" in sys.argv[2:]:
        wait_for_round()
    attempt = Attempt(Path(sys.argv[1]))
    run = install_flag(attempt.run_dir)
    handled = parse_signals(run.preemption.signals) if run and run.preemption.enabled else ()
    end_with_launcher(*handled[:1])  # a preemption signal when there is one: the rank saves, then stops
    pause_with_launcher()
    try:
        code = run_rank(attempt, run)
    except UserError as e:
        PROGRESS.stop_if_halted()
        log.error("%s", e)
        code = EXIT_USER
        log_failure(attempt, str(e))
    except RanOutOfMemory as e:  # a smaller micro-batch next (launch.recovery.out_of_memory)
        code = end_out_of_memory(attempt, e, run.preemption.max_restarts if run else 0)
    except Diverged as e:  # every rank at the same step; a failed run, not requeued
        log.error("%s", e, extra={EVERY_RANK: True})
        code = EXIT_FAILED
        log_failure(attempt, str(e), how="diverged")
    except BaseException as e:
        PROGRESS.stop_if_halted()  # a collective the watchdog gave up on failed late: the watchdog ends the rank
        code = stopped_with_peer(e) if run is not None and collective_failed(e) and ctrl_c_pressed() else \
            failed(attempt, run, e)
    attempt.release(code)
    # A hard exit skips gloo's racy teardown ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
