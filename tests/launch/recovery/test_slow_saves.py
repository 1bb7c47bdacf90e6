"""A save is long, not hung, while its bytes move (launch.recovery.slow_saves): a rank's save budget counts from
its save's last write, and the project's own housekeeping threads (heartbeats, the lease) are no save's writes.
(A rank waiting for a slower peer's save: test_watchdog.py.)"""
from __future__ import annotations

import threading
import time

import pytest

from gpt.config.sections import WatchdogConfig
from gpt.resilience.progress import Progress
from launch.recovery.slow_saves import WriteWatch
from launch.recovery.watchdog import Watchdog


class Writer:
    """A thread that writes 4 KiB, then lives until told to end (a thread that ended is in no later look)."""

    def __init__(self, path, name: str | None = None) -> None:
        self.wrote, self.end = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.work, args=(path,), name=name)

    def work(self, path) -> None:
        path.write_bytes(b"x" * 4096)
        self.wrote.set()
        self.end.wait(10)

    def __enter__(self) -> Writer:
        self.thread.start()
        assert self.wrote.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.end.set()
        self.thread.join()


def test_only_the_working_threads_writes_are_seen(tmp_path):
    watch = WriteWatch()
    assert not watch.moved()  # the first look sets where the counts start
    assert not watch.moved()  # nothing written since
    with Writer(tmp_path / "beat", "gptlaunch-lease"):
        assert not watch.moved()  # a housekeeping thread's write is none of the save's
    (tmp_path / "shard").write_bytes(b"x" * 4096)
    assert watch.moved()  # the main thread's
    assert not watch.moved()
    with Writer(tmp_path / "shard1"):  # a save's writer thread, started since the last look
        assert watch.moved()
        assert not watch.moved()


@pytest.mark.slow  # writes for 1.5 s, then waits a budget
def test_a_save_that_writes_is_no_hang_and_one_that_stops_writing_is(tmp_path):
    """Budget 1 s (10x a 0.02 s save, the floor 1 s): a save writing a chunk every 0.1 s for 1.5 s is not
    reported; once it stops writing, it is, a budget later."""
    (tmp_path / "watchdog").mkdir()
    progress = Progress()
    progress.phase("step", "step 0", 0)
    progress.phase("step", "step 1", 1)
    progress.save_times.append(0.02)
    fired: list[tuple[float, str]] = []
    dog = Watchdog(WatchdogConfig(interval_s=0.05, save_floor_s=1.0, step_factor=10), tmp_path, 0, 1, "h", 1,
                   lambda r: None, progress)
    dog.fire = lambda key, seconds, used: fired.append((time.monotonic(), key))
    dog.start()
    progress.phase("save", "checkpoint save at step 1", 1)
    start = time.monotonic()
    with open(tmp_path / "shard", "wb") as f:
        while time.monotonic() - start < 1.5:
            f.write(b"x" * 65536)
            time.sleep(0.1)
    stopped = time.monotonic()
    assert fired == [], fired
    while not fired and time.monotonic() - stopped < 10:
        time.sleep(0.05)
    assert fired and fired[0][1] == "watchdog.save_s (auto)", fired
    assert 0.9 <= fired[0][0] - stopped < 3, fired[0][0] - stopped
