"""The embedded default backend: a sweep point's ranks run as processes on this machine, through the same
per-rank entry point (launch.rank.worker) that srun starts on a cluster. They fork from one preloaded server per
launcher (launch.rank.forked), each in a session of its own; rank 0 serves their store, as on a cluster, on a
socket this launcher bound. This launcher watches them and stops the others once one fails, as torch's elastic agent
does. This module imports no torch: the server imports it once for every rank of every round and sweep point."""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpt.errors import EXIT_HANG, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER, UserError
from launch.recovery.hang import newest_hang
from gpt.run_folder import CTRL_C, RunFolder
from launch.backends import Backend, RunFailed
from launch.local_gpus import gpus_visible
from launch.rank import forked
from launch.rank.job_env import LAUNCH_VAR, ROUND_VAR, JobEnvironment, job_environment, new_launch
from launch.rank.parent import LAUNCHER_PID, PARENT_PID, PAUSE_POLL_S
from launch.rank.signal_relay import catches
from launch.recovery.rounds import IN_JOB, Rounds
from launch.recovery.lost import record_lost_rank
from launch.run.attempts import log_killed
from launch.run.identity import newest_step
from launch.run.startup import attempt_start_env
from launch.rank.threads import WAIT_POLICY, ThreadPlan
from gpt.resilience.timing import RELAY_POLL_S

RANK_START = "GPTLAUNCH_RANK_START"  # forkserver or spawn; unset: forkserver, or spawn where GPUs are visible
STOP_GRACE_S = 30  # once a rank failed, the others' time to end after SIGTERM before SIGKILL (torch's agent's)
_running: list[multiprocessing.Process] = []  # this round's ranks, for the signal relay


def run_local(run_dir: Path, nodes: int, tasks_per_node: int) -> JobEnvironment:
    """The ranks, and again in a new round each time one ends in an in-job restart (launch.recovery.rounds); the job
    environment of the last round."""
    launch_id = new_launch()
    k = 0
    # Ctrl-C and SIGTERM reach the ranks too: they save at the next step and stop. One caught while a round's ranks
    # start, or between rounds, waits for them.
    with _signals_relayed() as relay:
        while not run_round(run_dir, nodes, tasks_per_node, {ROUND_VAR: str(k), LAUNCH_VAR: launch_id}, relay):
            k += 1
    return job_environment({**os.environ, ROUND_VAR: str(k), LAUNCH_VAR: launch_id})


def run_round(run_dir: Path, nodes: int, tasks_per_node: int, round_env: dict[str, str], relay: HeldSignals) -> bool:
    """One round of the ranks: True when they finished, False when the next round is asked for."""
    world = nodes * tasks_per_node
    # Every rank shares this machine's CPUs. The ranks get their settings in their own environment: this process's
    # stays as the user left it, so that nothing carries over from one sweep point to the next.
    plan, start = ThreadPlan.decide(ranks_on_host=world), attempt_start_env()
    starter = RankStarter.get(plan.wait_policy)
    job = job_environment({**os.environ, **round_env})  # the ranks' (inside an allocation, its job's)
    with store_socket() as store:
        common = {**os.environ, **plan.env(), **start, "GPTLAUNCH_TASKS_PER_NODE": str(tasks_per_node),
                  LAUNCHER_PID: str(os.getpid()), PARENT_PID: str(starter.parent_pid), "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(store.getsockname()[1]), "WORLD_SIZE": str(world),
                  "LOCAL_WORLD_SIZE": str(world), **round_env}
        failures = starter.run(str(run_dir), [{**common, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(world)],
                               store, relay)
    if not failures:
        return True
    rank, code = root_failure(failures)
    if code == EXIT_INTERRUPTED or relay.stopped_at_once:  # over any round a rank asked for after it (a peer gone)
        record_ctrl_c_twice(run_dir)
        raise UserError(_failure(run_dir, rank, EXIT_INTERRUPTED)) from None
    if code < 0 and code != -signal.SIGTERM:  # killed, not stopped by this launcher
        record_lost_rank(run_dir, rank, f"rank {rank} was killed by {signal.Signals(-code).name}", job)
    if Rounds.of(run_dir, job).path(job.round + 1).exists():
        print(f"{_failure(run_dir, rank, code)}: {IN_JOB} (round {job.round + 1})", file=sys.stderr, flush=True)
        return False
    if code in (EXIT_USER, EXIT_PREEMPTED):  # the user's error, or signal: 2
        raise UserError(_failure(run_dir, rank, code)) from None
    raise RunFailed(_failure(run_dir, rank, code)) from None  # a failed run: 1


@dataclass(frozen=True)
class Failure:
    code: int     # the exit code; negative: killed by that signal
    seen: float   # when this launcher saw the rank end


ABORT_GRACE_S = 2.0  # how long aborted survivors wait for their peer's own end to be seen


def root_failure(failures: dict[int, Failure]) -> tuple[int, int]:
    """The rank that failed first, and its exit code. A rank that died of SIGABRT comes after any other: on GPUs
    NCCL aborts every survivor of a lost or failed peer, often before its launcher looks again."""
    rank = min(failures, key=lambda r: (failures[r].code == -signal.SIGABRT, failures[r].seen, r))
    return rank, failures[rank].code


class RankStarter:
    """Starts a round's ranks and waits for them: forked from this launcher's preloaded server (launch.rank.forked),
    or, where GPUs are visible (or GPTLAUNCH_RANK_START=spawn), as fresh interpreters."""
    _one: RankStarter | None = None

    def __init__(self, method: str):
        self.method = method
        self.context = multiprocessing.get_context(method)
        self.server_started: float | None = None

    @classmethod
    def get(cls, wait_policy: str) -> RankStarter:
        if cls._one is None:
            cls._one = cls(os.environ.get(RANK_START) or _default_method())
        cls._one.ensure_server(wait_policy)
        return cls._one

    def ensure_server(self, wait_policy: str) -> None:
        """The server imports torch, and OpenMP reads its settings once, as it loads: the server starts with the
        ranks' wait policy. A server that died (killed) is started again."""
        if self.method != "forkserver":
            return
        server = multiprocessing.forkserver._forkserver
        if server._forkserver_pid is not None and os.waitpid(server._forkserver_pid, os.WNOHANG) == (0, 0):
            return
        multiprocessing.forkserver.set_forkserver_preload(forked.PRELOAD)
        saved = os.environ.get(WAIT_POLICY)
        os.environ[WAIT_POLICY] = wait_policy
        try:
            with _ignored_by_children():
                multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.pop(WAIT_POLICY) if saved is None else os.environ.update({WAIT_POLICY: saved})
        self.server_started = time.time()

    @property
    def parent_pid(self) -> int:
        """The ranks' parent: the server they fork from, or this launcher."""
        server = multiprocessing.forkserver._forkserver._forkserver_pid
        return server if self.method == "forkserver" and server is not None else os.getpid()

    def run(self, run_dir: str, envs: list[dict[str, str]], store: socket.socket,
            relay: HeldSignals | None = None) -> dict[int, Failure]:
        """Start a rank per environment and wait: {} when every rank ended 0, else the ranks that had failed when
        this launcher first saw one fail (the others are then stopped). `store`: the listening socket that rank 0's
        store serves on (store_socket), closed here once rank 0 has its copy. `relay`: the signals to pass on."""
        imports_from = self.server_started
        self.server_started = None  # its imports count for this round's ranks alone
        _running[:] = [self.context.Process(target=forked.start, daemon=False, args=(
            run_dir, env, imports_from, forked.Stdio(), forked.StoreSocket(store.fileno()) if env["RANK"] == "0"
            else None)) for env in envs]
        try:
            for process in _running:
                process.start()
            # rank 0 alone listens from here: were it to die, the others' connections fail at once (not queue here)
            store.close()
            return _wait(_running, relay or HeldSignals())
        finally:
            _stop(_running)
            _running.clear()


@contextlib.contextmanager
def _ignored_by_children():
    """Ctrl-C and SIGTERM ignored by a process started meanwhile: the rank server starts in this launcher's process
    group, and leaves it first thing (launch.rank.rank_server). Here they wait, blocked, for the handlers restored
    after (Linux keeps a blocked signal pending even while it is ignored)."""
    signals = {signal.SIGINT, signal.SIGTERM}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    handlers = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _default_method() -> str:
    """Spawn where a GPU is visible (a fork after CUDA is touched cannot use it; the forked start is unmeasured on
    GPUs)."""
    return "spawn" if gpus_visible() else "forkserver"


def store_socket() -> socket.socket:
    """A socket listening on a port of this machine that the kernel picked: rank 0's store serves on it, so the port
    stays this run's from its choice on (a port found free and bound later could be taken in between)."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        s.listen()
    except OSError:
        s.close()
        raise
    return s


def _wait(ranks: list[multiprocessing.Process], relay: HeldSignals) -> dict[int, Failure]:
    """The ranks that failed, once one has (or none, once all ended), passing `relay`'s signals on meanwhile. Aborts
    alone wait up to ABORT_GRACE_S for the failure that caused them: a forked rank's end reaches this launcher
    through its server, in no set order."""
    seen: dict[int, float] = {}
    while True:
        relay.pass_on(ranks)
        for r, process in enumerate(ranks):
            if r not in seen and process.exitcode is not None:
                seen[r] = time.time()
        failures = {r: Failure(ranks[r].exitcode, t) for r, t in seen.items() if ranks[r].exitcode != 0}
        only_aborts = failures and all(f.code == -signal.SIGABRT for f in failures.values())
        if len(seen) == len(ranks) or (failures and not only_aborts) or \
                (only_aborts and time.time() - min(f.seen for f in failures.values()) > ABORT_GRACE_S):
            return failures
        multiprocessing.connection.wait([p.sentinel for r, p in enumerate(ranks) if r not in seen],
                                        timeout=RELAY_POLL_S if relay.held(ranks) else 0.5)


def _stop(ranks: list[multiprocessing.Process]) -> None:
    """Ranks still running after one failed: SIGTERM (they save if they can), then SIGKILL after STOP_GRACE_S."""
    for process in ranks:
        if process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in ranks:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            process.kill()
            process.join()


def _failure(run_dir: Path, rank: int, code: int) -> str:
    again, folder = continue_command(), RunFolder(run_dir)
    if code == EXIT_PREEMPTED:
        return (f"stopped after a signal; every rank saved a checkpoint in {folder.checkpoints}. "
                f"Continue with:\n  {again}")
    if code == EXIT_INTERRUPTED:
        step = newest_step(run_dir)
        if step is None:
            return ("stopped at once (Ctrl-C twice), before its first checkpoint: the same command starts it "
                    f"over:\n  {again}")
        return (f"stopped at once (Ctrl-C twice); the newest checkpoint (step {step}) in {folder.checkpoints} is kept. "
                f"Continue with:\n  {again}")
    if code == EXIT_HANG:
        return newest_hang(run_dir) or f"rank {rank}'s watchdog saw a hang; its log: {folder.logs}"
    if code < 0:
        return f"rank {rank} was killed by {signal.Signals(-code).name}; its log: {folder.log(rank)}"
    hint = "a configuration error (see above)" if code == EXIT_USER else f"exit code {code}"
    return f"rank {rank} failed with {hint}; its log: {folder.log(rank)}"


def record_ctrl_c_twice(run_dir: Path) -> None:
    """Ranks stopped at once write no line of their own (os._exit in the signal handler): the attempt's line, with
    the time and steps it spent since its newest checkpoint counted as lost, says Ctrl-C, not "killed outright"."""
    mark = RunFolder(run_dir).attempts.read_mark()
    if mark is not None:
        log_killed(run_dir, mark, newest_step(run_dir) or mark.get("first_step") or 0,
                   {"ended": CTRL_C, "requeued": False})


def continue_command() -> str:
    """The command this process was started with: the same command continues the run."""
    return " ".join(["python -m launch", *map(shlex.quote, sys.argv[1:])])


def _send(signum: int) -> None:
    for process in list(_running):  # pids alone: a signal handler must not poll the ranks the main flow waits on
        if process.pid is not None:
            _kill(process.pid, signum)


class HeldSignals:
    """Ctrl-C, SIGTERM and SIGHUP as this launcher caught them, passed on, in order, to each rank once it handles
    them: a rank starts with Ctrl-C ignored (launch.rank.rank_server) until its flag is in place
    (launch.rank.worker.install_flag), so one sent in its seconds of start-up would be lost. A second Ctrl-C stops
    at once: a rank that had not taken the first yet is killed (in its start-up it has nothing to save), as two
    signals sent together could reach its handler as one."""

    def __init__(self):
        self.received: list[int] = []
        self.passed: dict[int, int] = {}  # a rank's pid: how many of `received` it got
        self.busy = False

    @property
    def stopped_at_once(self) -> bool:
        return self.received.count(signal.SIGINT) >= 2

    def catch(self, signum: int) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            print(f"\n{signal.Signals(signum).name}: every rank saves at its next step, then stops{again}",
                  file=sys.stderr, flush=True)
        self.pass_on(_running)

    def held(self, ranks: list[multiprocessing.Process]) -> bool:
        """Whether a rank still waits for a signal."""
        return any(self.passed.get(p.pid, 0) < len(self.received) for p in ranks if p.pid is not None)

    def pass_on(self, ranks: list[multiprocessing.Process]) -> None:
        """What each started rank can take now. From the signal handler and the launcher's wait alike: the one
        interrupted leaves it to the other (its next poll), so that no signal goes to a rank twice."""
        if self.busy:
            return
        self.busy = True
        try:
            for pid in [p.pid for p in ranks if p.pid is not None]:  # pids alone: no poll from a signal handler
                self._pass_to(pid)
        finally:
            self.busy = False

    def _pass_to(self, pid: int) -> None:
        if self.stopped_at_once and not self.passed.get(pid):  # twice before it took the first: in its start-up
            _kill(pid, signal.SIGKILL)
            self.passed[pid] = len(self.received)
        while (n := self.passed.get(pid, 0)) < len(self.received) and catches(pid, signal.SIGINT):  # its flag is in
            _kill(pid, self.received[n])
            self.passed[pid] = n + 1


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


@contextlib.contextmanager
def _signals_relayed():
    """Ctrl-C, SIGTERM and SIGHUP (a process manager, `kill`, a terminal closing) are passed on to the ranks
    (HeldSignals, yielded): the first makes them save at the next step and stop; a second Ctrl-C stops them at once.
    Ctrl-Z pauses the ranks and then this launcher, and SIGCONT (`fg`, `bg`, `kill -CONT`) resumes them: each rank's
    session is an orphaned process group, where the kernel drops SIGTSTP, so the ranks get SIGSTOP, and so does this
    process (its own group may be orphaned too, as under `setsid`). A plain SIGSTOP reaches this process alone: the
    ranks stop themselves (launch.rank.parent)."""
    relay = HeldSignals()

    def pause(signum, frame) -> None:
        _send(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)  # here until SIGCONT, whose handler resumes the ranks

    def resume(signum, frame) -> None:
        _send(signal.SIGCONT)
        # a rank that saw this launcher stopped just before (launch.rank.parent) may stop itself after that
        again = threading.Timer(2 * PAUSE_POLL_S, _send, (signal.SIGCONT,))
        again.daemon = True
        again.start()

    def handle(signum, frame) -> None:
        relay.catch(signum)

    previous = {s: signal.signal(s, handler) for s, handler in ((signal.SIGINT, handle), (signal.SIGTERM, handle),
                                                              (signal.SIGHUP, handle), (signal.SIGTSTP, pause),
                                                              (signal.SIGCONT, resume))}
    try:
        yield relay
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class LocalBackend(Backend):
    name = "local"

    def run(self, plan) -> JobEnvironment:
        return run_local(plan.run_dir, plan.nodes, plan.tasks_per_node)
