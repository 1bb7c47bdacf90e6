"""Each Slurm test starts on its worker's cluster at rest, whatever the test before it left (tests/slurm/conftest.py).

A Slurm test that fails part-way (on a slow machine, a wait that ran out) can leave its jobs training, a node down or
cut off, or the controller with another setting (preemption by QOS, cgroup process tracking, a partition's grace time).
Every later test of that worker would then fail or crawl for a reason of another test, and the leftover ranks slow
every other worker. So before each test the cluster is checked, and repaired in the cheapest way that works: jobs
cancelled, nodes resumed or their slurmd started again, and otherwise the instance stopped and started fresh.
"""
from __future__ import annotations

import re
import time

# What the tests may change and must put back, as `scontrol show config` and `show partition` print them.
SETTINGS = ("PreemptType", "ProctrackType", "SelectTypeParameters", "MinJobAge")
# a node's states while jobs hold it, or until the scheduler's next pass after its pending job went ("planned")
BUSY = {"allocated", "completing", "mixed", "planned"}
QUIET_S = 60  # how long cancelled jobs and resumed nodes may take to settle


def jobs(cluster) -> list[str]:
    """Every job the controller holds that is not ending already (any user's)."""
    proc = cluster.run("squeue", "-h", "-o", "%A %t", check=False)
    return [job for job, state in (line.split() for line in proc.stdout.splitlines()) if state != "CG"]


def node_states(cluster) -> dict[str, str]:
    proc = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
    return dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)


def settings(cluster) -> dict[str, str]:
    """The controller's settings that tests change, and each partition's definition."""
    config = cluster.run("scontrol", "show", "config").stdout
    found = {key: m.group(1).strip() for key in SETTINGS
             if (m := re.search(rf"^{key}\s*=\s*(.*)$", config, re.MULTILINE))}
    found["partitions"] = cluster.run("scontrol", "-o", "show", "partition").stdout
    return found


def cancel_jobs(cluster) -> list[str]:
    """Cancel whatever jobs remain (the list; empty when none)."""
    left = jobs(cluster)
    if left:
        cluster.run("scancel", *left, check=False)
    return left


def _settled(check, timeout: float = QUIET_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def _all_idle(cluster) -> bool:
    states = node_states(cluster)
    return len(states) == cluster.nodes and all(s == "idle" for s in states.values())


def _busy(cluster) -> bool:
    return any(s.rstrip("*~#!%$@^-") in BUSY for s in node_states(cluster).values())


def _resume_nodes(cluster) -> None:
    """A node set down or drained by a test is resumed; one whose slurmd was killed gets it back."""
    for node, state in node_states(cluster).items():
        if state != "idle":
            cluster.script("start-node", node, check=False, timeout=60)
            cluster.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)


def restart(cluster, why: str) -> list[str]:
    cluster.script("down", timeout=120)
    cluster.script("up", str(cluster.nodes), timeout=300)
    return [f"{why}: the cluster was started again"]


def restore(cluster, baseline: dict[str, str]) -> list[str]:
    """Bring the cluster back to rest and to `baseline`'s settings; what was wrong (empty when it was at rest)."""
    if cluster.run("scontrol", "ping", check=False).returncode != 0:
        return restart(cluster, "the controller did not answer")
    wrong = []
    if left := cancel_jobs(cluster):
        wrong.append(f"job(s) {' '.join(left)} still held: cancelled")
        if not _settled(lambda: not jobs(cluster)):
            return wrong + restart(cluster, "they did not end")
    _settled(lambda: not _busy(cluster), timeout=20)  # a job that ends keeps its nodes for up to KillWait
    if not _all_idle(cluster):
        wrong.append(f"nodes not idle ({node_states(cluster)}): resumed")
        _resume_nodes(cluster)
        if not _settled(lambda: _all_idle(cluster)):
            return wrong + restart(cluster, "they stayed so")
    now = settings(cluster)
    if changed := sorted(key for key in baseline if now.get(key) != baseline[key]):
        return wrong + restart(cluster, f"settings changed ({', '.join(changed)})")
    return wrong
