"""A run folder's layout: the name of every file a run keeps (runs/<run>, or a sweep's point under
runs/sweeps/<sweep>/), and the attempts log. Torch-free and scheduler-free: the launcher on a login node, every
rank, a task wrapper and the report all find the files here.

    config.yaml           the resolved config, written by the launcher and read by every rank
    run.json              what must not change for the run to continue (launch.run.identity)
    lease.json            the one writer's lease beat (gpt.resilience.lease, launch.run.take_lease); lock.json in
                          folders written before it was renamed, still read there
    lease/<G>             the claim of the lease's generation G, created once each
    attempts.jsonl        one line per attempt, written when it ends (AttemptsLog)
    attempt-claims/<key>  created once by the one writer of that attempt's line (AttemptsLog)
    attempt.json          the mark of the attempt in flight (AttemptsLog)
    rounds/<attempt>/round-<K>.json   the request for in-job round K of a job's attempt (launch.recovery.rounds)
    summary.json          rank 0's summary of a finished run
    slurm_job.json        the Slurm job that runs it, written at submission
    job.json              the scheduler's job its ranks run in, as they see it, on every path (launch.run.job_record)
    cancel.json           the jobs launch.cancel stops: their ranks save and stop, not requeue (launch.run.job_record)
    code.json             the code snapshot its newest submission runs: path, commit, dirty (launch.snapshot)
    logs/rank<R>.log      each rank's log
    environment/rank<R>.json, environment/rendezvous.json    where and how each rank ran
    metrics/rank<R>.jsonl, tensorboard/rank<R>/              per-rank metrics
    eval-jobs/step<N>.json   the evaluation job of the checkpoint of step N, submitted once (eval.after_save=job)
    metrics/eval_jobs.jsonl, tensorboard/eval_jobs/          those jobs' figures, a line per checkpoint scored
    watchdog/node-<H>.json   the heartbeats of host H's ranks (launch.recovery.node_heartbeat)
    watchdog/rank<R>.json each rank's last heartbeat once it ended (launch.recovery.heartbeat)
    watchdog/node-secret  the run's secret (mode 0600): part of its nodes' folder names in memory
    hang-<N>.json, hang-<N>.txt, flight-recorder-<N>-rank<R>.json  the hang report of attempt N
    nccl-flight-recorder-rank<R>    NCCL's own dump when it times out
    health-<N>.json, health/    the health checks of attempt N, and their storage probe's files
    checkpoints/          gpt.checkpoint
    save-failures.jsonl   the interval saves storage refused under checkpoint.on_save_error=continue, as they happen
    report/, tensorboard/scaling/   the scaling report (of a run folder, or of a sweep folder)
    .hydra/overrides.yaml Hydra's record of a sweep point's overrides
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

STOPPED_EARLY = "stopped early"  # how the attempts line of a sweep point stopped at a rung begins
# A run folder is closed to everyone but its user (0700), or open to its group for reading (share_with_group: 0750):
# what it holds is out of others' reach whatever its own modes. Nothing a run's processes create is writable by
# anyone else (a site's umask 002 let a group write checkpoints and the job's pickles), and under share_with_group
# the group may read it. Files outside run folders (a prepared corpus) otherwise keep the user's umask.
NEVER_WRITABLE, GROUP_READS = 0o022, 0o050


def keep_to_user(share_with_group: bool) -> None:
    """This process, and what it starts, create nothing that group or others may write; with share_with_group,
    nothing that the group may not read."""
    mask = os.umask(0) | NEVER_WRITABLE
    os.umask(mask & ~GROUP_READS if share_with_group else mask)


def close_folder(folder: Path, share_with_group: bool) -> None:
    """`folder` (a run's or a sweep's, made before this process read its config): its user's alone (0700), or open
    to the group for reading (0750); and keep_to_user for what this process creates in it."""
    keep_to_user(share_with_group)
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):  # another user's folder: the run folder's checks say so
        os.chmod(folder, 0o750 if share_with_group else 0o700)


def write_json(path: Path, record: Any, indent: int | None = None) -> None:
    """Write `record` as JSON so that a reader (another rank, the launcher, a test) sees the old file or the new one,
    never half of one. The temporary name is the writer's own (host, pid, thread): the tasks of a job, on hosts whose
    pids may collide, may write one file at once."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=indent))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no temporary file behind
        raise


def claim(path: Path, text: str = "") -> bool:
    """The one claim of a run folder (an attempt's line, a hang report, an in-job round, a lease generation): True for
    the first process of any host to create `path`, False for every other. `text` is in the file as it appears (a
    hard link of a finished temporary file). Errors other than "it exists" are the caller's (the storage failed)."""
    if not text:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        return True
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def read_json_lines(path: Path) -> list[Any]:
    """Each line of a JSON-lines file, oldest first; none if it cannot be read. A line cut short (its writer was
    killed, or is still writing) is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


# A metrics record's own field: its step counts the steps done, as checkpoints and the log count them (the log's
# `step 10/100` is step 10). A train or memory record written before it (an older run folder) counted from 0: the
# index of its step, one less.
STEP_COUNTS = "step_counts"


def in_steps_done(record: Any) -> Any:
    """A metrics record with its step as the steps done, whichever way it was written."""
    old = isinstance(record, dict) and STEP_COUNTS not in record and isinstance(record.get("step"), int) \
        and record.get("kind", "train") in ("train", "memory")
    return {**record, "step": record["step"] + 1} if old else record


def read_metrics_lines(path: Path) -> list[Any]:
    """A metrics file's records (read_json_lines), every step counting the steps done (in_steps_done)."""
    return [in_steps_done(r) for r in read_json_lines(path)]


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder's files (AttemptsLog writes the attempts log; the one record written here is
    rank 0's line per refused save, note_save_failure)."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def identity(self) -> Path:
        return self.path / "run.json"

    @property
    def lease_beat(self) -> Path:
        return self.path / "lease.json"

    @property
    def lease_beat_before_rename(self) -> Path:
        """The beat's name until the lease had one name: a folder whose holder still beats it stays held."""
        return self.path / "lock.json"

    @property
    def lease_claims(self) -> Path:
        return self.path / "lease"

    @property
    def launch_lock(self) -> Path:
        """flock'd by the launch that plans the folder (launch.run.launch_lock)."""
        return self.path / ".launch.lock"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def slurm_job(self) -> Path:
        return self.path / "slurm_job.json"

    @property
    def job(self) -> Path:
        return self.path / "job.json"

    @property
    def cancel_request(self) -> Path:
        return self.path / "cancel.json"

    @property
    def code(self) -> Path:
        return self.path / "code.json"

    @property
    def attempts(self) -> AttemptsLog:
        return AttemptsLog(self.path / "attempts.jsonl", self.path / "attempt.json", self.path / "attempt-claims")

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    @property
    def environment(self) -> Path:
        return self.path / "environment"

    def environment_record(self, rank: int) -> Path:
        return self.environment / f"rank{rank}.json"

    def environment_records(self) -> list[Path]:
        return sorted(self.environment.glob("rank*.json"))

    @property
    def rendezvous(self) -> Path:
        return self.environment / "rendezvous.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"

    def metrics_file(self, rank: int) -> Path:
        return self.metrics / f"rank{rank}.jsonl"

    def metrics_files(self) -> list[Path]:
        return sorted(self.metrics.glob("rank*.jsonl"))

    @property
    def eval_jobs_metrics(self) -> Path:
        return self.metrics / "eval_jobs.jsonl"

    @property
    def eval_jobs_board(self) -> Path:
        return self.tensorboard / "eval_jobs"

    def eval_job(self, step: int) -> Path:
        return self.path / "eval-jobs" / f"step{step}.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    def tensorboard_run(self, rank: int) -> Path:
        return self.tensorboard / f"rank{rank}"

    @property
    def scaling_board(self) -> Path:
        return self.tensorboard / "scaling"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def watchdog(self) -> Path:
        return self.path / "watchdog"

    def heartbeat(self, rank: int) -> Path:
        return self.watchdog / f"rank{rank}.json"

    def node_heartbeat(self, host: str) -> Path:
        return self.watchdog / f"node-{host}.json"

    @property
    def node_secret(self) -> Path:
        return self.watchdog / "node-secret"

    @property
    def rounds(self) -> Path:
        """The in-job restarts' requests, one file per round of a job's attempt (launch.recovery.rounds)."""
        return self.path / "rounds"

    def hang_report(self, attempt: str | int) -> tuple[Path, Path]:
        """The hang report of the attempt named `attempt` (launch.run.attempts.hang_report_name): (the record, the
        text a person reads)."""
        return self.path / f"hang-{attempt}.json", self.path / f"hang-{attempt}.txt"

    def hang_records(self) -> list[Path]:
        return list(self.path.glob("hang-*.json"))

    def flight_recorder(self, attempt: str | int, rank: int) -> Path:
        return self.path / f"flight-recorder-{attempt}-rank{rank}.json"

    @property
    def nccl_dump_prefix(self) -> Path:
        """NCCL's flight recorder appends the rank to this name when it dumps on its own."""
        return self.path / "nccl-flight-recorder-rank"

    def health_record(self, attempt: int) -> Path:
        return self.path / f"health-{attempt}.json"

    def health_records(self) -> list[Path]:
        """The health checks' records, oldest attempt first."""
        return sorted(self.path.glob("health-*.json"), key=lambda f: int(f.stem.split("-")[1]))

    @property
    def health_probes(self) -> Path:
        """Where the storage check writes and reads back its files."""
        return self.path / "health"

    @property
    def profiles(self) -> Path:
        """profile.*: the traces and memory snapshots, one folder per attempt (a requeue never overwrites them)."""
        return self.path / "profiles"

    def profile_trace(self, attempt: int, rank: int) -> Path:
        """A rank's torch.profiler trace (Chrome trace JSON: Perfetto, TensorBoard's trace viewer)."""
        return self.profiles / f"attempt-{attempt}" / f"rank{rank}.pt.trace.json"

    def profile_traces(self) -> list[Path]:
        return sorted(self.profiles.glob("attempt-*/rank*.pt.trace.json"))

    def memory_snapshot(self, attempt: int, rank: int, why: str) -> Path:
        """A rank's CUDA memory snapshot (pytorch.org/memory_viz), `why`: oom, steps (after the traced ones), or
        step<N> (asked for while it ran)."""
        return self.profiles / f"attempt-{attempt}" / f"rank{rank}-memory-{why}.pickle"

    @property
    def snapshot_request(self) -> Path:
        """Written anew by `python -m launch.memory_snapshot`: each rank keeping the allocator's history writes a
        memory snapshot after its step."""
        return self.profiles / "snapshot-request"

    @property
    def compile_cache(self) -> Path:
        """torch.compile's caches (Inductor's FX graphs, AOTAutograd's, Triton's kernels), kept for the next attempt."""
        return self.path / "compile_cache"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def save_failures(self) -> Path:
        return self.path / "save-failures.jsonl"

    def note_save_failure(self, step: int, error: str) -> None:
        """Rank 0's record of a save storage refused while the run trains on (the waiter tells it at once). Best
        effort: the run folder may be on the storage that refused the save, and the rank's log has it anyway."""
        with contextlib.suppress(OSError), self.save_failures.open("a") as f:
            f.write(json.dumps({"step": step, "error": error}) + "\n")

    def read_save_failures(self) -> list[dict[str, Any]]:
        """The records of note_save_failure, oldest first; a line still being written is left for the next read."""
        return [r for r in read_json_lines(self.save_failures) if isinstance(r, dict)]

    def read_summary(self) -> dict[str, Any] | None:
        """Rank 0's summary of the finished run; None before it is written (or if it cannot be read)."""
        try:
            summary = json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    @property
    def hydra_overrides(self) -> Path:
        return self.path / ".hydra" / "overrides.yaml"

    def is_run(self) -> bool:
        """A folder that holds a run the report can read: its config next to its metrics."""
        return self.config.is_file() and self.metrics.is_dir()


_NAMES = RunFolder(Path())  # the layout's names, relative
# Folders that hold no run of their own: a search for run folders below a sweep folder skips them.
NOT_RUNS = tuple(str(p) for p in (_NAMES.report, _NAMES.tensorboard, _NAMES.hydra_overrides.parent,
                                  _NAMES.checkpoints, _NAMES.logs))


# How an attempt the user ended ended, in its line: neither a preemption nor a failure, and not a fault of the run
CANCELLED = "cancelled by the user"  # scancel, launch.cancel
CTRL_C = "Ctrl-C"  # a local run stopped from its terminal


class Next(Enum):
    """What follows an attempt that ended early, in order of cost (launch.recovery.decision decides it)."""

    CONTINUE = "continue"  # nothing ends: training goes on (a flagged node kept where no requeue could leave it out)
    RESTART = "restart inside the allocation"  # the next in-job round (launch.recovery.rounds)
    REQUEUE = "requeue"  # the scheduler runs the job again, without the named hosts where there are some
    NEXT_LINK = "next chain link"  # a later job of the chain (cluster.chain) continues the run
    STOP = "stop"  # nothing runs the job again: the same command continues the run


# A requeue's note when the scheduler took the hosts to leave out (launch.backends: requeue_excluding)
REQUEUED_WITHOUT = re.compile(r", without ([^\s,:()]+(?:,[^\s,:()]+)*) \(")


def excluded_hosts(attempts: list[AttemptLine]) -> list[str]:
    """Every host the run's attempts were kept off (AttemptLine.excluded), in the order they were first."""
    return list(dict.fromkeys(h for a in attempts for h in a.excluded))


@dataclass(frozen=True)
class AttemptLine:
    """One line of the attempts log, as every reader sees it. A key an older line lacks reads as its default; the
    nested records stay their owners' (`goodput`: gpt.resilience.goodput, `startup`: launch.run.startup), and keys
    this record does not name (the hang report, the health figures, a straggler) are kept in `extra`."""

    job_id: str | None = None
    restart: int = 0
    round: int = 0  # the in-job round of the job's attempt (launch.recovery.rounds)
    launch: str = ""  # which launch inside the job (several may share one allocation)
    time: float = 0.0  # when the line was written
    first_step: int | None = None
    last_step: int | None = None  # the step the run resumes from after it: its newest checkpoint then
    trained_to: int | None = None  # an attempt that ended past its last save: the last step it trained
    ended: str = ""  # "finished", "hang", "preempted:SIGTERM", "preempted by another job (...)", "node failure: ...",
    # "excluded n1", "failed: ...", "stopped early at step S ..." (STOPPED_EARLY)
    requeued: bool = False  # the job asked the scheduler to run it again
    in_job_restart: int = 0  # the round it asked for inside the allocation (0: none)
    next_link: str | None = None  # the chain's job that continues the run
    note: str = ""  # how the run goes on, or why it does not, in words
    lost_rank: int | None = None  # the rank that vanished
    out_of_memory: Mapping[str, Any] | None = None  # a rank ran out (launch.recovery.out_of_memory)
    replaced: Mapping[str, str] = field(default_factory=dict)  # lost host -> the spare that takes its place
    shrunk: Mapping[str, int] | None = None  # {"from": W, "to": W'} ranks: on the nodes left (launch.recovery.shrink)
    nodes: tuple[str, ...] = ()  # the hosts the attempt ran on, in rank order
    failed_saves: tuple[int, ...] = ()  # steps whose interval save storage refused (checkpoint.on_save_error)
    # how long its end went unseen, by what it was ({"hang": s} or {"lost node": s}): from its last progress to the
    # hang report, or to the scheduler's word on a lost node (gpt.resilience.goodput counts it as its own loss)
    detection_s: Mapping[str, float] = field(default_factory=dict)
    goodput: Mapping[str, Any] | None = None
    startup: Mapping[str, float] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> AttemptLine:
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        values["nodes"] = tuple(values.get("nodes", ()))
        values["failed_saves"] = tuple(values.get("failed_saves", ()))
        values["ended"] = str(values.get("ended", ""))
        values["note"] = str(values.get("note", ""))
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})

    @property
    def next(self) -> Next:
        """What followed this attempt, from its line (older lines say it the same way)."""
        if self.in_job_restart:
            return Next.RESTART
        if self.requeued:
            return Next.REQUEUE
        return Next.NEXT_LINK if self.next_link else Next.STOP

    @property
    def excluded(self) -> tuple[str, ...]:
        """The hosts this attempt's end kept the run's later attempts off, whatever named them (a health check, a
        hang, a lost node, a straggler): those its requeue left out (its note, as the scheduler's backend words it:
        `..., without H1,H2 (HOW)`, the job's whole exclusion list; never a list the scheduler refused) and those a
        spare replaced in the job."""
        requeue = [h for m in REQUEUED_WITHOUT.finditer(self.note) for h in m[1].split(",")]
        return tuple(dict.fromkeys([*requeue, *self.replaced]))

    @property
    def finished(self) -> bool:
        return self.ended == "finished"

    @property
    def stopped_early(self) -> bool:
        """A sweep's early stopping ended the run at a rung (gpt.train.early_stop): an end, not an interruption."""
        return self.ended.startswith(STOPPED_EARLY)

    @staticmethod
    def stopped_early_why(attempts: list[AttemptLine]) -> str:
        """Why the newest of `attempts` stopped at a rung of its sweep's early stopping ("": it did not)."""
        return attempts[-1].ended if attempts and attempts[-1].stopped_early else ""

    def of(self, job_id: str | None, restart: int, round_: int = 0, launch: str = "") -> bool:
        """Whether this is the line of that attempt (and round) of that job, by that launch inside it."""
        return (self.job_id, self.restart, self.round, self.launch) == (job_id, restart, round_, launch)


@dataclass(frozen=True)
class AttemptsLog:
    """RUN_DIR/attempts.jsonl, one JSON line per attempt of the run, appended when the attempt ends (or by the
    next attempt, for one killed outright); and RUN_DIR/attempt.json, the mark of the attempt in flight, removed
    once its line is written. An attempt's line has one writer, whoever else tries: the one that claimed it."""

    log: Path
    in_flight: Path
    claims: Path

    @staticmethod
    def key(job_id: str | None, restart: int, generation: int | None, round_: int = 0, launch: str = "") -> str:
        """An attempt's name: its job, restart, in-job round and launch inside the job, or without a scheduler the
        run folder's lease generation."""
        if not job_id:
            return f"generation{generation}"
        return f"job{job_id}-restart{restart}{AttemptsLog.round_suffix(round_, launch)}"

    @staticmethod
    def round_suffix(round_: int, launch: str = "") -> str:
        """Round 0 of a job's attempt is named as before in-job restarts existed, and the job's own launch (as
        submitted) as before launches could share an allocation."""
        return (f"-round{round_}" if round_ else "") + (f"-launch{launch}" if launch else "")

    def claim(self, key: str) -> bool:
        """Whether this process is the one that writes attempt `key`'s line (the first to ask, of any host)."""
        self.claims.mkdir(parents=True, exist_ok=True)
        return claim(self.claims / key)

    def unclaim(self, key: str) -> None:
        """Give attempt `key`'s line back (its attempt went on after all: it writes its own)."""
        (self.claims / key).unlink(missing_ok=True)

    def append_once(self, key: str, job_id: str | None, restart: int, record: dict[str, Any],
                    round_: int = 0, launch: str = "") -> bool:
        """Attempt `key`'s line, unless another process claimed it; returns whether this one wrote it."""
        if not self.claim(key):
            return False
        try:
            self.append(job_id, restart, record, round_, launch)
        except OSError:
            self.unclaim(key)  # unwritten (a full disk): the next attempt records it
            raise
        return True

    def read(self) -> list[AttemptLine]:
        """Every attempt's line, oldest first; a line cut short (its writer was killed) is skipped."""
        out = []
        for raw in read_json_lines(self.log):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                out.append(AttemptLine.from_json(raw))
        return out

    def append(self, job_id: str | None, restart: int, record: dict[str, Any], round_: int = 0,
               launch: str = "") -> None:
        """The line of attempt `restart` (in-job round `round_`, by `launch` inside the job) of job `job_id` (None:
        no scheduler), stamped with the time now."""
        line = {"job_id": job_id, "restart": restart, **({"round": round_} if round_ else {}),
                **({"launch": launch} if launch else {}), "time": time.time(), **record}
        with open(self.log, "a") as f:
            f.write(json.dumps(line) + "\n")

    def line_of(self, job_id: str | None, restart: int, round_: int = 0, launch: str = "") -> AttemptLine | None:
        """The newest line written for that attempt (and round, and launch) of that job, if any (never for a run
        without a job id)."""
        if job_id is None:
            return None
        mine = [a for a in self.read() if a.of(job_id, restart, round_, launch)]
        return mine[-1] if mine else None

    def next_number(self) -> int:
        """The number of the attempt about to start (1 for a run's first): its place in the log once every earlier
        attempt's line is in, one killed outright included (its mark is there, its line not yet: the next attempt
        writes it). Read before this attempt marks itself; its profiles and health figures are named by it."""
        mark, lines = self.read_mark(), self.read()
        pending = mark is not None and (mark.get("job_id") is None or self.line_of(
            mark.get("job_id"), mark.get("restart", 0), mark.get("round", 0), mark.get("launch", "")) is None)
        return len(lines) + pending + 1

    def mark(self, record: dict[str, Any]) -> None:
        write_json(self.in_flight, record)

    def read_mark(self) -> dict[str, Any] | None:
        """The mark of the attempt in flight (or of one that ended without writing its line)."""
        try:
            return json.loads(self.in_flight.read_text())
        except (OSError, ValueError):
            return None

    def add_to_mark(self, key: str, progress: dict[str, Any]) -> None:
        """Add `progress` (what attempt `key` has spent so far) to its mark: an attempt killed outright writes no
        line, and the one written for it reads its saves from here. Another attempt's mark is left alone."""
        mark = self.mark_of(key)
        if mark is not None:
            write_json(self.in_flight, {**mark, **progress})

    def unmark(self, key: str) -> None:
        """Remove the mark of attempt `key`; a later attempt's mark stays."""
        if self.mark_of(key) is not None:
            self.in_flight.unlink(missing_ok=True)

    def mark_of(self, key: str) -> dict[str, Any] | None:
        """The mark, where it is attempt `key`'s."""
        mark = self.read_mark()
        if mark is not None and self.key(mark.get("job_id"), mark.get("restart", 0), mark.get("generation"),
                                         mark.get("round", 0), mark.get("launch", "")) == key:
            return mark
        return None
