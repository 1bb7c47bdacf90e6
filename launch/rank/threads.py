"""How many CPU threads each rank computes with, decided per sweep point and handed to the rank in its own
environment. The launcher's environment is never changed, so nothing leaks from one sweep point to the next.

    an OMP_NUM_THREADS the user set        that, as given
    cluster.cpus_per_task (Slurm's -c)     that many: Slurm gave each task its own CPUs
    otherwise                              the CPUs this process may use (its affinity mask, no more than its
                                           cgroup's CPU quota), divided by the ranks sharing them

Kept free of torch: the launcher and the Slurm task wrapper plan with it before any rank starts.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping

THREADS = "OMP_NUM_THREADS"
# Idle OpenMP threads sleep instead of spinning (libgomp spins up to ~300k iterations after each parallel region).
# A rank's CPUs are rarely its own alone: the standby rank, the data and checkpoint threads, other ranks of the
# node. Spinning there burnt 2.4x the CPU and took 2.7x the wall time of sleeping (a tiny run on the loaded 2-core
# test machine: docs/results.md). A value the user set is kept.
WAIT_POLICY = "OMP_WAIT_POLICY"
SOURCE = "GPTLAUNCH_THREADS_SOURCE"
RANKS_ON_HOST = "GPTLAUNCH_RANKS_ON_HOST"
CGROUPS = Path("/sys/fs/cgroup")
COMPILE_THREADS = "TORCHINDUCTOR_COMPILE_THREADS"  # Inductor's compile workers: min(32, CPUs) by default
log = logging.getLogger(__name__)


def usable_cpus(cgroups: Path = CGROUPS) -> int:
    """CPUs this process may run on (its affinity mask, which Slurm and taskset narrow), not the machine's, and no
    more than its cgroup's CPU quota allows (a container's --cpus, a Kubernetes limit: the mask still shows every
    CPU of the host, and a thread per CPU there is throttled, not run)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(cgroups)
    return min(cpus, quota) if quota else cpus


def cpu_quota(cgroups: Path = CGROUPS) -> int | None:
    """The CPUs the CFS quota of this process's cgroup allows, rounded up (cgroup v2's cpu.max, v1's
    cpu.cfs_quota_us); None without a quota."""
    own = next((line.split(":", 2)[2].strip("/\n") for line in _read(Path("/proc/self/cgroup")).splitlines()
                if line.startswith("0::")), "")
    for folder in dict.fromkeys((cgroups / own, cgroups)):  # v2: its own cgroup, or the root a container sees
        if fields := _read(folder / "cpu.max").split():
            return _ceil_ratio(fields[0], fields[1] if len(fields) > 1 else "100000")
    return _ceil_ratio(_read(cgroups / "cpu" / "cpu.cfs_quota_us"), _read(cgroups / "cpu" / "cpu.cfs_period_us"))


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ceil_ratio(quota: str, period: str) -> int | None:
    if not (quota.isdigit() and period.isdigit() and int(period) > 0):  # "max", -1 or absent: no quota
        return None
    return max(1, -(-int(quota) // int(period)))


def _positive(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() and int(value) > 0 else None


@dataclass(frozen=True)
class ThreadPlan:
    threads: int        # per rank
    source: str         # where the figure came from, for the banner and environment/rank<R>.json
    ranks_on_host: int  # ranks that share this host's CPUs
    wait_policy: str = "PASSIVE"  # OMP_WAIT_POLICY: the user's, or PASSIVE

    @classmethod
    def decide(cls, ranks_on_host: int, cpus_per_task: int | None = None,
               environ: Mapping[str, str] | None = None, cpus: int | None = None) -> ThreadPlan:
        env = os.environ if environ is None else environ
        wait = env.get(WAIT_POLICY) or "PASSIVE"
        user = _positive(env.get(THREADS))
        if user is not None:
            return cls(user, f"{THREADS}={user} (yours)", ranks_on_host, wait)
        if cpus_per_task:
            return cls(cpus_per_task, f"--cpus-per-task={cpus_per_task}", ranks_on_host, wait)
        cpus = cpus or usable_cpus()
        threads = max(1, cpus // max(1, ranks_on_host))
        return cls(threads, f"{cpus} CPU(s) / {ranks_on_host} rank(s)", ranks_on_host, wait)

    def env(self) -> dict[str, str]:
        """The variables a rank's process is started with."""
        return {THREADS: str(self.threads), SOURCE: self.source, RANKS_ON_HOST: str(self.ranks_on_host),
                WAIT_POLICY: self.wait_policy}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ThreadPlan:
        """Inside a rank: the plan its launcher handed over (or, started some other way, one made here)."""
        env = os.environ if environ is None else environ
        slurm_tasks = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "").split("(")[0]
        ranks = (_positive(env.get(RANKS_ON_HOST)) or _positive(slurm_tasks) or _positive(env.get("LOCAL_WORLD_SIZE"))
                 or 1)
        if SOURCE in env and _positive(env.get(THREADS)):
            return cls(int(env[THREADS]), env[SOURCE], ranks, env.get(WAIT_POLICY) or "PASSIVE")
        return cls.decide(ranks, _positive(env.get("SLURM_CPUS_PER_TASK")), env)

    def oversubscribed(self, cpus: int | None = None, environ: Mapping[str, str] | None = None) -> str | None:
        """A warning when the ranks that share this rank's CPUs ask for more threads than there are. A task that
        Slurm bound to CPUs of its own (its affinity is narrower than the step's CPUs on this host,
        SLURM_CPUS_ON_NODE) shares them with no other rank; otherwise every rank of the host shares them."""
        env = os.environ if environ is None else environ
        cpus = cpus or usable_cpus()
        step_cpus = _positive(env.get("SLURM_CPUS_ON_NODE"))
        sharing = 1 if step_cpus is not None and cpus < step_cpus else self.ranks_on_host
        wanted = self.threads * sharing
        if wanted <= cpus:
            return None
        head = (f"{sharing} rank(s) x {self.threads} thread(s) = {wanted} threads on {cpus} CPU(s): they slow each "
                "other down")
        if sharing > cpus:  # one thread each already: only fewer ranks on this host helps
            return f"{head}; run at most {cpus} rank(s) on it (cluster.tasks_per_node, or more nodes)"
        return f"{head}; unset {THREADS} or set it to {max(1, cpus // sharing)}"


def apply_threads(local_rank: int) -> ThreadPlan:
    """The thread count the launcher chose for this rank, applied here (OMP_NUM_THREADS alone does not reach every
    pool), and said once per host (`local_rank` 0) when the ranks there ask for more threads than it has CPUs."""
    import torch  # in the rank alone: the launcher and the task wrapper plan with this module torch-free

    plan = ThreadPlan.from_env()
    torch.set_num_threads(plan.threads)
    if cpu_quota() and COMPILE_THREADS not in os.environ:  # Inductor counts the affinity mask alone
        os.environ[COMPILE_THREADS] = str(min(usable_cpus(), 32))  # read once, when torch._inductor is first imported
    warning = plan.oversubscribed()
    if warning and local_rank == 0:
        log.warning("%s", warning)
    return plan
