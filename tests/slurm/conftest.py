"""Fixtures for tests that need the real local Slurm cluster (slurm/local_cluster.sh).

CI starts the clusters before pytest (`make cluster`). For a developer the `slurm_cluster` fixture starts its
cluster when it is not up, and leaves it running. Each pytest-xdist worker has a cluster instance of its own
(worker gwK: instance GPTLAUNCH_CLUSTER_INSTANCE + K; without xdist: GPTLAUNCH_CLUSTER_INSTANCE, default 0),
so tests that stop a controller or a node never touch another worker's jobs; tests read the instance's names
(nodes, veths, subnet) from the fixture. Missing Slurm in CI is a failure, never a skip (a skipped `slurm` test
in CI is not a pass).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from filelock import FileLock

from helpers import REPO
import at_rest
from daemon_aborts import pytest_runtest_protocol, restart_timer, watched  # noqa: F401 (the hook, registered here)
from launch.backends.slurm.commands import FINAL, parse_hostnames, parse_scontrol_job
from slurm_helpers import local_reference

CLUSTER_SH = REPO / "slurm" / "local_cluster.sh"
NODES = 4
SETUP_CMD = "slurm/install_deps.sh && slurm/local_cluster.sh up 4"


def cluster_instance() -> int:
    """This test process's cluster instance: one per xdist worker (gw0, gw1, ...), after a base the caller may set."""
    base = int(os.environ.get("GPTLAUNCH_CLUSTER_INSTANCE") or 0)
    return base + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


@dataclass
class SlurmCluster:
    """The running local cluster instance, its names (from `local_cluster.sh describe`), and the environment that
    talks to it."""

    conf: Path
    env: dict[str, str] = field(repr=False)  # os.environ + SLURM_CONF + the venv first on PATH + the instance
    instance: int
    node_prefix: str  # node i is namespace and host <node_prefix><i>
    veth_prefix: str  # the host side of node i's link is <veth_prefix><i>
    subnet: ipaddress.IPv4Network
    nodes: int = NODES
    settings: dict[str, str] = field(default_factory=dict, repr=False)  # as the session found them (at_rest.py)

    @property
    def node_re(self) -> str:
        """A regular expression that matches one node name of this cluster."""
        return re.escape(self.node_prefix) + r"\d+"

    def node_names(self) -> set[str]:
        return {f"{self.node_prefix}{i}" for i in range(1, self.nodes + 1)}

    def veth(self, node: str) -> str:
        return self.veth_prefix + node.removeprefix(self.node_prefix)

    def address(self, host: int) -> str:
        """Address .HOST of the cluster's subnet (nodes are .11, .12, ...; the controller .1)."""
        return str(self.subnet.network_address + host)

    def script(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """slurm/local_cluster.sh ARGS on this instance (start-node, up, ...)."""
        return subprocess.run(["bash", str(CLUSTER_SH), *args], env=self.env, capture_output=True, text=True,
                              check=check, timeout=timeout)

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
        """`scontrol -o show job ID` as a dict (that job's record; {} if unknown)."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        return parse_scontrol_job(proc.stdout, job_id)

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


def _describe(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["bash", str(CLUSTER_SH), "describe"], env=env, capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    sbin_path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [c for c in ("sbatch", "srun", "scontrol", "sinfo", "sacct", "slurmctld", "slurmd", "slurmdbd", "munged",
                           "mariadbd")
               if shutil.which(c, path=sbin_path) is None]
    if missing:
        _missing_or_fail(f"Slurm is not installed (missing: {', '.join(missing)})")

    instance = cluster_instance()
    script_env = {**os.environ, "GPTLAUNCH_CLUSTER_INSTANCE": str(instance)}
    status = subprocess.run(["bash", str(CLUSTER_SH), "status"], env=script_env, capture_output=True, text=True)
    if status.returncode != 0:
        if os.geteuid() != 0:
            _missing_or_fail(f"local Slurm cluster instance {instance} is not up and starting it needs root")
        up = subprocess.run(["bash", str(CLUSTER_SH), "up", str(NODES)], env=script_env, capture_output=True,
                            text=True, timeout=300)
        if up.returncode != 0:
            pytest.fail(f"GPTLAUNCH_CLUSTER_INSTANCE={instance} slurm/local_cluster.sh up {NODES} failed:\n"
                        f"{up.stdout}\n{up.stderr}", pytrace=False)

    names = _describe(script_env)
    env = dict(script_env)
    env["SLURM_CONF"] = names["SLURM_CONF"]
    # As for a user who activated the venv before sbatch: jobs inherit PATH, and slurm/multi_node.sh runs `python`.
    venv_bin = Path(sys.executable).parent
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}"
    # A test run inside a Slurm job must not leak that job's variables into the jobs it submits.
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[key]
    return SlurmCluster(conf=Path(names["SLURM_CONF"]), env=env, instance=instance,
                        node_prefix=names["NODE_PREFIX"], veth_prefix=names["VETH_PREFIX"],
                        subnet=ipaddress.ip_network(names["SUBNET"]))


@pytest.fixture(autouse=True)
def cluster_at_rest(request) -> Iterator[None]:
    """A test on the cluster starts on it at rest (tests/slurm/at_rest.py), and its jobs end with it (a sweep's report
    job may still wait for its points): a test that failed part-way neither fails the next ones nor leaves ranks that
    slow every worker. What had to be repaired is a warning in the suite's summary. A test that failed while a daemon
    of the cluster aborted on its own heap check runs once more (tests/slurm/daemon_aborts.py)."""
    if "slurm_cluster" not in request.fixturenames:
        yield
        return
    cluster = request.getfixturevalue("slurm_cluster")
    cluster.settings = cluster.settings or at_rest.settings(cluster)
    if wrong := at_rest.restore(cluster, cluster.settings):
        warnings.warn(f"the cluster was not at rest before {request.node.nodeid}: {'; '.join(wrong)}", stacklevel=1)
        restart_timer(request.node)  # a repair (a node resumed: tens of seconds) is not the test's time
    with watched(request.node, cluster.conf):
        yield
    at_rest.cancel_jobs(cluster)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Callable[..., Path]:
    """`reference_run(*overrides)`: the uninterrupted local run of that config (slurm_helpers.local_reference),
    trained once per test session for each config, by whichever worker asks first; the others wait for it and read
    it (pytest-xdist's workers share the parent of their base temporary folders). The data options name each
    worker's own copy of the one corpus, so they do not name the run."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if "PYTEST_XDIST_WORKER" in os.environ else shared

    def run(*overrides: str) -> Path:
        config = [o for o in overrides if not o.startswith(("data.dir=", "data.text_path="))]
        folder = shared / f"reference-{hashlib.sha1(chr(0).join(config).encode()).hexdigest()[:12]}"
        with FileLock(f"{folder}.lock"):
            if not (folder / "done").exists():  # none yet, or a worker's attempt failed
                shutil.rmtree(folder, ignore_errors=True)
                local_reference(folder / "run", *overrides)
                (folder / "done").touch()
        return folder / "run"

    return run
