"""A rank inside a Slurm job: the job id, the restart count, and `scontrol requeue`."""
from __future__ import annotations

import time
from collections.abc import Mapping

from launch.backends.slurm import commands
from launch.backends.slurm.commands import SlurmUnavailable
from launch.job_env import JobEnvironment


class SlurmJob(JobEnvironment):
    scheduler = "slurm"

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> bool:
        return bool(environ.get("SLURM_JOB_ID"))

    @property
    def job_id(self) -> str | None:
        return self.environ.get("SLURM_JOB_ID") or None

    @property
    def restart(self) -> int:
        value = self.environ.get("SLURM_RESTART_COUNT", "0") or "0"
        return int(value) if value.isdigit() else 0

    @property
    def hosts(self) -> list[str]:
        nodelist = self.environ.get("SLURM_JOB_NODELIST")
        return commands.hostnames(nodelist) if nodelist else super().hosts

    def variables(self) -> dict[str, str]:
        return {k: v for k, v in self.environ.items() if k.startswith("SLURM_")}

    def end_reason(self, job_id: str) -> str:
        if job_id == self.job_id:  # this very job runs again: Slurm requeued it (a node failure, preemption)
            return "requeued by Slurm (the attempt was stopped without a word: a node failure or preemption)"
        try:
            info = commands.scontrol_job(job_id)
        except SlurmUnavailable:
            info = None
        state = info.state if info else commands.sacct_state(job_id)
        return f"stopped by Slurm: job {job_id} ended {state}" if state else f"killed outright (job {job_id})"

    def job_running(self, job_id: str) -> bool | None:
        try:
            info = commands.scontrol_job(job_id)
        except SlurmUnavailable:
            return None
        return info is not None and info.state in commands.RUNNING

    def requeue(self, max_restarts: int) -> tuple[bool, str]:
        """Ask Slurm to run this job again (same job id), only while it is RUNNING: a job that `scancel`
        cancelled, or that `scontrol requeue` from outside is already requeueing, is left to Slurm."""
        job = self.job_id
        if self.restart >= max_restarts:
            return False, f"restart limit reached ({self.restart} of preemption.max_restarts={max_restarts})"
        try:
            info = commands.scontrol_job(job)
            if info is not None and _int(info.get("Restarts")) > self.restart:  # a late caller (a cut-off rank)
                return True, (f"requeued by Slurm or by another rank already (job {job} is on restart "
                              f"{info.get('Restarts')})")
            if info is not None and info.state in commands.PENDING | {"COMPLETING"} and info.get("Requeue") == "1":
                return True, f"requeued by Slurm (job {job} is {info.state}: a node failure, preemption or scontrol)"
            if info is not None and info.state != "RUNNING":
                return False, f"job {job} is {info.state}: Slurm decides what happens next"
            commands.requeue(job)
        except SlurmUnavailable as e:
            return False, f"scontrol requeue {job} failed ({e}): submit the same command again to resume"
        return True, f"requeued job {job} (restart {self.restart + 1} of at most {max_restarts})"

    def requeue_excluding(self, hosts: list[str], max_restarts: int) -> tuple[bool, str]:
        """Requeue the job, and keep it off `hosts` (Slurm's ExcNodeList, added to what it already excludes), as
        long as the partition keeps enough nodes for it."""
        job = self.job_id
        try:
            info = commands.scontrol_job(job)
            if info is None:
                return False, f"job {job} is unknown to Slurm"
            excluded = set(hosts) | set(_nodes(info.get("ExcNodeList")))
            partition = commands.run("sinfo", "-h", "-N", "-p", info.get("Partition", ""), "-o", "%N").split()
            need, left = _int((info.get("NumNodes") or "").split("-")[0]), len(set(partition) - excluded)
            if left < need:
                return False, (f"not excluding {', '.join(hosts)}: {left} node(s) of partition "
                               f"{info.get('Partition')} would remain for a {need}-node job")
            requeued, how = self.requeue(max_restarts)
        except SlurmUnavailable as e:
            return False, f"could not requeue job {job} without {', '.join(hosts)}: {e}"
        if not requeued:
            return False, how
        nodes = ",".join(sorted(excluded))
        if not _retry(lambda: commands.exclude_nodes(job, sorted(excluded))):
            return True, f"{how}, but Slurm refused ExcNodeList={nodes}: it may run on them again"
        return True, f"{how}, without {nodes} (ExcNodeList)"


def _retry(call, seconds: float = 4.0) -> bool:
    """Slurm takes the update once the requeue has stopped the job running: try for a moment (SIGKILL comes
    KillWait seconds after the requeue)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            call()
            return True
        except SlurmUnavailable:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def _nodes(value: str | None) -> list[str]:
    return commands.hostnames(value) if value and value != "(null)" else []


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0
