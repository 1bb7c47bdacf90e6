"""One writer per run folder: RUN_DIR/lock.json names the holder (job id, host, pid) and carries a heartbeat.

Rank 0 of an attempt takes the lock before it trains and beats it every few seconds from a thread; a second run
in the same folder is refused, naming the holder. A lock is stale, and is taken over with a warning, when its
holder's job is no longer running, its process is gone, or its heartbeat is older than STALE_S. A requeued
attempt of the holder's own job takes it over at once.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gpt.errors import UserError

log = logging.getLogger(__name__)
LOCK = "lock.json"
BEAT_S = 5.0
STALE_S = 60.0  # no heartbeat for this long: the holder is gone (a lost node, a frozen process)


@dataclass(frozen=True)
class Holder:
    job_id: str | None
    host: str
    pid: int
    heartbeat: float = 0.0

    def describe(self) -> str:
        job = f"job {self.job_id}, " if self.job_id else ""
        return f"{job}pid {self.pid} on {self.host}, last heartbeat {time.time() - self.heartbeat:.0f} s ago"


def read(run_dir: Path) -> Holder | None:
    try:
        return Holder(**json.loads((run_dir / LOCK).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def stale_because(holder: Holder, job_id: str | None, job_running=None) -> str | None:
    """Why `holder` no longer holds the run, or None while it does. `job_running(job_id)` asks the scheduler
    (None: cannot tell)."""
    if job_id is not None and holder.job_id == job_id:
        return f"it is an earlier attempt of this job ({job_id})"
    if time.time() - holder.heartbeat > STALE_S:
        return f"its heartbeat is {time.time() - holder.heartbeat:.0f} s old"
    if holder.job_id and job_running is not None and job_running(holder.job_id) is False:
        return f"job {holder.job_id} is no longer running"
    if holder.host == socket.gethostname() and not holder.job_id and not _alive(holder.pid):
        return f"process {holder.pid} is gone"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_free(run_dir: Path, job_id: str | None = None, job_running=None) -> None:
    """Refuse, naming the holder, when another live run holds the folder (the launcher asks before it starts
    anything; rank 0 asks again when it takes the lock)."""
    holder = read(run_dir)
    if holder is None or stale_because(holder, job_id, job_running) is not None:
        return
    if holder.pid == os.getpid() and holder.host == socket.gethostname():
        return
    raise UserError(f"the run folder {run_dir} is in use by another run ({holder.describe()}); wait for it to end or "
                    f"stop it{' (scancel ' + holder.job_id + ')' if holder.job_id else ''}, or give this run "
                    "another name (run=NAME)")


class RunLock:
    """Held by rank 0 of an attempt from before its first step to its exit."""

    def __init__(self, run_dir: Path, job_id: str | None, job_running=None):
        self.path = run_dir / LOCK
        self.me = Holder(job_id, socket.gethostname(), os.getpid())
        check_free(run_dir, job_id, job_running)
        previous = read(run_dir)
        if previous is not None and previous.pid != self.me.pid:
            log.warning("took over the run folder's lock from %s: %s", previous.describe(),
                        stale_because(previous, job_id, job_running))
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        tmp = self.path.with_name(f".{LOCK}.{self.me.pid}")
        tmp.write_text(json.dumps({**asdict(self.me), "heartbeat": time.time()}))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self._beat()
            except OSError as e:  # a full or flaky disk must not kill training; the next beat tries again
                log.warning("could not refresh %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=BEAT_S)
        holder = read(self.path.parent)
        if holder is not None and (holder.pid, holder.host) == (self.me.pid, self.me.host):
            self.path.unlink(missing_ok=True)
