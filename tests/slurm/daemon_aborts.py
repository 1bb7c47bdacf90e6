"""Slurm's own daemons aborting on glibc's heap checks, told apart from every other failure (tests/slurm/conftest.py).

slurmd 22.05 (Debian 12's) now and then aborts with "tcache_thread_shutdown(): unaligned tcache chunk detected" when
two job steps launch on its node at once: heap corruption inside the scheduler, seen about once in eight cluster
sessions of the suite, and the test under way fails for a reason that is none of the project's. Such an abort is
the one failure that is run again: once, on the cluster put back at rest (at_rest.py starts the daemon again), with
a warning naming the daemon and its message. A test that fails without one, or fails again, fails. A daemon a test
kills on purpose (a lost node) writes no such line.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytest_timeout
from _pytest.runner import runtestprotocol

# glibc's malloc_printerr messages: "malloc(): unaligned tcache chunk detected", "free(): double free detected in
# tcache 2", "munmap_chunk(): invalid pointer", "corrupted size vs. prev_size", "double free or corruption (out)"
HEAP_ABORT = re.compile(r"^(?:[\w ]+\(\): .*(?:detected|invalid|corrupt).*|corrupted .*|double free .*)$", re.M)
ABORTS = pytest.StashKey[list]()  # the heap aborts of the cluster's daemons while a test ran
RUN_AGAIN = pytest.StashKey[str]()  # why a test runs a second time


@contextmanager
def watched(item: pytest.Item, conf: Path) -> Iterator[None]:
    """Around a Slurm test on the cluster whose slurm.conf is `conf`: the heap aborts of its daemons meanwhile are
    kept for pytest_runtest_protocol; a test run again says why, as a warning in the summary."""
    if again := item.stash.get(RUN_AGAIN, None):
        warnings.warn(f"{item.nodeid} is run again: {again}", stacklevel=1)
    logs = daemon_logs(conf)
    yield
    item.stash[ABORTS] = aborts_since(conf, logs)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """A Slurm test that failed while a daemon of its cluster aborted on a heap check runs once more (as
    pytest-rerunfailures runs a test again), its timeout counted anew; every other test as pytest runs it."""
    if "slurm_cluster" not in getattr(item, "fixturenames", ()):
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    if any(r.failed for r in reports) and (aborts := item.stash.get(ABORTS, [])):
        item.stash[RUN_AGAIN] = f"a Slurm daemon aborted under it ({'; '.join(aborts)})"
        item.stash[ABORTS] = []
        restart_timer(item)
        item._initrequest()  # fresh fixtures for the second run
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def restart_timer(item: pytest.Item) -> None:
    """The test's timeout (pytest-timeout's, which counts its fixtures too) counted anew from now."""
    settings = pytest_timeout._get_item_settings(item)
    if settings.timeout and not settings.func_only:
        hooks = item.config.pluginmanager.hook
        hooks.pytest_timeout_cancel_timer(item=item)
        hooks.pytest_timeout_set_timer(item=item, settings=settings)


def daemon_logs(conf: Path) -> dict[Path, int]:
    """The size of each daemon's output file of the cluster whose slurm.conf is `conf` (their stderr: where glibc
    writes an abort's message)."""
    return {path: path.stat().st_size for path in sorted((conf.parent / "log").glob("slurm*.out"))}


def aborts_since(conf: Path, before: dict[Path, int]) -> list[str]:
    """Each heap abort a daemon wrote since `before` (daemon_logs), as `slurmd-gl0-n2: <glibc's message>`."""
    found = []
    for path in daemon_logs(conf):
        with open(path, "rb") as f:
            f.seek(before.get(path, 0))
            new = f.read().decode(errors="replace")
        found += [f"{path.stem}: {line}" for line in HEAP_ABORT.findall(new)]
    return found
