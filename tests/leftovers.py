"""Processes a test started and left running (tests/conftest.py ends them after each test).

A test that fails part-way (a wait that ran out on a slow machine, a timeout) can leave its `python -m launch` and
its ranks training; on two cores they slow every later test of the session, which then fail in turn. So whatever a
test started is ended with it, and named in a warning. Two are kept, each started by the first test of a worker that
needs it and serving every later one: the local backend's rank server (its ranks are not kept), and Inductor's pool
of compile workers, with its workers.
"""
from __future__ import annotations

import contextlib

import psutil

SERVERS = ("multiprocessing.forkserver", "torch/_inductor/compile_worker")
POOLS = ("torch/_inductor/compile_worker",)  # kept with the processes they started


def descendants() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _command(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline())
    return ""


def end_new(before: dict[int, psutil.Process]) -> list[str]:
    """SIGKILL the descendants not in `before`, other than SERVERS and the POOLS' workers; their command lines."""
    now = descendants()
    kept = {pid for pid, proc in now.items() if any(k in _command(proc) for k in SERVERS)}
    pools = {pid for pid, proc in now.items() if any(k in _command(proc) for k in POOLS)}
    for pid, proc in now.items():
        with contextlib.suppress(psutil.Error):
            if any(parent.pid in pools for parent in proc.parents()):
                kept.add(pid)
    ended = []
    for pid, proc in now.items():
        if pid not in before and pid not in kept:
            command = _command(proc)
            with contextlib.suppress(psutil.Error):
                proc.kill()
                ended.append(command[:200])
    return ended
