"""The run folder's lease: one writer at a time, with a generation number that fences out a displaced one.

    RUN_DIR/lease/<G>    generation G's claim, created once and never rewritten (link(2) of a complete file: of
                         two processes that take generation G at once, exactly one succeeds)
    RUN_DIR/lease.json   the holder's beat: its generation, a sequence number it bumps on every beat, who it is
                         (lock.json in a folder from before that name: read while lease.json is absent)

The current generation is the highest claim. A writer of generation G stops writing once claim G+1 exists (the
fence): a frozen, suspended or cut-off holder that wakes up finds it and exits without writing. Liveness is judged
by whether the beat's sequence number changed within `stale_s` of the observer's own monotonic clock, never by
comparing wall clocks or file times across hosts. Scheduler-free and torch-free: launch.run.take_lease decides, with
the scheduler's word, when a lease may be taken over; every rank fences its writes with `fence()`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gpt.errors import EXIT_FAILED, UserError
from gpt.resilience.disk_faults import Outage
from gpt.resilience.timing import LEASE_BEAT_S, LEASE_STALE_S
from gpt.run_folder import RunFolder, claim

log = logging.getLogger(__name__)


def pid_namespace() -> str:
    """This process's pid namespace: a pid means the same process only on the same host and namespace (two
    containers with --net=host share a hostname, not their pids)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Beat:
    """What lease.json says: the holder of `generation`, and its `seq`-th beat (`time` is for people only)."""

    generation: int
    seq: int
    job_id: str | None
    restart: int
    host: str
    pid: int
    pidns: str = ""
    time: float = 0.0
    ended: bool = False
    round: int = 0  # the in-job restart of the job's attempt that holds it (launch.recovery.rounds)
    launch: str = ""  # which launch inside the job holds it (several may share one allocation)

    def describe(self) -> str:
        job = f"job {self.job_id}, restart {self.restart}, " if self.job_id else ""
        return f"{job}pid {self.pid} on {self.host}, generation {self.generation}"

    def same_process_namespace(self) -> bool:
        return self.host == socket.gethostname() and self.pidns == pid_namespace()


LIST_EVERY = 10  # beats or fences between two listings of lease/ (`listed`)


def listed(path: Path) -> bool:
    """Whether `path` is in its folder's listing. On NFS a lookup of a name that was absent may be answered from the
    client's cache of that absence (lookupcache=all, the default) until the folder's cached attributes expire
    (acdirmax, 60 s): a successor's claim or beat would stay hidden that long. Opening the folder to list it is a
    close-to-open event: the client asks the server for the folder's attributes, a changed folder drops the cached
    absence, and the listing is the server's. Asked only after a name was not found (a found one needs no second
    look): a fence (before a write, at each heartbeat) and the holder's beat pay one listing every LIST_EVERY calls."""
    try:
        return path.name in os.listdir(path.parent)
    except FileNotFoundError:
        return False


def read_text_uncached(path: Path) -> str:
    """The file's text, FileNotFoundError only when its folder's listing agrees it is absent (`listed`)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        if not listed(path):
            raise
    return path.read_text()


def read_beat(run_dir: Path) -> Beat | None:
    """The holder's last beat; None when there is none. An unreadable one fails closed: a UserError naming it."""
    folder = RunFolder(run_dir)
    path = folder.lease_beat if folder.lease_beat.exists() or listed(folder.lease_beat) \
        else folder.lease_beat_before_rename
    try:
        text = read_text_uncached(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read the run folder's lease {path} ({e}); no run starts while it cannot be "
                        "read") from None
    try:
        return Beat(**json.loads(text))
    except (ValueError, TypeError) as e:
        raise UserError(f"the run folder's lease {path} is not one this version wrote ({e}): if no run uses the "
                        f"folder, delete {path} and run again") from None


def generation(run_dir: Path) -> int:
    """The highest generation ever claimed in this folder (0: none)."""
    try:
        return max((int(p.name) for p in RunFolder(run_dir).lease_claims.iterdir() if p.name.isdigit()), default=0)
    except FileNotFoundError:
        return 0


def observe(run_dir: Path, beat: Beat, stale_s: float = LEASE_STALE_S, poll_s: float = 0.2) -> bool:
    """Whether the holder of `beat` is alive: its sequence number (or generation) changes within `stale_s` on this
    process's monotonic clock. An ended lease is not alive, and is not watched."""
    if beat.ended:
        return False
    deadline = time.monotonic() + stale_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        now = read_beat(run_dir)
        if now is None or (now.generation, now.seq) != (beat.generation, beat.seq):
            return now is not None and not now.ended
    return False


class LeaseLost(Exception):
    """Another writer took the run folder over."""


class Lease:
    """Generation `generation` of a run folder's lease, held by this process from `take` to `release`."""

    def __init__(self, run_dir: Path, generation: int, me: Beat):
        self.run_dir, self.generation, self.me = run_dir, generation, me
        self.path = RunFolder(run_dir).lease_beat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the beat thread and the main thread's release write one file
        # a lease that cannot beat goes stale: another launch may take the folder, and the fence then stops this run
        self.outage = Outage("the lease's beat", self.path.parent, "training goes on while it cannot beat")

    @classmethod
    def take(cls, run_dir: Path, over: int, job_id: str | None, restart: int, round_: int = 0,
             launch: str = "") -> Lease:
        """Claim generation `over` + 1. Raises LeaseLost when another process claimed it first."""
        g = over + 1
        me = Beat(g, 0, job_id, restart, socket.gethostname(), os.getpid(), pid_namespace(), round=round_,
                  launch=launch)
        claims = RunFolder(run_dir).lease_claims
        claims.mkdir(parents=True, exist_ok=True)
        if not claim(claims / str(g), json.dumps(asdict(me))):  # exactly one taker of generation g
            raise LeaseLost(f"another process took generation {g} of {run_dir} first")
        lease = cls(run_dir, g, me)
        lease.beat()
        RunFolder(run_dir).lease_beat_before_rename.unlink(missing_ok=True)  # lease.json is read from now on
        return lease

    def successor(self, listing: bool = True) -> Beat | None:
        """Who took the folder over from this lease, or None while it is still this one's. `listing`: an absent
        claim is checked against its folder's listing too (`listed`)."""
        claim = RunFolder(self.run_dir).lease_claims / str(self.generation + 1)
        try:
            return Beat(**json.loads(read_text_uncached(claim) if listing else claim.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):  # a successor's claim exists even when its text cannot be read
            return Beat(self.generation + 1, 0, None, 0, "?", 0)

    def check(self, listing: bool = True) -> None:
        """Raise LeaseLost when a later generation has been claimed."""
        taker = self.successor(listing)
        if taker is not None:
            who = f"job {taker.job_id}" if taker.job_id else f"pid {taker.pid} on {taker.host}"
            raise LeaseLost(f"lost the run folder {self.run_dir} to {who} (generation {taker.generation}); "
                            "this process stops without writing")

    def beat(self, ended: bool = False) -> None:
        with self._lock:
            # the listing every LIST_EVERY beats: a cached absence hides a successor that long at most, where a
            # listing each beat would double the job's metadata operations in steady state
            self.check(listing=ended or self.me.seq % LIST_EVERY == 0)
            self.me = Beat(**{**asdict(self.me), "seq": self.me.seq + 1, "time": time.time(), "ended": ended})
            tmp = self.path.with_name(f".{self.path.name}.{self.me.host}.{self.me.pid}.{threading.get_ident()}")
            try:
                tmp.write_text(json.dumps(asdict(self.me)))
                os.replace(tmp, self.path)
            except OSError:
                tmp.unlink(missing_ok=True)  # no partial beat left in the run folder
                raise

    def start(self, beat_s: float = LEASE_BEAT_S) -> None:
        self._thread = threading.Thread(target=self._run, args=(beat_s,), name="gptlaunch-lease", daemon=True)
        self._thread.start()

    def _run(self, beat_s: float) -> None:
        while not self._stop.wait(beat_s):
            try:
                self.beat()
            except LeaseLost as e:
                stop_writing(e)
            except OSError as e:  # a full or flaky disk must not kill training
                self.outage.failed(e)
            else:
                self.outage.recovered()

    def release(self) -> None:
        """The last beat says it ended: the next run takes the folder at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=LEASE_BEAT_S)
        try:
            self.beat(ended=True)
        except (LeaseLost, OSError):
            pass  # taken over, or unwritable: the lease goes stale and the next run observes that


def stop_writing(lost: LeaseLost) -> None:
    """A writer whose lease was taken over: one line, and the process ends at once (no handler, no finally block
    writes anything more into the run folder)."""
    log.error("%s", lost)
    print(str(lost), file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(EXIT_FAILED)


class Fence:
    """Generation `generation` of a run folder, as a rank of the attempt that holds it sees it: a write into the
    folder goes ahead only while no later generation has been claimed."""

    def __init__(self, run_dir: Path, generation: int):
        self.lease = Lease(run_dir, generation, Beat(generation, 0, None, 0, "", 0))
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1  # the node's heartbeat fences each beat: the listing (`listed`) every LIST_EVERY fences
        try:
            self.lease.check(listing=self.calls % LIST_EVERY == 1)
        except LeaseLost as e:
            stop_writing(e)


_FENCE: Fence | None = None


def install_fence(run_dir: Path, generation: int) -> None:
    """This process writes for generation `generation` of `run_dir` from now on."""
    global _FENCE
    _FENCE = Fence(run_dir, generation)


def fence() -> None:
    """Before a write into the run folder (a checkpoint's commit or prune, a hang report, an attempt's line): a
    process whose attempt lost the folder stops here. No-op in a process that holds no generation."""
    if _FENCE is not None:
        _FENCE()


def fenced_generation() -> int | None:
    """The generation this process writes for (None: it holds none)."""
    return _FENCE.lease.generation if _FENCE is not None else None
