"""What a suite that is cut off (CI's time limit, a Ctrl-C) leaves for its reader: the tests that failed so far and the
ones still running, written as they happen into the folder GPTLAUNCH_TEST_PROGRESS names (.ci/run prints them last).

pytest prints its failures only when the session ends, so a suite stopped from outside shows none of them. Written by
the controlling process only (xdist's workers report to it): `failed` gets one line per failing phase, `running` is
rewritten at each start and end with the tests under way and when each began, `done` counts the finished tests.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

VARIABLE = "GPTLAUNCH_TEST_PROGRESS"


class ProgressLog:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.started: dict[str, float] = {}
        self.done = 0
        for name in ("failed", "running", "done"):
            (folder / name).write_text("")

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.started[nodeid] = time.time()
        self._write_running()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)  # what pytest's short summary says
            reason = " ".join((crash.message if crash else str(report.longrepr)).split())
            with (self.folder / "failed").open("a") as out:
                out.write(f"{report.nodeid} ({report.when}, {report.duration:.0f} s): {shorten(reason)}\n")
        if report.when == "teardown":
            self.started.pop(report.nodeid, None)
            self.done += 1
            (self.folder / "done").write_text(f"{self.done}\n")
            self._write_running()

    def _write_running(self) -> None:
        lines = [f"{time.strftime('%H:%M:%S', time.localtime(t))} {nodeid}" for nodeid, t in self.started.items()]
        (self.folder / "running").write_text("".join(f"{line}\n" for line in lines))


def shorten(text: str, keep: int = 300) -> str:
    """Its start and its end (a failed run's output says what happened last)."""
    return text if len(text) <= 2 * keep else f"{text[:keep]} [...] {text[-keep:]}"


def install(config) -> None:
    """Register the log in the controlling process when GPTLAUNCH_TEST_PROGRESS names a folder."""
    folder = os.environ.get(VARIABLE)
    if folder and not os.environ.get("PYTEST_XDIST_WORKER"):
        config.pluginmanager.register(ProgressLog(Path(folder)), "gptlaunch-progress-log")
