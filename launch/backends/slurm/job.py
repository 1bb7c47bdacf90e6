"""A rank inside a Slurm job: the job id, the restart count, and `scontrol requeue`."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

from launch.backends.slurm import chain, commands
from launch.backends.slurm.commands import SlurmUnavailable
from launch.backends.slurm.preemptor import preempted_after, preempting
from launch.rank.job_env import JobEnvironment, Preemption
from launch.recovery.rounds import hosts_of

REQUEUE_TRIES = 4  # scontrol requeue, tried again after 1, 2 and 4 s while the controller fails transiently
REQUEUE_BACKOFF_S = 1.0
WARNING_EARLY_S = 60  # Slurm sends the time limit's warning (--signal=SIG@N) up to this much early
# Set in the steps of a packed allocation (hydra.launcher.pack): a point's rank leaves the requeue to the packer, which
# asks for it once every running point has saved (a requeue ends every step of the allocation).
PACKED_VAR = "GPTLAUNCH_PACKED"
# What names a job's nodes, and what names a step's (Slurm sets both in every task of a step)
STEP_AS_JOB = {"SLURM_JOB_NODELIST": "SLURM_STEP_NODELIST", "SLURM_NODELIST": "SLURM_STEP_NODELIST",
               "SLURM_JOB_NUM_NODES": "SLURM_STEP_NUM_NODES", "SLURM_NNODES": "SLURM_STEP_NUM_NODES"}


def packed_step_as_job(env: Mapping[str, str]) -> dict[str, str]:
    """In a packed point's step, its run's job is the step: its ranks place themselves, find their master and their
    lost nodes among the step's nodes, not the allocation's, which also holds other points' (measured on Slurm
    22.05: in a step on 2 of an allocation's 4 nodes, SLURM_JOB_NODELIST and SLURM_JOB_NUM_NODES name the 4)."""
    if not env.get(PACKED_VAR):
        return {}
    return {job: env[step] for job, step in STEP_AS_JOB.items() if env.get(step)}



def first_int(env: dict[str, str], *keys: str) -> int | None:
    """The first of `keys` that is set, as Slurm's per-node counts give it (the first node's)."""
    for key in keys:
        value = env.get(key, "")
        head = value.split("(")[0].split(",")[0]  # SLURM_TASKS_PER_NODE looks like "2(x3),1"
        if head.isdigit():
            return int(head)
    return None


def gpus_on_node(env: dict[str, str]) -> int:
    """GPUs Slurm gave this node of the job (0 on CPU nodes)."""
    gpus = first_int(env, "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")
    if gpus is not None:
        return gpus
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    return len([d for d in visible.split(",") if d.strip()]) if visible and visible != "NoDevFiles" else 0


class SlurmJob(JobEnvironment):
    scheduler = "slurm"

    def __init__(self, environ: Mapping[str, str] | None = None):
        super().__init__(environ)
        self._preempted: tuple[str, str] | None = None  # (PreemptTime, what preemption() says of it)

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> bool:
        return bool(environ.get("SLURM_JOB_ID"))

    @classmethod
    def in_step(cls, environ: Mapping[str, str]) -> bool:
        return "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and "SLURM_STEP_ID" in environ

    @classmethod
    def place(cls, environ: Mapping[str, str]):
        from launch.backends.slurm.placement import from_slurm  # torch's DistEnv: only a rank places itself

        return from_slurm(environ, gpus_on_node(environ))

    @property
    def job_id(self) -> str | None:
        """The id the launcher, squeue -r and scontrol know the job by: 11_1 for task 1 of array 11, whose own job
        id (SLURM_JOB_ID) is another number, and `scontrol requeue 11` would requeue every task of the array, every
        other point of a sweep."""
        array, task = self.environ.get("SLURM_ARRAY_JOB_ID"), self.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{array}_{task}" if array and task else self.environ.get("SLURM_JOB_ID") or None

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

    def next_link(self, run_dir) -> str | None:
        return chain.next_link(run_dir, self.job_id)

    def end_reason(self, job_id: str) -> str:
        if job_id == self.job_id:  # this very job runs again: Slurm requeued it (a node failure, preemption)
            return self.requeued_why()
        try:
            info = commands.scontrol_job(job_id)
        except SlurmUnavailable:
            info = None
        state = info.state if info else commands.sacct_state(job_id)
        return f"stopped by Slurm: job {job_id} ended {state}" if state else f"killed outright (job {job_id})"

    def requeued_why(self) -> str:
        """This very job runs again and its attempt before left no word: Slurm requeued it. Accounting's record of
        that attempt says why (PREEMPTED: killed when the grace time ran out, before its ranks' save finished and
        they could say so); without accounting Slurm cannot tell."""
        before = commands.sacct_attempts(self.job_id)[:-1]  # the last record is this attempt's
        state, ended, nodes = before[-1] if before else ("", "", "")
        if state == "PREEMPTED":
            partition, qos = self.environ.get("SLURM_JOB_PARTITION") or "?", self.environ.get("SLURM_JOB_QOS") or "?"
            by = preempted_after(self.job_id, ended, nodes, partition, qos)
            return (f"requeued by Slurm: preempted {by} at {ended} (accounting: PREEMPTED); the run's "
                    f"{preemption_policy(partition, qos)}; killed when its grace time ran out, before its ranks' save "
                    "finished (the grace time is shorter than a save: docs/slurm.md)")
        if state == "NODE_FAIL":  # the node, with Slurm's reason while it still holds one
            said = commands.lost_nodes(nodes) or ", ".join(f"{n} ({why})" for n, why in
                                                           commands.node_reasons(nodes).items())
            return f"requeued by Slurm after a node failure (accounting: NODE_FAIL at {ended}{'; ' * bool(said)}{said})"
        return "requeued by Slurm (the attempt was stopped without a word: a node failure or preemption)"

    job_state = staticmethod(commands.job_standing)

    def lost_nodes(self) -> str:
        """Down, failed or not responding by sinfo, or taken out of this job by Slurm (its NodeList drops them)."""
        nodelist = self.environ.get("SLURM_JOB_NODELIST")
        said = commands.lost_nodes(nodelist)
        dropped = [h for h in commands.dropped_nodes(self.job_id, nodelist) if h not in hosts_of(said)]
        why = commands.node_reasons(",".join(dropped)) if dropped else {}  # sinfo may show them back in service
        return ", ".join(filter(None, [said, *(f"{h} down ({why[h] + '; ' if h in why else ''}taken out of job "
                                               f"{self.job_id} by Slurm)" for h in dropped)]))

    def cancelled(self) -> bool:
        """scancel: accounting says CANCELLED at once; the controller shows the job COMPLETING (KillWait runs)
        without a requeue, before its time limit (a preemption's grace time leaves it RUNNING, and requeues it)."""
        if (said := commands.sacct_state(self.job_id)) in commands.FINAL:
            return said == "CANCELLED"
        try:
            info = commands.scontrol_job(self.job_id)
        except SlurmUnavailable:
            return False
        ending = info is not None and info.state in ("CANCELLED", "COMPLETING")
        return ending and not self._requeued(self.job_id, info) and not commands.timed_out(info)

    def time_limit(self, warning_s: float) -> str | None:
        """Slurm's TimeLimit reason once it ends the job there, or a run time within the warning's lead of the limit
        (Slurm may send the warning up to WARNING_EARLY_S early): not a preemption, nor a user's signal."""
        try:
            info = commands.scontrol_job(self.job_id)
        except SlurmUnavailable:
            return None
        if info is None:
            return None
        limit = info.get("TimeLimit") or "?"
        if info.reason == "TimeLimit" or commands.timed_out(info):
            return f"stopped by Slurm: job {self.job_id} ended TIMEOUT (its time limit, {limit})"
        left = _left_s(info)
        if left is not None and left <= warning_s + WARNING_EARLY_S:
            return f"job {self.job_id}'s time limit ({limit}) is {left} s away"
        return None

    def preemption(self) -> Preemption | None:
        """Slurm preempts this job for another: scontrol shows its PreemptTime while the partition's grace time runs,
        and squeue the job it preempts for (launch.backends.slurm.preemptor), asked once per preemption. PreemptMode=
        CANCEL ends the job; REQUEUE requeues it, but only once the grace time is out (a job that ends inside it is not
        requeued by Slurm: it requeues itself)."""
        try:
            info = commands.scontrol_job(self.job_id)
        except SlurmUnavailable:
            return None
        when = info.get("PreemptTime") if info else None
        if info is None or not when or when in ("None", "Unknown"):
            return None
        if self._preempted is None or self._preempted[0] != when:
            policy = preemption_policy(info.get("Partition") or "?", info.get("QOS") or "?")
            self._preempted = when, f"preempted {preempting(info)} at {when}; the run's {policy}"
        said = self._preempted[1]
        return Preemption(said, "PreemptMode=CANCEL" not in said)

    @property
    def requeue_ends_attempt(self) -> bool:
        """A packed point's requeue is its allocation's, asked by the packer once this point's step has ended."""
        return not self.environ.get(PACKED_VAR)

    def requeue(self, max_restarts: int) -> tuple[bool, str]:
        """Ask Slurm to run this job again (same job id), only while it runs (RUNNING, or SIGNALING in a preemption's
        grace time). Only a grown restart count or a REQUEUED state means requeued: a COMPLETING job is as likely
        cancelled, timed out or failed. A job Slurm preempts with PreemptMode=CANCEL is not: the site's policy ends it.
        One it preempts with REQUEUE is, past max_restarts too: the limit bounds the job's own requeues, and Slurm would
        requeue it at the end of the grace time had it not ended inside it."""
        job = self.job_id
        preempted = self.preemption()
        if preempted is not None and not preempted.requeues:
            return False, f"not requeued: Slurm's preemption cancels job {job}"
        past = self.restart >= max_restarts
        if past and preempted is None:
            return False, f"restart limit reached ({self.restart} of preemption.max_restarts={max_restarts})"
        if self.environ.get(PACKED_VAR):
            return True, f"job {job} (packed) requeues once every running point of it has saved"
        try:
            info = commands.scontrol_job(job)
        except SlurmUnavailable:  # a controller that does not answer now may answer the requeue, retried
            pass
        else:
            already = self._requeued(job, info)
            if already:
                return True, already
            if info is None or info.state not in commands.REQUEUABLE:
                return False, _not_requeued(job, info)
        error = self._ask_requeue(job)
        if error is None:
            if preempted is not None:  # Slurm would requeue it anyway: the limit bounds the job's own requeues only
                return True, (f"requeued job {job} after Slurm's preemption (restart {self.restart + 1}; "
                              f"preemption.max_restarts={max_restarts} does not stop PreemptMode=REQUEUE)")
            return True, f"requeued job {job} (restart {self.restart + 1} of at most {max_restarts})"
        return False, f"scontrol requeue {job} failed ({error}): submit the same command again to resume"

    def _requeued(self, job: str, info: commands.JobInfo | None) -> str | None:
        """Why the job already runs again, or None: Slurm counts a restart as soon as it requeues a job."""
        if info is None:
            return None
        restarts = info.restarts
        if restarts <= self.restart and info.state not in commands.REQUEUED:
            return None
        lost = commands.lost_nodes(self.environ.get("SLURM_JOB_NODELIST"))  # down now: one dropped long ago is not
        if lost:
            return f"requeued by Slurm after a node failure ({lost}; job {job} is on restart {restarts})"
        return f"requeued by Slurm or by another rank already (job {job} is on restart {restarts})"

    def _ask_requeue(self, job: str) -> str | None:
        """`scontrol requeue`, retried with backoff while the controller's errors are transient; None once Slurm
        took it. Before a retry the restart count is read again: a call whose answer was lost may have worked."""
        delay = REQUEUE_BACKOFF_S
        for _ in range(REQUEUE_TRIES):
            try:
                commands.requeue(job)
                return None
            except SlurmUnavailable as e:
                error = e
            with contextlib.suppress(SlurmUnavailable):
                if self._requeued(job, commands.scontrol_job(job)):
                    return None
            if not commands.transient(error):
                break
            time.sleep(delay)
            delay *= 2
        return str(error)

    def requeue_excluding(self, hosts: list[str], max_restarts: int) -> tuple[bool, str]:
        """Requeue the job, and keep it off `hosts` (Slurm's ExcNodeList, added to what it already excludes), as
        long as the partition keeps enough nodes for it; else requeue it all the same, on them, saying why."""
        job = self.job_id
        try:
            info = commands.scontrol_job(job)
            if info is None:
                return False, f"job {job} is unknown to Slurm"
            kept = self._kept(hosts, info)
            if kept:  # a requeue that cannot leave them out still runs the job again
                requeued, how = self.requeue(max_restarts)
                return requeued, f"{how}; {kept}"
            excluded = set(hosts) | set(_nodes(info.get("ExcNodeList")))
            requeued, how = self.requeue(max_restarts)
        except SlurmUnavailable as e:
            return False, f"could not requeue job {job} without {', '.join(hosts)}: {e}"
        if not requeued:
            return False, how
        nodes = ",".join(sorted(excluded))
        if not _retry(lambda: commands.exclude_nodes(job, sorted(excluded))):
            return True, f"{how}, but Slurm refused ExcNodeList={nodes}: it may run on them again"
        return True, f"{how}, without {nodes} (ExcNodeList)"

    def cannot_spare(self, hosts: list[str]) -> str:
        try:
            info = commands.scontrol_job(self.job_id)
            return self._kept(hosts, info) if info is not None else ""
        except SlurmUnavailable:  # the requeue asks again
            return ""

    @staticmethod
    def _kept(hosts: list[str], info: commands.JobInfo) -> str:
        """Why a requeue cannot leave `hosts` out ('' when it can): the job asks for one by name (excluding it would
        leave the job pending for ever, BadConstraints), or its partition, less what the job excludes already
        (ExcNodeList grows over the job's life), would keep too few nodes."""
        named = sorted(set(hosts) & set(_nodes(info.get("ReqNodeList"))))
        if named:
            return (f"not without {', '.join(named)}: the job asks for it by name (--nodelist, "
                    "cluster.sbatch.nodelist): leave it out of that list to keep the run off it")
        excluded = set(hosts) | set(_nodes(info.get("ExcNodeList")))
        partition = commands.run("sinfo", "-h", "-N", "-p", info.get("Partition", ""), "-o", "%N").split()
        need, left = _int((info.get("NumNodes") or "").split("-")[0]), len(set(partition) - excluded)
        if left < need:
            return (f"keeping {', '.join(hosts)}: partition {info.get('Partition')} cannot spare it ({left} node(s) "
                    f"would remain for a {need}-node job)")
        return ""


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


def _not_requeued(job: str, info: commands.JobInfo | None) -> str:
    if info is None:
        return f"job {job} is unknown to Slurm: not requeued"
    if info.reason == "TimeLimit" or commands.timed_out(info):
        return f"stopped by Slurm: job {job} ended TIMEOUT (its time limit, {info.get('TimeLimit')}): not requeued"
    reason = f", {info.reason}" if info.reason not in ("", "None") else ""
    if info.state == "COMPLETING":  # this attempt ends, and nothing asked Slurm to run it again
        return f"job {job} is ending (COMPLETING{reason}: cancelled, timed out or failed): not requeued"
    return f"job {job} is {info.state}{reason}: not requeued; Slurm decides what happens next"


def _left_s(info: commands.JobInfo) -> int | None:
    run, limit = (commands.duration_s(info.get(k) or "") for k in ("RunTime", "TimeLimit"))
    return None if run is None or limit is None else limit - run


def _nodes(value: str | None) -> list[str]:
    return commands.hostnames(value) if value and value != "(null)" else []


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def preemption_policy(partition: str, qos: str) -> str:
    """'partition low: PreemptMode=REQUEUE, GraceTime=20 s': what preemption does to the job, by its partition's
    settings, or by its QOS's where the cluster preempts by QOS (PreemptType=preempt/qos: 'QOS low: ...')."""
    where, mode, grace = commands.preemption_settings(partition, qos)
    return f"{where}: PreemptMode={mode}" + (f", GraceTime={grace} s" if grace is not None else "")
