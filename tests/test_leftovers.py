"""tests/leftovers.py: what a test started ends with it, except the servers later tests use (and a pool's workers)."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil

from helpers import wait_until
from leftovers import descendants, end_new


def running(pid: int, command: str) -> None:
    """Until `pid` runs `command` (a child runs its parent's program until its exec)."""
    wait_until(lambda: " ".join(psutil.Process(pid).cmdline()) == command, 10, command, poll_s=0.01)


def child(pid: int, command: str) -> None:
    wait_until(lambda: psutil.Process(pid).children(), 10, f"a child of {pid}", poll_s=0.01)
    running(psutil.Process(pid).children()[0].pid, command)


def test_a_process_started_in_the_test_is_ended_and_named_and_an_older_one_is_left():
    older = subprocess.Popen(["sleep", "60"])
    try:
        before = descendants()
        new = subprocess.Popen(["sleep", "61"])
        kept = subprocess.Popen(["sh", "-c", "sleep 62 & wait; : torch/_inductor/compile_worker"])
        running(new.pid, "sleep 61")
        child(kept.pid, "sleep 62")
        assert end_new(before) == ["sleep 61"]
        assert new.wait(timeout=10) == -9
        assert older.poll() is None and kept.poll() is None
    finally:
        for proc in (older, kept):
            proc.kill()
            proc.wait()


def test_the_rank_server_is_kept_and_its_ranks_are_not():
    before = descendants()
    server = subprocess.Popen([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '63']); "
                               "time.sleep(60)  # multiprocessing.forkserver"])
    try:
        child(server.pid, "sleep 63")
        assert end_new(before) == ["sleep 63"]
        time.sleep(0.2)
        assert server.poll() is None
    finally:
        server.kill()
        server.wait()
