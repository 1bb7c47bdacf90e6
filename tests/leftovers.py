"""Processes a test started and left running (tests/conftest.py ends them after each test).

A test that fails part-way (a wait that ran out on a slow machine, a timeout) can leave its `python -m launch` and
its ranks training; on two cores they slow every later test of the session, which then fail in turn. So whatever a
test started is ended with it, and named in a warning. Servers are kept, each started by the first test of a worker
that needs it and serving every later one: the local backend's rank server (its ranks are not kept), multiprocessing's
resource tracker, and Inductor's pool of compile workers, with its workers.
"""
from __future__ import annotations

import contextlib
import glob
import os

import psutil

SERVERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker", "torch/_inductor/compile_worker")
POOLS = ("torch/_inductor/compile_worker",)  # kept with the processes they started


def _children(pid: int) -> list[int]:
    """Linux's list of a process's children (psutil's finds them by reading every process's status: 1-4 ms, twice
    per test of the quick slice)."""
    found = []
    for tasks in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            found += map(int, open(tasks).read().split())
    return found


def descendants() -> set[int]:
    found, todo = set(), _children(os.getpid())
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += _children(pid)
    return found


def _command(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline())
    return ""


def _kept(proc: psutil.Process) -> bool:
    return any(k in _command(proc) for k in SERVERS) or any(
        k in _command(parent) for parent in proc.parents() for k in POOLS)


def end_new(before: set[int]) -> list[str]:
    """SIGKILL the descendants not in `before`, other than SERVERS and the POOLS' workers; their command lines."""
    ended = []
    for pid in descendants() - before:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if not _kept(proc):
                command = _command(proc)
                proc.kill()
                ended.append(command[:200])
    return ended
