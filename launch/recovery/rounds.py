"""In-job restarts: the rounds of ranks inside one allocation. Torch-free.

A job's attempt (its Slurm restart) runs round 0 of its ranks. When a round ends because a rank was lost, a hang was
seen or a node failed its health check, the rank that records the attempt asks for the next round here instead of
requeueing the job, as long as preemption.in_job_restarts allows and enough healthy nodes remain (a spare node,
cluster.spare_nodes, replaces a lost one). Every task wrapper (launch.backends.slurm.task) watches for that request,
stops its rank if it still runs, and starts the rank of the next round on the nodes the request names: same world
size, same layout, a new rendezvous port (launch.rank.environment.master_port), resumed from the newest checkpoint. With
no spare left, preemption.shrink=auto runs it on the nodes left instead (launch.recovery.shrink: fewer data-parallel
ranks, the same global batch); the tasks of the lost nodes start no rank.

    RUN_DIR/rounds/job<J>-restart<R>/round-<K>.json   created once (link(2) of a complete file) by the one that asks
    RUN_DIR/rounds/launch-<L>/round-<K>.json           the same, for launch L inside an allocation (local, srun)
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launch import launch_config
from gpt.run_folder import RunFolder, claim
from launch.rank.job_env import ROUND_VAR, JobEnvironment
from launch.recovery.shrink import Shrink, shrink


@dataclass(frozen=True)
class Rounds:
    """The round requests of one attempt of a job (`name`: its job and restart, or the launch that started its ranks
    inside an allocation: launches that share one never share rounds)."""

    run_dir: Path
    name: str

    @classmethod
    def of(cls, run_dir: Path, job: JobEnvironment) -> Rounds:
        return cls.named(run_dir, job.job_id, job.restart, job.launch)

    @classmethod
    def named(cls, run_dir: Path, job_id: str | None, restart: int, launch: str = "") -> Rounds:
        return cls(Path(run_dir), f"launch-{launch}" if launch else f"job{job_id}-restart{restart}")

    def path(self, k: int) -> Path:
        return RunFolder(self.run_dir).rounds / self.name / f"round-{k}.json"

    def health(self) -> Path:
        """The nodes' health figures measured in this attempt's rounds so far: a later round measures only the
        nodes new to it (a spare), against these (launch.recovery.health_gate)."""
        return RunFolder(self.run_dir).rounds / self.name / "health.json"

    def newest(self) -> int:
        """The newest round asked for (0: none was)."""
        asked = (RunFolder(self.run_dir).rounds / self.name).glob("round-*.json")
        numbers = (p.stem.removeprefix("round-") for p in asked)
        return max((int(k) for k in numbers if k.isdigit()), default=0)

    def read(self, k: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(k).read_text())
        except (OSError, ValueError):
            return None

    def request(self, k: int, record: dict[str, Any]) -> bool:
        """Ask for round `k`; False when another process asked first (its request stands)."""
        path = self.path(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        return claim(path, json.dumps(record))


IN_JOB = "restarting inside the allocation"


@dataclass(frozen=True)
class InJobRestart:
    """The next round: its number, the hosts its ranks run on (node order), the spares left, and why."""

    round: int
    hosts: list[str]
    spares: list[str]
    cause: str
    limit: int
    replaced: dict[str, str] = field(default_factory=dict)  # lost host -> the spare that takes its place
    shrunk: Shrink | None = None  # on the nodes left: fewer ranks, the same global batch (preemption.shrink)

    @property
    def note(self) -> str:
        spare = "".join(f", {new} replaces {old}" for old, new in self.replaced.items())
        fewer = f", {self.shrunk.said}" if self.shrunk else ""
        return f"{IN_JOB} (in-job restart {self.round} of at most {self.limit}{spare}{fewer})"

    def record(self) -> dict[str, Any]:
        """What the attempt's line says of it."""
        return {"in_job_restart": self.round, **({"replaced": self.replaced} if self.replaced else {}),
                **({"shrunk": self.shrunk.record()} if self.shrunk else {})}

    def begin(self, run_dir: Path, job: JobEnvironment) -> None:
        """Ask the task wrappers for this round (once the attempt's line is written: the round reads it)."""
        Rounds.of(run_dir, job).request(self.round, {**asdict(self), "requested": time.time()})


def first_round(job: JobEnvironment, spare_nodes: int) -> dict[str, Any]:
    """Round 0: the job's first nodes run the ranks, its last `spare_nodes` wait as spares."""
    hosts = job.hosts
    keep = max(len(hosts) - spare_nodes, 1)
    return {"round": 0, "hosts": hosts[:keep], "spares": hosts[keep:]}


class RoundUnreadable(RuntimeError):
    """A round was asked for and its request cannot be read: where its ranks run is unknown."""


def round_record(run_dir: Path, job: JobEnvironment, spare_nodes: int, k: int) -> dict[str, Any]:
    """Round `k` of the job's attempt: its hosts and spares. A later round's request must be read: round 0's
    placement in its stead would start ranks on the node it replaced, or a spare's rank beside a live one."""
    if not k:
        return first_round(job, spare_nodes)
    path = Rounds.of(run_dir, job).path(k)
    try:
        record = json.loads(path.read_text())
        hosts = record["hosts"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        why = e.strerror if isinstance(e, OSError) else "not a round's request"
        raise RoundUnreadable(f"in-job restart {k}'s request {path} cannot be read ({why}): where its ranks run is "
                              "unknown, and round 0's nodes may hold the one it replaced") from None
    if not (isinstance(hosts, list) and hosts and all(isinstance(h, str) for h in hosts)):
        raise RoundUnreadable(f"in-job restart {k}'s request {path} names no hosts: where its ranks run is unknown, "
                              "and round 0's nodes may hold the one it replaced")
    return record


def in_job_restart(run_dir: Path, job: JobEnvironment, cause: str, exclude: list[str] | tuple[str, ...] = (),
                   may_shrink: bool = True) -> tuple[InJobRestart | None, str]:
    """The next round when one may run: (it, ''); else (None, why not: '' when no task wrapper restarts ranks).
    `may_shrink`: the excluded hosts are lost (not merely slow), so the nodes left may go on without them."""
    if ROUND_VAR not in job.environ:
        return None, ""
    run = launch_config.load(RunFolder(run_dir).config)
    limit = run.preemption.in_job_restarts
    if job.round >= limit:
        return None, f"in-job restart limit reached ({job.round} of preemption.in_job_restarts={limit})"
    try:
        now = round_record(run_dir, job, run.cluster.spare_nodes, job.round)
    except RoundUnreadable as e:
        return None, str(e)
    spares = [h for h in now["spares"] if h not in exclude]
    hosts, replaced, lost = [], {}, []
    for host in now["hosts"]:
        if host in exclude and spares:
            replaced[host] = spares.pop(0)
        elif host in exclude:
            lost.append(host)
            continue
        hosts.append(replaced.get(host, host))
    shrunk = None
    if lost:
        shrunk, why = shrink(run, len(now["hosts"]), len(hosts), tasks_per_node(job)) if may_shrink else (None, "")
        if shrunk is None:  # said only where spares or shrinking were asked for
            asked = run.cluster.spare_nodes or why
            none_left = f"too few healthy nodes to restart inside the allocation ({lost[0]} is lost, no spare left)"
            return None, "; ".join(filter(None, [none_left if asked else "", why]))
    return InJobRestart(job.round + 1, hosts, spares, cause, limit, replaced, shrunk), ""


def tasks_per_node(job: JobEnvironment) -> int:
    """Ranks per node: the job's (a round's placement keeps the ratio, launch.recovery.round_agent)."""
    env = job.environ
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    return max(int(env.get("SLURM_NTASKS", "1")) // max(nodes, 1), 1)


def lost_hosts(job: JobEnvironment) -> list[str]:
    """The job's nodes the scheduler holds down or failed (a spare takes their place)."""
    return hosts_of(job.lost_nodes())


def hosts_of(lost: str) -> list[str]:
    """The hosts of JobEnvironment.lost_nodes()'s 'gl-n2 down (reason), gl-n3 fail'."""
    return [entry.split(" ", 1)[0] for entry in lost.split(", ")] if lost else []


def finished_on_spares(run_dir: Path, job_id: str | None) -> bool:
    """Whether job `job_id` finished the run after a spare replaced a lost node (or on the nodes left,
    preemption.shrink): the tasks of that node were killed
    with it (srun then exits non-zero, and they report nothing), which does not make the run fail."""
    lines = [a for a in RunFolder(run_dir).attempts.read() if a.job_id == job_id]
    return bool(lines) and lines[-1].finished and any(a.replaced or a.shrunk for a in lines)
