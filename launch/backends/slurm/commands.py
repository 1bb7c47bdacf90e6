"""The one place that runs Slurm's client commands (scontrol, squeue, sacct, scancel) and reads their output.

Parsing is kept in pure functions, tested on recorded outputs (tests/launch/backends/slurm_outputs/), so that a
change of Slurm's format breaks one test rather than a sweep. The launcher, the ranks (through launch.rank.job_env)
and the tests all ask here. Torch-free: it runs in the launcher and in every task's wrapper.
"""
from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass, replace

from launch.backends.job_state import JobStanding, JobState, SchedulerUnavailable

# Every job state Slurm reports (squeue's %T, scontrol's JobState, sacct's State), by what it means to us.
PENDING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD",
                     "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT", "POWER_UP_NODE"})
RUNNING = frozenset({"RUNNING", "COMPLETING"})
# What a job may be requeued from: running, or running while Slurm signals it (a preemption's grace time shows a
# running job as SIGNALING, which is a flag on RUNNING; COMPLETING is an attempt that ends for good)
REQUEUABLE = frozenset({"RUNNING", "SIGNALING"})
REQUEUED = frozenset({"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})  # what only a requeue shows (COMPLETING is not)
# After these Slurm runs the job no more by itself (a PREEMPTED or NODE_FAIL job with --requeue is shown as
# PENDING or REQUEUED instead, so these are final when seen).
FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                   "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED"})
STATES = PENDING | RUNNING | FINAL
GONE = "GONE"  # Slurm no longer knows the job (past MinJobAge, and no accounting)
# Pending reasons that never clear by themselves, and what the user can do.
STUCK = {
    "JobHeldUser": "scontrol release {job}",
    "JobHeldAdmin": "ask an administrator to release it (scontrol release {job})",
    "DependencyNeverSatisfied": "scancel {job}; its dependency failed",
    "BadConstraints": "scancel {job}; no node has what it asks for",
    "PartitionNodeLimit": "scancel {job}; the partition has fewer nodes than it asks for",
}
# Errors of a controller that is busy, restarting or failing over: the same call may work a moment later.
TRANSIENT = ("Unable to contact slurm controller", "Socket timed out", "timed out", "Resource temporarily unavailable",
             "Connection refused", "Zero Bytes were transmitted", "standby mode")
TIMEOUT_S = 30
KEY = re.compile(r"^[A-Za-z][\w:/]*=")  # JobState=, CPUs/Task=, AllocNode:Sid=


def state_of(raw: str) -> str:
    """'CANCELLED by 0' -> 'CANCELLED'; 'RUNNING+' (sacct) -> 'RUNNING'; unknown words stay as they are."""
    word = raw.strip().split()[0] if raw.strip() else "UNKNOWN"
    return word.rstrip("+")


# --- parsing ---------------------------------------------------------------------------------------------
def parse_scontrol_job(text: str, job_id: str | None = None) -> dict[str, str]:
    """`scontrol [-o] show job ID` as a dict: the one-line (-o) and the multi-line format alike. Values may
    hold spaces only in the few fields Slurm ends a line with (Reason=..., Comment=...). An array's id prints
    a record per task: the one `job_id` names (12, or 11_1 for task 1 of array 11) is taken, else the first."""
    records = _scontrol_records(text)
    named = [r for r in records if job_id in (r.get("JobId"), _array_task(r))]
    return (named or records or [{}])[0]


def _scontrol_records(text: str) -> list[dict[str, str]]:
    records: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    for line in text.splitlines():
        starts = line.lstrip().startswith("JobId=")
        if (starts or not line.strip()) and fields:  # -o: a line per record; else a blank line between them
            records.append(fields)
            fields = {}
        key = None
        for word in line.split():
            if KEY.match(word):
                key, value = word.split("=", 1)
                fields[key] = value
            elif key is not None:  # a value with a space in it
                fields[key] += " " + word
    return records + [fields] if fields else records


def _array_task(fields: dict[str, str]) -> str | None:
    task = fields.get("ArrayTaskId")
    return f"{fields['ArrayJobId']}_{task}" if task and fields.get("ArrayJobId") else None


def parse_squeue(text: str) -> dict[str, tuple[str, str]]:
    """`squeue -h -o '%i|%T|%r'` -> {job id: (state, reason)}."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            out[parts[0]] = (state_of(parts[1]), parts[2].strip() if len(parts) > 2 else "")
    return out


def parse_squeue_scripts(text: str) -> list[QueuedScript]:
    """`squeue -h -o '%i|%T|%Z|%o'` -> each job's id, state, working folder and command (the batch script and the
    arguments it was submitted with, as Slurm keeps them: split at spaces)."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4 and parts[0]:
            out.append(QueuedScript(parts[0], state_of(parts[1]), parts[2], tuple(parts[3].split())))
    return out


def parse_sacct(text: str) -> str | None:
    """`sacct -n -X -P -o State -j ID` -> the job's state (its first row)."""
    for line in text.splitlines():
        if line.strip():
            return state_of(line)
    return None


def parse_sacct_jobs(text: str) -> dict[str, str]:
    """`sacct -n -X -P -o JobID,State -j A,B` -> {job id: state} (an array task as 11_1)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        job, _, state = line.strip().partition("|")
        if job and state:
            out.setdefault(job, state_of(state))
    return out


def parse_hostnames(text: str) -> list[str]:
    return text.split()


# --- running -------------------------------------------------------------------------------------------
class SlurmUnavailable(SchedulerUnavailable):
    """A client command failed to answer (not found, timed out, or the controller is down)."""

    scheduler = "Slurm"


def run(*cmd: str, timeout: float = TIMEOUT_S, keep_on_term: bool = False) -> str:
    """`keep_on_term`: the command ignores SIGTERM, for one run from a job that is being requeued (Slurm sends
    every process of the job SIGTERM, and SIGKILL only KillWait seconds later)."""
    ignore = (lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)) if keep_on_term else None
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, preexec_fn=ignore)
    except FileNotFoundError as e:
        raise SlurmUnavailable(f"{cmd[0]} is not on PATH") from e
    except subprocess.SubprocessError as e:
        raise SlurmUnavailable(f"{' '.join(cmd)}: {e}") from e
    if proc.returncode != 0:
        raise SlurmUnavailable(f"{' '.join(cmd)}: {(proc.stderr or proc.stdout).strip()[:300]}")
    return proc.stdout


@dataclass(frozen=True)
class QueuedScript:
    job_id: str
    state: str
    workdir: str
    command: tuple[str, ...]  # the batch script, then its arguments


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str
    reason: str = ""
    fields: tuple[tuple[str, str], ...] = ()
    mine: bool = True  # `squeue --me` lists it (False: only sacct or scontrol know it, as of another user's job)

    def get(self, key: str, default: str | None = None) -> str | None:
        return dict(self.fields).get(key, default)

    @property
    def restarts(self) -> int:
        """How often Slurm has requeued the job (scontrol's Restarts; 0 when it does not say)."""
        value = self.get("Restarts") or ""
        return int(value) if value.isdigit() else 0

    @property
    def stuck_hint(self) -> str | None:
        """How to unstick a pending job that will not start by itself, or None."""
        hint = STUCK.get(self.reason)
        return hint.format(job=self.job_id) if hint and self.state in PENDING else None


def timed_out(info: JobInfo) -> bool:
    """The job has run its time limit (scontrol's RunTime and TimeLimit, [D-]HH:MM:SS)."""
    run, limit = (duration_s(info.get(k) or "") for k in ("RunTime", "TimeLimit"))
    return run is not None and limit is not None and run >= limit


def duration_s(text: str) -> int | None:
    """'1-02:03:04', '02:03:04', '03:04' -> seconds; None for UNLIMITED or anything else."""
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if not (days.isdigit() or not days) or not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return seconds + 86400 * int(days or 0)


def standing(info: JobInfo) -> JobStanding:
    """Slurm's answer as the scheduler-neutral state the code outside the backend decides on. A word this list does
    not know counts as running: a run folder's lease then goes by its beat."""
    word = info.state
    state = (JobState.GONE if word == GONE else JobState.PENDING if word in PENDING else JobState.ENDING
             if word == "COMPLETING" else JobState.ENDED if word in FINAL else JobState.RUNNING)
    return JobStanding(info.job_id, state, word, info.reason if info.reason != "None" else "",
                       f"scancel {info.job_id}", f"squeue -j {info.job_id}", info.stuck_hint, word == "CANCELLED",
                       theirs=state.live and not info.mine)


def job_standing(job_id: str) -> JobStanding | None:
    """Where one job stands, from scontrol, or accounting once scontrol has forgotten it; None when Slurm cannot
    be asked (a run folder's lease then goes by its beat)."""
    try:
        info = scontrol_job(job_id) or JobInfo(job_id, sacct_state(job_id) or GONE)
    except SlurmUnavailable:
        return None
    return standing(info)


def scontrol_job(job_id: str) -> JobInfo | None:
    """None when Slurm does not know the job (any more); SlurmUnavailable when it cannot be asked."""
    try:
        fields = parse_scontrol_job(run("scontrol", "-o", "show", "job", str(job_id)), str(job_id))
    except SlurmUnavailable as e:
        if "Invalid job id" in str(e):
            return None
        raise
    if not fields.get("JobState"):
        return None
    return JobInfo(str(job_id), state_of(fields["JobState"]), fields.get("Reason", ""), tuple(fields.items()))


def squeue(job_ids: list[str]) -> dict[str, JobInfo]:
    """The given jobs squeue still lists (array tasks one by one)."""
    rows = parse_squeue(run("squeue", "--me", "--states=all", "-h", "-r", "-o", "%i|%T|%r"))
    return {j: JobInfo(j, *rows[j]) for j in job_ids if j in rows}


def queued_scripts() -> list[QueuedScript]:
    """This user's batch jobs that wait, are held, suspended or run, with the script each was submitted with."""
    return parse_squeue_scripts(run("squeue", "--me", "-h", "-t", "PENDING,REQUEUED,REQUEUE_HOLD,REQUEUE_FED,"
                                    "CONFIGURING,SUSPENDED,RUNNING", "-o", "%i|%T|%Z|%o"))


def sacct_state(job_id: str) -> str | None:
    try:
        return parse_sacct(run("sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)))
    except SlurmUnavailable:
        return None


def sacct_attempts(job_id: str) -> list[tuple[str, str, str]]:
    """Every attempt of the job that accounting recorded, oldest first: (state, end time, nodes); [] without
    accounting. A requeued job keeps one record per attempt (`sacct -D`): PREEMPTED, NODE_FAIL, REQUEUED, then its
    current."""
    try:
        text = run("sacct", "-n", "-D", "-X", "-P", "-o", "State,End,NodeList", "-j", str(job_id))
    except SlurmUnavailable:
        return []
    return parse_sacct_attempts(text)


def parse_sacct_attempts(text: str) -> list[tuple[str, str, str]]:
    rows = [line.strip().split("|") for line in text.splitlines() if line.strip()]
    return [(state_of(row[0]), row[1], row[2]) for row in rows if len(row) == 3]


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """One sacct call for all the jobs: {job id: state} of those accounting knows ({} without accounting)."""
    if not job_ids:
        return {}
    try:
        return parse_sacct_jobs(run("sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)))
    except SlurmUnavailable:
        return {}


def job_infos(job_ids: list[str]) -> dict[str, JobInfo]:
    """Every job's state and pending reason: one squeue for all of them; for those it no longer lists, one sacct
    for all, then scontrol for each it does not know either (a job of another user: rare, and once per job, since
    a job ends when it is GONE), else GONE. Raises SlurmUnavailable when the controller cannot be asked at all, so
    that a caller never takes an outage for jobs that are gone."""
    infos = squeue(job_ids)
    missing = [job for job in job_ids if job not in infos]
    ended = sacct_states(missing)
    for job in missing:  # squeue --states=all lists every job of this user's that may still run
        found = JobInfo(job, ended[job]) if job in ended else scontrol_job(job) or JobInfo(job, GONE)
        infos[job] = replace(found, mine=False)
    return infos


def partition_field(partition: str, key: str) -> str | None:
    """One field of `scontrol -o show partition P` (PreemptMode, GraceTime, ...); None when Slurm cannot say."""
    try:
        text = run("scontrol", "-o", "show", "partition", partition)
    except SlurmUnavailable:
        return None
    return next((w.split("=", 1)[1] for w in text.split() if w.startswith(f"{key}=")), None)


def controller_config() -> dict[str, str]:
    """The controller's running configuration (`scontrol show config`: PreemptType, PreemptMode, ...); empty when
    Slurm cannot say."""
    try:
        text = run("scontrol", "show", "config")
    except SlurmUnavailable:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in text.splitlines()) if _}


def qos_fields(qos: str) -> tuple[str, str] | None:
    """(PreemptMode, GraceTime as [DD-]HH:MM:SS) of QOS `qos`, from accounting; None when it cannot say."""
    try:
        rows = run("sacctmgr", "-n", "-P", "show", "qos", qos, "format=PreemptMode,GraceTime").split()
    except SlurmUnavailable:
        return None
    return tuple(rows[0].split("|")) if rows and rows[0].count("|") == 1 else None


def preemption_settings(partition: str, qos: str | None) -> tuple[str, str, int | None]:
    """(where they are set, 'partition P' or 'QOS Q'; its PreemptMode; its GraceTime in seconds, None when Slurm
    does not say): the partition's, or the QOS's where the cluster preempts by QOS (PreemptType=preempt/qos)."""
    config = controller_config()
    if config.get("PreemptType") == "preempt/qos":
        mode, grace = (qos_fields(qos) if qos else None) or ("?", "")
        if mode.lower() in ("cluster", ""):  # the cluster's own PreemptMode
            mode = config.get("PreemptMode") or "?"
        return f"QOS {qos}", mode.upper(), duration_s(grace) if grace else None
    mode = partition_field(partition, "PreemptMode") or "?"
    grace = partition_field(partition, "GraceTime")
    return f"partition {partition}", mode, int(grace) if grace and grace.isdigit() else None


def requeue(job_id: str) -> None:
    """Run from inside the job: the requeue sends SIGTERM to every process of the job, scontrol included."""
    run("scontrol", "requeue", str(job_id), timeout=60, keep_on_term=True)


def transient(error: SlurmUnavailable) -> bool:
    return any(text in str(error) for text in TRANSIENT)


def lost_nodes(nodelist: str | None) -> str:
    """'gl-n2 down (Not responding)': the nodes of `nodelist` Slurm holds down, failed or not responding, with
    Slurm's own reason; '' when none (or when Slurm cannot say)."""
    if not nodelist or nodelist == "(null)":
        return ""
    try:
        rows = run("sinfo", "-h", "-N", "-n", nodelist, "-o", "%N|%T|%E").splitlines()
    except SlurmUnavailable:
        return ""
    return ", ".join(parse_lost_nodes(rows))


def parse_lost_nodes(rows: list[str]) -> list[str]:
    """sinfo's '%N|%T|%E' rows -> 'NODE STATE (REASON)' for the nodes that are down, failed or not responding."""
    lost = []
    for row in dict.fromkeys(rows):  # a node in two partitions is listed twice
        node, state, reason = (row.split("|", 2) + ["", ""])[:3]
        if state.startswith(("down", "fail")) or state.endswith("*"):
            state = state.rstrip("*") + (", not responding" if state.endswith("*") else "")  # sinfo's '*'
            lost.append(f"{node} {state}" + (f" ({reason})" if reason not in ("", "none") else ""))
    return lost


def node_reasons(nodelist: str | None) -> dict[str, str]:
    """Slurm's reason for each node of `nodelist` that has one, `scontrol show node`'s Reason= without the
    '[user@time]' after it ('Not responding', 'Kill task failed', an administrator's words); {} when none, or when
    Slurm cannot say."""
    if not nodelist or nodelist == "(null)":
        return {}
    try:
        return parse_node_reasons(run("scontrol", "-o", "show", "node", nodelist))
    except SlurmUnavailable:
        return {}


NODE_REASON = re.compile(r"(?:^|\s)Reason=(.*?)(?:\s+\[[^\]@]*@[^\]]*\])?(?=\s+[A-Za-z]\w*=|\s*$)")


def parse_node_reasons(text: str) -> dict[str, str]:
    """`scontrol -o show node` (a line per node) -> {node: reason} for the nodes with one."""
    reasons = {}
    for line in text.splitlines():
        node, reason = re.search(r"(?:^|\s)NodeName=(\S+)", line), NODE_REASON.search(line)
        if node and reason and reason.group(1).strip() not in ("", "(null)", "none"):
            reasons[node.group(1)] = reason.group(1).strip()
    return reasons


def dropped_nodes(job_id: str | None, nodelist: str | None) -> list[str]:
    """The nodes of `nodelist` (the job's at its start) that running job `job_id` holds no more: Slurm takes a node set
    down or failed out of a --no-kill job (cluster.spare_nodes) and may return it to service at once, where sinfo
    no longer says it is down. [] when none, or when Slurm cannot say."""
    if not job_id or not nodelist or nodelist == "(null)":
        return []
    try:
        info = scontrol_job(job_id)
        now = info.get("NodeList") if info is not None and info.state in RUNNING else None
        if not now or now == "(null)":
            return []
        held = set(hostnames(now))
        return [h for h in hostnames(nodelist) if h not in held]
    except SlurmUnavailable:
        return []


def exclude_nodes(job_id: str, nodes: list[str]) -> None:
    """Keep a requeued job off `nodes` (Slurm takes it once the job is no longer running)."""
    run("scontrol", "update", f"jobid={job_id}", f"ExcNodeList={','.join(nodes)}", keep_on_term=True)


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        try:
            run("scancel", *map(str, job_ids), timeout=60)
        except SlurmUnavailable:
            pass


def hostnames(nodelist: str) -> list[str]:
    return parse_hostnames(run("scontrol", "show", "hostnames", nodelist))
