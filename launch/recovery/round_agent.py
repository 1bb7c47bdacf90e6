"""A task wrapper's side of in-job restarts (launch.recovery.rounds): where this task's rank runs in each round (or that
it waits as a spare), and when a round is over. Torch-free: it runs in every task wrapper."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch import launch_config
from gpt.errors import UserError
from gpt.run_folder import Next, RunFolder
from gpt.resilience.lease import read_beat
from gpt.resilience.timing import ABORT_GRACE_S, ENDED_EXIT_S, ENDED_LOOK_S, LEASE_BEAT_S, ROUND_SILENT_S
from launch.rank.job_env import ROUND_VAR, JobEnvironment
from launch.recovery.node_heartbeat import node_local_dir, private_folder
from launch.recovery.peer_view import NodeView, release
from launch.recovery.rounds import Rounds, round_record, tasks_per_node
from launch.run.startup import ATTEMPT_START

POLL_S = 0.2
LOOK_S = 1.0  # a look for the next round is a lookup on the shared file system: one a second at most
log = logging.getLogger(__name__)


class RoundSilent(RuntimeError):
    """A spare's round ended without a word: no line in the attempts log, no next round, no sign of life."""


@dataclass
class RoundLife:
    """When round `k` of the job's attempt last showed a sign of life: its rank 0's beat of the run folder's lease
    moved (read once a beat at most). A waiting task counts from its own start until the round's first beat."""

    run_dir: Path
    job: JobEnvironment
    k: int
    since: float = field(default_factory=time.monotonic)
    seen: tuple[int, int] | None = None
    looked: float = float("-inf")

    def silent_s(self) -> float:
        now = time.monotonic()
        if now - self.looked >= LEASE_BEAT_S:
            self.looked = now
            try:
                beat = read_beat(self.run_dir)
            except UserError:  # unreadable: no sign of life this time
                beat = None
            ours = beat is not None and not beat.ended and (beat.job_id, beat.restart, beat.round, beat.launch) == (
                self.job.job_id, self.job.restart, self.k, self.job.launch)
            if ours and (beat.generation, beat.seq) != self.seen:
                self.seen, self.since = (beat.generation, beat.seq), now
        return now - self.since


@dataclass
class RoundAgent:
    """One task wrapper of a Slurm job: its host, its place among its node's tasks, and the job's rounds."""

    run_dir: Path
    job: JobEnvironment
    host: str

    def __post_init__(self) -> None:
        try:
            run = launch_config.load(RunFolder(self.run_dir).config)
        except UserError:  # the task wrapper already said so (configured_signals): no rounds, no spares
            self.spare_nodes, self.suffix, self.in_job_restarts = 0, "", 0
            self.silent_s = ENDED_EXIT_S
        else:
            self.spare_nodes = run.cluster.spare_nodes if run.cluster.name != "local" else 0
            self.suffix = run.cluster.master_host_suffix or ""
            self.in_job_restarts = run.preemption.in_job_restarts
            # A round silent this long has ended: a live rank's watchdog ends it within the run's longest budget
            # (a step, a save, the start-up), and its attempt's line or next round follows within a fired rank's
            # exit (ROUND_SILENT_S).
            self.silent_s = run.watchdog.process_group_timeout() + ROUND_SILENT_S
        self.rounds = Rounds.of(self.run_dir, self.job)
        self.looked: dict[int, float] = {}  # round -> when its next round was last looked for, not found
        self.local: Path | None = None  # the node's folder, once this task shares its lookups there (share_on_node)
        self.views: dict[str, NodeView] = {}

    def share_on_node(self) -> None:
        """From now on the node's task wrappers share their looks at the run folder (launch.recovery.peer_view): for
        the next round and for the attempt's line, one per node, not one per task. Without the node's folder (another
        user's, no memory left), this task looks alone."""
        try:
            local = node_local_dir(self.run_dir, self.host)
            private_folder(local.parent)
            local.mkdir(exist_ok=True)
        except (OSError, UserError) as e:
            log.warning("%s: this task looks at the run folder alone (%s)", self.host, e)
            return
        self.local = local
        self.views = {"next": NodeView(local, LOOK_S, "next-round"), "ended": NodeView(local, ENDED_LOOK_S, "ended")}

    def release(self) -> None:
        """The task ends: the node's last process removes what they shared."""
        if self.local is not None:
            release(self.local)

    def _looked_up(self, view: str, key: list, look) -> bool:
        return self.views[view].read(key, look) if view in self.views else look()

    def placement(self, k: int) -> dict[str, str] | None:
        """The variables that place this task's rank in round `k`; None: this task waits as a spare."""
        record = round_record(self.run_dir, self.job, self.spare_nodes, k)
        hosts = record["hosts"]
        if self.host not in hosts:
            return None
        env = self.job.environ
        place = {ROUND_VAR: str(k)}
        if k:  # the round's start-up counts from its request (launch.run.startup, "restart in job" in goodput)
            place[ATTEMPT_START] = f"{record['requested']:.3f}"
        if hosts == self.job.hosts:  # every node of the job runs ranks, in Slurm's order
            return place
        per_node = tasks_per_node(self.job)  # a round on fewer nodes (preemption.shrink) has fewer ranks
        node = hosts.index(self.host)
        place.update({"SLURM_PROCID": str(node * per_node + int(env.get("SLURM_LOCALID", "0"))),
                      "SLURM_NTASKS": str(len(hosts) * per_node), "SLURM_NNODES": str(len(hosts)),
                      "SLURM_JOB_NUM_NODES": str(len(hosts)), "SLURM_NODEID": str(node)})
        if hosts[0] != self.job.hosts[0]:
            place["MASTER_ADDR"] = hosts[0] + self.suffix
        return place

    def next_asked(self, k: int, now: bool = False) -> bool:
        """Whether round `k` + 1 has been asked for: round `k` is over. Looked up once a second at most, unless
        `now` (once per rank that ended: its end may be that request's); never without in-job restarts, where no
        round follows (a file-system lookup per task per second that nothing would ever find)."""
        if not self.in_job_restarts:
            return False
        if not now and time.monotonic() - self.looked.get(k, -LOOK_S) < LOOK_S:
            return False
        path = self.rounds.path(k + 1)
        if path.exists() if now else self._looked_up("next", [str(path)], path.exists):
            self.looked.pop(k, None)
            return True
        self.looked[k] = time.monotonic()
        return False

    def attempt_ended(self, k: int) -> bool:
        """Whether round `k`'s attempt has its line in the attempts log (read once per node per ENDED_LOOK_S, once
        shared)."""
        job = self.job
        key = [str(self.run_dir), job.job_id, job.restart, k, job.launch]
        return self._looked_up("ended", key, lambda: RunFolder(self.run_dir).attempts.line_of(
            job.job_id, job.restart, k, job.launch) is not None)

    def wait_next(self, k: int, seconds: float = ABORT_GRACE_S) -> bool:
        """A rank of round `k` ended with an error: whether the next round is asked for within `seconds` (the rank
        that records the attempt decides; once its line says otherwise, there is none)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.next_asked(k):
                return True
            line = RunFolder(self.run_dir).attempts.line_of(self.job.job_id, self.job.restart, k, self.job.launch)
            if line is not None and line.next is not Next.RESTART:
                return self.next_asked(k)
            time.sleep(POLL_S)
        return self.next_asked(k)

    def idle(self, k: int) -> int | None:
        """A spare in round `k`: the next round once asked for, or None once the run ended without one. Under
        --no-kill nothing else ends this task: RoundSilent once the round wrote no line and asked for no next
        round within `silent_s` of its last sign of life (the allocation is not held to its time limit)."""
        folder, life = RunFolder(self.run_dir), RoundLife(self.run_dir, self.job, k)
        while not self.next_asked(k, now=True):  # a spare looks as often as it polls: it is one of few
            line = folder.attempts.line_of(self.job.job_id, self.job.restart, k, self.job.launch)
            if line is not None and line.next is not Next.RESTART:
                return None
            if (silent := life.silent_s()) > self.silent_s:
                raise RoundSilent(
                    f"{self.host} waited as a spare in round {k} of job {self.job.job_id} (restart "
                    f"{self.job.restart}), which showed no sign of life for {silent:.0f} s (its lease did not beat) "
                    f"and wrote no line in {folder.attempts.log}: its ranks ended without a word; this task ends "
                    f"rather than hold its node to the time limit")
            time.sleep(POLL_S)
        return k + 1
