"""Fixtures for tests that need the real local Slurm cluster (slurm/local_cluster.sh).

CI starts the cluster before pytest (`slurm/install_deps.sh && slurm/local_cluster.sh up 4`). For a
developer the `slurm_cluster` fixture starts it when it is not up, and leaves it running.
Missing Slurm in CI is a failure, never a skip (a skipped `slurm` test in CI is not a pass).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import REPO
from launch.backends.slurm.commands import FINAL, parse_hostnames, parse_scontrol_job

CLUSTER_SH = REPO / "slurm" / "local_cluster.sh"
SLURM_BIN = REPO / "slurm" / "bin"
NODES = 4
SETUP_CMD = "slurm/install_deps.sh && slurm/local_cluster.sh up 4"
@dataclass
class SlurmCluster:
    """The running local cluster, and the environment that talks to it."""

    conf: Path
    env: dict[str, str] = field(repr=False)  # os.environ + SLURM_CONF + slurm/bin first on PATH
    nodes: int = NODES

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def sbatch(self, script: str, *options: str, cwd: Path | None = None) -> str:
        """Submit a batch script (its text) and return the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *options], input=script, env=self.env, cwd=cwd,
            capture_output=True, text=True, timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol -o show job ID` as a dict (first record; {} if unknown)."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        return parse_scontrol_job(proc.stdout)

    def job_state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_state(self, job_id: str, states: set[str] | None = None, timeout: float = 120) -> str:
        """Poll scontrol until the job reaches one of `states` (default: a final state)."""
        states = states or FINAL
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {state} after {timeout} s (wanted {sorted(states)})")

    def hostnames(self, nodelist: str) -> list[str]:
        return parse_hostnames(self.run("scontrol", "show", "hostnames", nodelist).stdout)


def _missing_or_fail(reason: str) -> None:
    msg = f"{reason}; run as root: {SETUP_CMD}"
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide the local Slurm cluster: {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    sbin_path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [c for c in ("sbatch", "srun", "scontrol", "sinfo", "slurmctld", "slurmd", "munged")
               if shutil.which(c, path=sbin_path) is None]
    if missing:
        _missing_or_fail(f"Slurm is not installed (missing: {', '.join(missing)})")

    status = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True, text=True)
    if status.returncode != 0:
        if os.geteuid() != 0:
            _missing_or_fail("the local Slurm cluster is not up and starting it needs root")
        up = subprocess.run(["bash", str(CLUSTER_SH), "up", str(NODES)], capture_output=True, text=True,
                            timeout=300)
        if up.returncode != 0:
            pytest.fail(f"slurm/local_cluster.sh up {NODES} failed:\n{up.stdout}\n{up.stderr}", pytrace=False)

    # Same place as `slurm/local_cluster.sh env` prints.
    conf = Path(os.environ.get("GPTLAUNCH_CLUSTER_DIR") or REPO / "slurm" / ".cluster") / "slurm.conf"
    env = dict(os.environ)
    env["SLURM_CONF"] = str(conf)
    # As for a user who activated the venv before sbatch: jobs inherit PATH, and slurm/multi_node.sh runs `python`.
    venv_bin = Path(sys.executable).parent
    env["PATH"] = f"{SLURM_BIN}:{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}"
    # A test run inside a Slurm job must not leak that job's variables into the jobs it submits.
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[key]
    return SlurmCluster(conf=conf, env=env)
