"""tests/slurm/daemon_aborts.py: a Slurm test that failed while one of its cluster's daemons aborted on a heap check
of its own runs once more; any other failure, or a second one, stays a failure."""
from __future__ import annotations

import pytest

from helpers import REPO

pytest_plugins = ["pytester"]

CONFTEST = """
from pathlib import Path

import pytest

from daemon_aborts import pytest_runtest_protocol, watched  # noqa: F401

@pytest.fixture
def slurm_cluster(tmp_path_factory):
    conf = tmp_path_factory.getbasetemp() / "cluster" / "slurm.conf"
    (conf.parent / "log").mkdir(parents=True, exist_ok=True)
    return conf

@pytest.fixture(autouse=True)
def at_rest(request):
    if "slurm_cluster" not in request.fixturenames:
        yield
        return
    with watched(request.node, request.getfixturevalue("slurm_cluster")):
        yield
"""

TESTS = """
from pathlib import Path

ABORT = "slurmd: debug: launched\\ntcache_thread_shutdown(): unaligned tcache chunk detected\\n"
runs = {}

def ran(name):
    runs[name] = runs.get(name, 0) + 1
    return runs[name]

def abort(conf):
    with open(conf.parent / "log" / "slurmd-gl-n2.out", "a") as f:
        f.write(ABORT)

def test_fails_once_as_its_daemon_aborts(slurm_cluster):
    if ran("once") == 1:
        abort(slurm_cluster)
        assert False, "the step never started"

def test_fails_with_no_abort(slurm_cluster):
    ran("no abort")
    assert False, "a fault of the project's"

def test_fails_again(slurm_cluster):
    ran("again")
    abort(slurm_cluster)
    assert False, "twice"

def test_without_a_cluster_is_not_run_again():
    ran("plain")
    assert False

def test_counts():
    assert runs == {"once": 2, "no abort": 1, "again": 2, "plain": 1}, runs
"""


def test_a_failure_under_a_daemons_heap_abort_runs_once_more(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_cluster=TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-W", "default")
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.fnmatch_lines(["*test_fails_once_as_its_daemon_aborts is run again: a Slurm daemon aborted under it "
                                 "(slurmd-gl-n2: tcache_thread_shutdown(): unaligned tcache chunk detected)*"])


@pytest.mark.slow  # a pytest of its own, and seconds of sleeps
def test_a_repair_before_a_test_is_not_counted_in_its_timeout(pytester, monkeypatch):
    """conftest.cluster_at_rest restarts the test's timer after a repair (restart_timer): a fixture's 2 s then a 1.5 s
    test fit a 2.5 s timeout; without the restart they would not."""
    pytester.makeconftest("""
import time

import pytest

from daemon_aborts import restart_timer

@pytest.fixture(params=[True, False], ids=["restarted", "counted"])
def repaired(request):
    time.sleep(2)
    if request.param:
        restart_timer(request.node)
""")
    pytester.makepyfile(test_timer="""
import time

import pytest

@pytest.mark.timeout(2.5)
def test_after_a_repair(repaired):
    time.sleep(1.5)
""")
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests" / "slurm"))  # its own process: pytest-timeout's alarm its own
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:xdist")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAILED*test_after_a_repair?counted?*"])
