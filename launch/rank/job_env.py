"""Inside a rank, the scheduler's side of the job: its id, which attempt this is, and how to run it again.
gpt/ knows no scheduler: on a preemption signal the trainer saves and stops, and the worker asks this object to
requeue. Each backend that submits jobs adds its class to launch.backends.JOB_ENVIRONMENTS
(launch/backends/<name>/job.py)."""
from __future__ import annotations

import importlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from launch.backends import JOB_ENVIRONMENTS
from launch.backends.job_state import JobStanding

if TYPE_CHECKING:  # torch: a rank's; this module is also the launcher's
    from gpt.collectives.process_group import DistEnv

# set by the task wrapper that restarts ranks inside the allocation (launch.recovery.rounds)
ROUND_VAR = "GPTLAUNCH_ROUND"
# Set by a launcher that starts ranks inside an allocation it did not submit (cluster=local, cluster=srun): several
# launches may share one (salloc), and each has its own attempts and rounds.
LAUNCH_VAR = "GPTLAUNCH_LAUNCH_ID"


@dataclass(frozen=True)
class Preemption:
    """The scheduler preempts this job for another (a higher-priority partition or QOS needs its nodes)."""

    said: str  # "preempted by another job (...)": what the scheduler says of it
    requeues: bool  # its policy runs the job again (Slurm's PreemptMode=REQUEUE); else the job ends (CANCEL)


def new_launch() -> str:
    """A launch's id: its launcher's pid and start time."""
    return f"{os.getpid()}-{time.time_ns()}"


class JobEnvironment:
    """No scheduler (cluster=local): nothing requeues the run; the same command resumes it."""

    scheduler = "none"

    def __init__(self, environ: Mapping[str, str] | None = None):
        self.environ = dict(os.environ if environ is None else environ)

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> bool:
        return True

    @classmethod
    def in_step(cls, environ: Mapping[str, str]) -> bool:
        """This process is one task of the scheduler's parallel step (srun), which places it (`place`)."""
        return False

    @classmethod
    def place(cls, environ: Mapping[str, str]) -> DistEnv:
        """The task's rank, world size, node, master address and port, from the scheduler's variables."""
        raise NotImplementedError

    @property
    def job_id(self) -> str | None:
        return None

    @property
    def restart(self) -> int:
        return 0

    @property
    def launch(self) -> str:
        """Which launch inside the job this is ('': the job's own, as submitted)."""
        return self.environ.get(LAUNCH_VAR, "")

    @property
    def round(self) -> int:
        """Which in-job restart of this attempt this is (0: the first set of ranks; launch.recovery.rounds)."""
        value = self.environ.get(ROUND_VAR, "0")
        return int(value) if value.isdigit() else 0

    @property
    def hosts(self) -> list[str]:
        """The job's hosts, in rank order of their first rank."""
        import socket

        return [socket.gethostname()]

    def variables(self) -> dict[str, str]:
        """The scheduler's variables, recorded in environment/rank<R>.json."""
        return {}

    def requeue(self, max_restarts: int) -> tuple[bool, str]:
        return False, "no scheduler to requeue the run: run the same command to resume it"

    def requeue_excluding(self, hosts: list[str], max_restarts: int) -> tuple[bool, str]:
        return False, f"no scheduler to run the job without {', '.join(hosts)}: training goes on with it"

    def cannot_spare(self, hosts: list[str]) -> str:
        """Why a requeue could not leave `hosts` out ('' when it could, or when nothing requeues)."""
        return ""

    @property
    def requeue_ends_attempt(self) -> bool:
        """A requeue this job asks for ends this attempt at once: its processes wait for that (exiting first would
        fail their task). False where the requeue is asked for once this process has ended (a packed point's)."""
        return True

    def next_link(self, run_dir) -> str | None:
        """The job that continues this run once this one ends (cluster.chain), if one is queued."""
        return None

    def end_reason(self, job_id: str) -> str:
        """How a past attempt of this run (that job) ended, when it could not say so itself."""
        return "killed outright (the process was gone without a word)"

    def job_state(self, job_id: str) -> JobStanding | None:
        """Where that job stands, as the scheduler says (None: this environment cannot tell)."""
        return None

    def lost_nodes(self) -> str:
        """This job's nodes that the scheduler holds down or failed, with its reason ('' when none)."""
        return ""

    def cancelled(self) -> bool:
        """Whether the scheduler is ending this job because someone cancelled it (not a preemption, a time limit or a
        failure): its stop signal came from a cancel."""
        return False

    def time_limit(self, warning_s: float) -> str | None:
        """Why the job's time limit is what stops it (reached, or its warning `warning_s` before it), in words; None
        when it is not, or this environment cannot tell."""
        return None

    def preemption(self) -> Preemption | None:
        """The scheduler's own preemption of this job, while its grace time runs (None: its stop signal came from
        elsewhere, or this environment cannot tell)."""
        return None


def scheduler_classes() -> list[type[JobEnvironment]]:
    return [getattr(importlib.import_module(path.split(":")[0]), path.split(":")[1]) for path in JOB_ENVIRONMENTS]


def job_environment(environ: Mapping[str, str] | None = None) -> JobEnvironment:
    env = dict(os.environ if environ is None else environ)
    return next((cls(env) for cls in scheduler_classes() if cls.detect(env)), JobEnvironment(env))
