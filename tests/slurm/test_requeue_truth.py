"""What a rank's requeue says is what Slurm did: a cancelled job is not "requeued", a node failure is named with
Slurm's own reason, and a controller that fails the first `scontrol requeue` still gets the job requeued."""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from slurm_helpers import REPO

pytestmark = pytest.mark.slurm

# The batch shell's python asks for a requeue when Slurm sends it SIGTERM (scancel, a node failure), as a rank
# that saved after a preemption signal does, and prints the answer in one write (os.write): with PYTHONUNBUFFERED, print()
# writes each piece apart, and slurmstepd's "CANCELLED ... DUE TO JOB REQUEUE" line can land between them.
ON_TERM = f"""#!/bin/bash
[ -n "$SLURM_RESTART_COUNT" ] && {{ echo "restarted $SLURM_RESTART_COUNT"; exit 0; }}
cd {REPO} && exec {sys.executable} -c '
import os, signal, time
from launch.backends.slurm.job import SlurmJob
signal.signal(signal.SIGTERM, lambda *_: os.write(1, f"said: {{SlurmJob(os.environ).requeue(max_restarts=3)}}\\n".encode()))
print("ready", flush=True)
while True:
    time.sleep(1)
'
"""


def said(out: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out.read_text() if out.exists() else ""
        if "said:" in text:
            return text.split("said:", 1)[1].strip().splitlines()[0]
        time.sleep(0.2)
    raise AssertionError(out.read_text() if out.exists() else "no output")


def ready(out: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "ready" not in (out.read_text() if out.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_a_cancelled_job_is_not_said_to_be_requeued(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch(ON_TERM, "--requeue", "--time=5", f"--output={out}")
    try:
        ready(out)
        slurm_cluster.run("scancel", job)
        line = said(out)
    finally:
        slurm_cluster.run("scancel", job, check=False)
    assert line.startswith("(False, 'job ") and "not requeued" in line and "requeued by" not in line, line


@pytest.mark.timeout(150)
def test_a_node_failure_is_named_with_slurms_reason(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch(ON_TERM, "--requeue", "--time=5", "--nodes=2", "--exclusive", f"--output={out}")
    node = None
    try:
        ready(out)
        node = slurm_cluster.hostnames(slurm_cluster.job_info(job)["NodeList"])[1]  # not the batch host
        pid = int((slurm_cluster.conf.parent / "run" / f"slurmd-{node}.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # the host is lost; an administrator (or SlurmdTimeout) marks it down
        slurm_cluster.run("scontrol", "update", f"nodename={node}", "state=down", "reason=lost in a test")
        line = said(out)
    finally:
        slurm_cluster.run("scancel", job, check=False)
        if node:
            slurm_cluster.script("start-node", node, check=False, timeout=60)
            slurm_cluster.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
    # the node is "down", or "down, not responding" once slurmctld has also missed its pings
    assert re.fullmatch(rf"\(True, 'requeued by Slurm after a node failure \({node} down(, not responding)? "
                        rf"\(lost in a test\); job {job} is on restart 1\)'\)", line), line


FLAKY_SCONTROL = """#!/bin/bash
# The controller fails the first `scontrol requeue` as a busy one does, then answers.
if [ "$1" = requeue ] && [ ! -e "$FLAKY_MARK" ]; then
  touch "$FLAKY_MARK"; echo "scontrol: error: Unable to contact slurm controller (connect failure)" >&2; exit 1
fi
exec "$REAL_SCONTROL" "$@"
"""


@pytest.mark.timeout(120)
def test_a_failed_first_scontrol_requeue_still_requeues(slurm_cluster, tmp_path):
    bin_dir, out = tmp_path / "bin", tmp_path / "job.out"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FLAKY_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    real = slurm_cluster.run("which", "scontrol").stdout.strip()
    script = f"""#!/bin/bash
[ -n "$SLURM_RESTART_COUNT" ] && {{ echo "restarted $SLURM_RESTART_COUNT"; exit 0; }}
export REAL_SCONTROL={real} FLAKY_MARK={tmp_path}/failed-once PATH={bin_dir}:$PATH
cd {REPO} && {sys.executable} -c 'import os, signal; from launch.backends.slurm.job import SlurmJob; \\
signal.signal(signal.SIGTERM, signal.SIG_IGN); os.write(1, f"said: {{SlurmJob(os.environ).requeue(max_restarts=3)}}\\n".encode())'
sleep 300
"""
    job = slurm_cluster.sbatch(script, "--requeue", "--time=5", "--open-mode=append", f"--output={out}")
    try:
        line = said(out, timeout=60)
        slurm_cluster.wait_state(job, {"COMPLETED"}, timeout=60)
    finally:
        slurm_cluster.run("scancel", job, check=False)
    assert (tmp_path / "failed-once").exists()
    assert line == f"(True, 'requeued job {job} (restart 1 of at most 3)')", line
    assert "restarted 1" in out.read_text()
