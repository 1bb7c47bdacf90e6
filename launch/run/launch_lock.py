"""One launch at a time plans a run folder. Two launches of one folder at once would each find it free, and each
write its config and records over the other's: the ranks of one then train with the other's settings, or each
submits a job. A launch holds the folder's launch lock (an flock on RUN/.launch.lock) from its first look at the folder
until its job is submitted (launch.app.run; a sweep's, launch.hydra_launcher), or, where its ranks run under it (a
local run, srun's), until they end. The tasks of a job the stock submitit launcher submitted take none: each plans
the run it is a rank of, all at once. A second launch waits for the lock (up to WAIT_S), then looks at the folder as the
first left it: a job with other settings is refused in one line, the same run's job is picked up. While it waits it
looks at the lease: a run whose rank 0 holds the folder refuses it at once.

The lease (launch.run.take_lease) stays the guard of a running folder: it works on any file system and across hosts,
where flock may not (a Lustre mounted with localflock locks per node; one that refuses flock is not locked here)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gpt.errors import UserError
from gpt.run_folder import RunFolder

WAIT_S = 120.0  # a launch's planning and submission take seconds; a sweep's, seconds a point
POLL_S = 0.2
# a file system without flock; EBADF: NFS's flock (a POSIX lock there) on a file open for reading alone
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
_held: dict[Path, int] = {}  # this process's locks: run folder -> the lock file's descriptor


def hold(run_dir: Path, wait_s: float = WAIT_S, while_waiting: Callable[[], object] = lambda: None) -> None:
    """Take `run_dir`'s launch lock, waiting for another launch that holds it; a UserError after `wait_s`.
    `while_waiting` is called about every second of the wait: a UserError it raises ends the wait."""
    run_dir = run_dir.absolute()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _open(RunFolder(run_dir).launch_lock)
    if fd is None:
        return
    try:
        if not _wait_for(fd, run_dir, wait_s, while_waiting):
            os.close(fd)
            return
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # the holder's name, for a waiting launch to say (a read-only file: unnamed)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
    _held[run_dir] = fd


def _open(path: Path) -> int | None:
    """The lock file, for writing where this user may (a folder shared with the group: another member's file may be
    read-only here, and flock takes a file open for reading too); None where it cannot be opened at all."""
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o666)
        except OSError:
            continue
    return None


def _wait_for(fd: int, run_dir: Path, wait_s: float, while_waiting: Callable[[], object]) -> bool:
    """True once this process holds the lock; False where the file system has no flock."""
    deadline, said, looked = time.monotonic() + wait_s, False, 0.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno in UNSUPPORTED:
                return False
            raise
        holder = _holder(fd)
        if time.monotonic() > deadline:
            raise UserError(f"{run_dir} is being launched by {holder}, still after {wait_s:.0f} s: run this command "
                            "again once that launch has submitted or started its run, or stop it")
        if not said:
            print(f"{run_dir}: waiting for {holder}, which is launching this run folder", file=sys.stderr, flush=True)
            said = True
        if time.monotonic() - looked >= 1.0:
            while_waiting()
            looked = time.monotonic()
        time.sleep(POLL_S)


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"the launch of pid {int(record['pid'])} on {record['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another launch"


def release(run_dir: Path) -> None:
    """Let the next launch of `run_dir` plan it (closing the descriptor drops the lock; the file stays)."""
    fd = _held.pop(run_dir.absolute(), None)
    if fd is not None:
        os.close(fd)


def release_all() -> None:
    for run_dir in list(_held):
        release(run_dir)
