"""What every task of a Slurm job runs: submitit's call under cluster=slurm (srun starts nodes x tasks_per_node
of them), and `python -m launch.backends.slurm.task RUN_DIR` under cluster=srun (sbatch slurm/multi_node.sh).

Each task runs the rank in a child process, `python -m launch.rank.worker RUN_DIR`, the very entry point of the
local backend too. It sees how the rank ends: a rank killed while its host lives requeues the job
(launch.recovery.lost). Why a child and not a call: the worker ends with os._exit to dodge gloo's racy
teardown ("terminate called without an active exception"), and that would also skip submitit writing the
task's result. Here the child may exit hard, and this process (which never imports torch) reports its exit
status to submitit: a result on success, or RankFailed, naming the rank, its host and its log, on failure.

Kept free of heavy imports: it is unpickled in every task before anything else runs.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launch import launch_config
from gpt.errors import EXIT_PREEMPTED, EXIT_USER, UserError
from gpt.resilience.preemption import configured_signals
from gpt.resilience.timing import REQUEUE_WAIT_S
from gpt.run_folder import Next, RunFolder
from launch.rank.job_env import ROUND_VAR, JobEnvironment, job_environment
from launch.rank.rank_watch import RankWatch, signalled_exit_s
from launch.recovery.round_agent import RoundAgent, RoundSilent
from launch.recovery.rounds import RoundUnreadable
from launch.rank.signal_relay import SignalRelay, catches
from launch.recovery.standby import Standby
from launch.rank.threads import ThreadPlan
from launch.backends.slurm.job import gpus_on_node, packed_step_as_job


REFUSED = "stopped the run"  # a rank's UserError (exit code 2): the same command meets it again until it is put right


class RankFailed(RuntimeError):
    """A rank's process failed; the message is what the launcher shows the user."""


class RankStopped(RankFailed):
    """The rank saved after a preemption signal and nothing runs the job again (the site's policy, the restart
    limit): under srun the task exits EXIT_PREEMPTED and the batch step's launcher says it once."""


def standby_wanted(folder: RunFolder) -> bool:
    """preemption.standby_rank for this task's ranks: on GPUs when train.device is auto and Slurm gave this node
    GPUs."""
    run = launch_config.load(folder.config)
    device = run.train.device
    if device == "auto":
        device = "cuda" if gpus_on_node(dict(os.environ)) else "cpu"
    return run.preemption.standby(device)


def missed_preemption(relay: SignalRelay, job: JobEnvironment) -> None:
    """A preemption Slurm signalled before this task's handlers were in place (its SIGTERM was ignored:
    launch.backends.slurm.step.ignoring) is taken as caught now, so that the rank saves and the job requeues (or
    ends) as the site's policy says. One task per node asks Slurm (SLURM_LOCALID 0; every task asking sent thousands
    of scontrol calls to slurmctld within a second): the ranks OR-reduce the preemption flag, so the rank of any task
    that takes it makes every rank save at the same step, and a node that waits as a spare leaves it to the others."""
    if signal.SIGTERM in relay.previous and job.environ.get("SLURM_LOCALID", "0") == "0" and \
            job.preemption() is not None:
        relay.received.append(signal.SIGTERM)


@dataclass(frozen=True)
class RankTask:
    run_dir: str

    def __call__(self) -> dict:
        host = socket.gethostname()
        run_dir = Path(self.run_dir)
        folder = RunFolder(run_dir)
        os.environ.update(packed_step_as_job(os.environ))
        env = {**without_inherited(dict(os.environ), run_dir), **ThreadPlan.from_env().env()}
        # Preemption is the rank's business: on one of preemption.signals (by default USR2, Slurm's time-limit
        # warning or `scancel --signal=USR2`, and TERM, preemption or `scontrol requeue`) every rank sets a flag,
        # all of them save at the same step, and rank 0 requeues the job. submitit's own USR2 handler here would
        # requeue from rank 0 only, with no checkpoint, and exit: replaced by passing the signal on.
        relay = SignalRelay(configured_signals(folder.config))
        sys.excepthook = one_line(sys.excepthook)
        agent = RoundAgent(run_dir, job_environment(env), host)
        agent.share_on_node()
        missed_preemption(relay, agent.job)
        standby = Standby(self.run_dir, env, list(relay.previous), standby_wanted(folder))
        try:
            return self.rounds(relay, agent, standby)
        finally:
            standby.stop()
            agent.release()

    def rounds(self, relay: SignalRelay, agent: RoundAgent, standby: Standby) -> dict:
        """One round of ranks after another, as long as each ends in an in-job restart."""
        k = 0
        while True:
            try:
                place = agent.placement(k)
            except RoundUnreadable as e:
                raise RankFailed(str(e)) from None
            if place is None:  # a spare node this round
                standby.start()
                try:
                    if (k := agent.idle(k)) is None:
                        return {"rank": None, "host": agent.host, "spare": True}
                except RoundSilent as e:
                    raise RankFailed(str(e)) from None
                continue
            result = self.run_round(relay, agent, standby, place, k)
            if result is not None:
                return result
            k += 1

    def run_round(self, relay: SignalRelay, agent: RoundAgent, standby: Standby, place: dict[str, str],
                  k: int) -> dict | None:
        """Round `k` of this task's rank: its result, or None when the next round is asked for (an in-job restart)."""
        rank = int(place.get("SLURM_PROCID", os.environ.get("SLURM_PROCID", "0")))
        host, run_dir = agent.host, Path(self.run_dir)
        os.environ[ROUND_VAR] = str(k)  # this wrapper's job environment is the round's (the attempts log's key)
        started = time.time()
        child = standby.take(place)

        up = functools.partial(started_up, run_dir, rank, child.pid)

        def over() -> bool:
            if agent.in_job_restarts:
                standby.start_when_up(up)  # the next round's rank imports while this one trains
            return agent.next_asked(k)
        folder = RunFolder(run_dir)
        watch = RankWatch(f"rank {rank} on {host}", lambda: agent.attempt_ended(k), signalled_exit_s(folder.config))
        code = relay.wait(child, functools.partial(catches, child.pid), stop=over, watch=watch)
        if agent.next_asked(k, now=True):
            return None
        if watch.killed:
            raise RankFailed(watch.killed)
        if code == EXIT_PREEMPTED:
            raise RankStopped(not_requeued(rank, host, folder, agent.job, k))
        if code < 0 and not relay.received:  # killed, and not as part of a stop Slurm signalled
            next_round = functools.partial(agent.wait_next, k) if agent.in_job_restarts else lambda: False
            if code == -signal.SIGABRT and self.aborted(rank, host, started, next_round):
                return None
            if self.lost(rank, describe_failure(rank, host, code, run_dir, task_output()), started):
                return None
        if code != 0:
            if agent.wait_next(k):
                return None
            raise RankFailed(peer_lost(rank, host, run_dir)
                             or describe_failure(rank, host, code, run_dir, task_output()))
        result = {"rank": rank, "host": host}
        if rank == 0 and (summary := RunFolder(run_dir).read_summary()) is not None:
            result["summary"] = summary
        return result

    def lost(self, rank: int, line: str, started: float, gone: tuple[str, ...] = (), claimed: bool = False) -> bool:
        """The rank vanished without a word (a signal, not an error of its own): restart the ranks inside the
        allocation or requeue the job, unless that would repeat a crash (launch.recovery.lost); `gone`: hosts to
        leave out; `claimed`: this task claimed the attempt already. True: restarted inside the allocation; else this
        waits for Slurm to stop this attempt (exiting first fails the task)."""
        from launch.recovery.lost import requeue_for_lost_rank

        outcome = requeue_for_lost_rank(Path(self.run_dir), rank, line, started, gone, claimed)
        if outcome.runs_again:
            print(f"{line}: {outcome.note}", file=sys.stderr, flush=True)
            if outcome.next is Next.RESTART:
                return True
            if outcome.ends_attempt(job_environment()):  # a packed point's step ends first: its allocation requeues
                time.sleep(REQUEUE_WAIT_S)
        raise RankFailed(f"{line}; {outcome.note}")

    def aborted(self, rank: int, host: str, started: float, next_round: Callable[[], bool]) -> bool:
        """The rank died of SIGABRT: when NCCL aborted it because a peer was lost or failed, fail this task naming
        that peer (one task records the attempt, and restarts or requeues for a lost one, without the peer's host
        when that went too); True when the next round is asked for instead; False when the abort was its own."""
        from launch.recovery.lost import culprit_of_abort, record_failed_peer
        from launch.run.attempts import claim_this_attempt

        run_dir = Path(self.run_dir)
        culprit = culprit_of_abort(run_dir, rank, time.time())
        if culprit is None:
            return False
        survivor = f"rank {rank} on {host} was aborted (SIGABRT, NCCL's error handling) because"
        if culprit.how == "failed":
            line = describe_failure(culprit.rank, culprit.host, culprit.code, run_dir)
            record_failed_peer(run_dir, line)  # by the survivor that claims the attempt
            raise RankFailed(f"{survivor} {line}")
        if culprit.how == "lost" and claim_this_attempt(run_dir, job_environment()):
            return self.lost(culprit.rank, f"rank {culprit.rank} on {culprit.host} was lost (its heartbeat stopped)",
                             started, (culprit.host,) if culprit.host_gone else (), claimed=True)
        if next_round():  # the task that recorded the loss restarts the ranks inside the allocation
            return True
        if culprit.how == "aborted first":
            raise RankFailed(f"{survivor} rank {culprit.rank} on {culprit.host} aborted first")
        raise RankFailed(f"rank {rank} on {host} stopped because rank {culprit.rank} was lost")


def peer_lost(rank: int, host: str, run_dir: Path) -> str | None:
    """When another rank's task recorded it vanishing, this rank's error (its collective failed) is only that."""
    from launch.run.attempts import this_attempts_line

    line = this_attempts_line(run_dir, job_environment())
    lost = line.lost_rank if line else None
    if lost is None or lost == rank:
        return None
    return f"rank {rank} on {host} stopped because rank {lost} was lost"


def one_line(hook):
    """The excepthook for submitit's job process: a RankFailed (the restart limit's stop too) is one line in the
    task's error file, as it is to the launcher, which reads it from submitit's result; other errors keep their
    traceback."""
    def said(kind, error, tb):
        if isinstance(error, RankFailed):
            print(f"error: {error}", file=sys.stderr, flush=True)
        else:
            hook(kind, error, tb)
    return said


def main() -> None:
    """Under srun (sbatch slurm/multi_node.sh, cluster=srun): the same wrapper; its failure is one line, exit 1."""
    try:
        RankTask(sys.argv[1])()
    except RankStopped:  # the rank's log said so; the batch step's launcher says it once for the job
        sys.exit(EXIT_PREEMPTED)
    except (RankFailed, UserError) as e:  # a run config that cannot be read (gpt.config.schema.load) too
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def without_inherited(env: dict[str, str], run_dir: Path) -> dict[str, str]:
    """The task's environment less the torchrun-style variables the submitting shell passed in (recorded at
    submission, in slurm_job.json): Slurm's own variables place the rank. Ones the job set itself stay."""
    try:
        inherited = json.loads(RunFolder(run_dir).slurm_job.read_text()).get("inherited", {})
    except (OSError, ValueError):
        return env
    dropped = sorted(k for k, v in inherited.items() if env.get(k) == v)
    if dropped:
        print(f"warning: ignoring {', '.join(dropped)} inherited from the shell that submitted the job: Slurm's own "
              "variables place the ranks", file=sys.stderr, flush=True)
    return {k: v for k, v in env.items() if k not in dropped}


def started_up(run_dir: Path, rank: int, pid: int) -> bool:
    """The rank process `pid` has done its imports: its environment record is written."""
    try:
        return json.loads(RunFolder(run_dir).environment_record(rank).read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def describe_failure(rank: int, host: str, code: int, run_dir: Path, output: Path | None = None) -> str:
    """One line: which rank, where, how it ended, its last error, and where to read more."""
    log_file = RunFolder(run_dir).log(rank)
    if code == EXIT_USER:  # the run's own refusal (other data, a folder in use): the whole of it, not a sentence
        return f"rank {rank} on {host} {REFUSED}: {last_error(log_file, whole=True)} (its log: {log_file})"
    if code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
    else:
        how = f"exited with code {code}"
    last, where = last_error(log_file), log_file
    if not last and output is not None:  # it failed before its log was set up: the traceback is in the output
        last = last_traceback_line(output)
        if last or not log_file.exists():
            where = output
    if last.startswith(f"rank {rank} "):  # our own errors already say which rank, and where
        return f"{last} (its log: {where})"
    return f"rank {rank} on {host} {how}{': ' + last if last else ''} (its log: {where})"


def _read(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _short(message: str, limit: int = 300) -> str:
    """torch's errors run on for several sentences; the first one says what happened."""
    message = message.strip()
    first = message.split(". ", 1)[0]
    return (first if len(first) > 20 else message)[:limit]


def last_error(log_file: Path, whole: bool = False) -> str:
    """The last error a rank logged: its message (`whole`: every line of it, joined), or the last line of its
    traceback."""
    lines = _read(log_file)
    for i in range(len(lines) - 1, -1, -1):
        if " ERROR] " in lines[i]:
            message = lines[i].split(" ERROR] ", 1)[1].strip()
            tail = [x for x in lines[i + 1:] if x.strip() and not x.startswith("[rank")]
            if tail and tail[0].startswith("Traceback"):
                return _short(tail[-1].strip())
            return _joined([message, *(x.strip() for x in tail)])[:2000] if whole else _short(message)
    return ""


def _joined(lines: list[str]) -> str:
    """A message's lines as one: a line that introduces the next ("The 2 keys that differ:") runs on into it."""
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text


def last_traceback_line(output: Path) -> str:
    lines = _read(output)
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback"):
            tail = [x for x in lines[i + 1:] if x.strip() and not x.startswith((" ", "\t"))]
            return _short(tail[0]) if tail else ""
    return ""


def task_output() -> Path | None:
    """This task's error output file (submitit's), where a rank's early traceback lands."""
    try:
        from submitit import JobEnvironment

        return Path(JobEnvironment().paths.stderr)
    except Exception:  # not under submitit
        return None


def not_requeued(rank: int, host: str, folder: RunFolder, job: JobEnvironment, k: int) -> str:
    """A rank that saved on a signal and was not requeued: why, as its attempt's line says (a preemption Slurm's
    policy cancels, the restart limit), else where to look."""
    try:
        line = folder.attempts.line_of(job.job_id, job.restart, k, job.launch)
    except OSError:
        line = None
    why = f"{line.ended}; {line.note}" if line is not None and line.note else f"see {folder.attempts.log}"
    return (f"rank {rank} on {host} stopped after a preemption signal and saved a checkpoint, but the job was not "
            f"requeued ({why}); submit the same command again to resume")


if __name__ == "__main__":
    main()
