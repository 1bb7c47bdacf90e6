"""A rank task's own failure under submitit (the restart limit's stop, a rank that failed) is one line in the
task's error file: submitit re-raises it, and Python's default hook would print its traceback there."""
from __future__ import annotations

import subprocess
import sys

RAISE = """
import sys
from launch.backends.slurm.task import RankStopped, one_line
sys.excepthook = one_line(sys.excepthook)
raise {error}("rank 0 on gl-n1 stopped after a preemption signal and saved a checkpoint, but the job was not requeued")
"""


def run(error: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RAISE.format(error=error)], capture_output=True, text=True,
                          timeout=120)


def test_a_stopped_rank_is_one_line_and_the_task_still_fails():
    proc = run("RankStopped")
    assert proc.returncode == 1 and proc.stderr == (
        "error: rank 0 on gl-n1 stopped after a preemption signal and saved a checkpoint, but the job was not "
        "requeued\n"), proc.stderr


def test_any_other_error_keeps_its_traceback():
    proc = run("RuntimeError")
    assert proc.returncode == 1 and proc.stderr.startswith("Traceback"), proc.stderr
    assert proc.stderr.rstrip().endswith("RuntimeError: rank 0 on gl-n1 stopped after a preemption signal and saved "
                                         "a checkpoint, but the job was not requeued"), proc.stderr
