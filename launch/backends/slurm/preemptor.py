"""Which job preempts this one. `scontrol show job` gives the victim's PreemptTime and never the job it makes room for,
and sacct records neither. During the grace time that job still pends (Reason=Resources) in a higher tier, another
partition (PreemptType=preempt/partition_prio) or QOS (preempt/qos), with the victim's nodes among those the scheduler
planned for it (squeue's SchedNodes, %Y); a job of the victim's own partition and QOS pending there waits, it does not
preempt. One squeue answers for every pending job, asked only at a preemption; another user's job is listed unless the
site hides it (PrivateData=jobs), and then Slurm does not say which. An attempt killed at the end of its grace time
cannot ask: the next one asks accounting which job of another tier started on its nodes first, after its end.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from launch.backends.slurm import commands

PENDING_FORMAT = "%i|%P|%q|%u|%Y"  # job id, partition, QOS, user, the nodes the scheduler planned for it
UNNAMED = "by another job (Slurm did not say which)"
# Slurm sets the victim's PreemptTime a moment before the preemptor's SchedNodes (0.25 s measured on the local
# cluster, Slurm 22.05): a lookup that comes that early asks once more.
PLAN_WAIT_S = 1.0
STARTED_FORMAT = "JobID,Partition,QOS,User,NodeList,Start"
# The preemptor starts once the victim's nodes are free: within KillWait and a scheduling pass of its end.
START_WINDOW_S = 120
_ITEM = re.compile(r"(?:[^,\[]|\[[^\]]*\])+")  # 'gl-n[1-3,5]' in 'gl-n[1-3,5],gpu7'
_GROUP = re.compile(r"([^\[]*)(?:\[([^\]]*)\])?")  # 'rack' '1-2' then '-n' '01-04' in 'rack[1-2]-n[01-04]'


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    partition: str
    qos: str
    user: str
    nodes: tuple[str, ...]  # planned for it (SchedNodes), or where it ran (accounting's NodeList), expanded
    start: str = ""  # when it started (accounting)

    def describe(self, victim_qos: str) -> str:
        """'job 10 (partition urgent, user alice)', with its QOS where it is not the victim's (preempt/qos)."""
        qos = [f"QOS {self.qos}"] if self.qos != victim_qos else []
        return f"job {self.job_id} ({', '.join([f'partition {self.partition}', *qos, f'user {self.user}'])})"


def expand_nodelist(text: str) -> list[str]:
    """Slurm's hostlist ('gl-n[1-3,05-06],gpu7') as host names, as `scontrol show hostnames` gives them: here
    without a call for each pending job."""
    if not text or text == "(null)":
        return []
    hosts: list[str] = []
    try:
        for item in _ITEM.findall(text):
            names = [""]
            for literal, ranges in _GROUP.findall(item):
                names = [n + literal + i for n in names for i in (_numbers(ranges) if ranges else [""])]
            hosts += names
    except ValueError:  # not a hostlist this parser knows: nothing is said to overlap it
        return []
    return hosts


def _numbers(ranges: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']: zero-padded to the width of the range's first number, as Slurm does."""
    out: list[str] = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        out += [str(n).zfill(len(low)) for n in range(int(low), int(high or low) + 1)]
    return out


def parse_pending(text: str) -> list[QueuedJob]:
    """`squeue -h -a -r -t PENDING,CONFIGURING -o '%i|%P|%q|%u|%Y'` -> the jobs, with the nodes planned for each;
    `sacct -n -P -o JobID,Partition,QOS,User,NodeList,Start` -> the jobs, with their nodes and start."""
    rows = [line.strip().split("|") for line in text.splitlines()]
    return [QueuedJob(r[0], r[1], r[2], r[3], tuple(expand_nodelist(r[4])), *r[5:]) for r in rows
            if len(r) in (5, 6) and r[0]]


def preemptors(pending: list[QueuedJob], job_id: str, nodes: list[str], partition: str, qos: str) -> list[QueuedJob]:
    """The pending jobs that take some of the victim's `nodes`, from another partition or QOS than its own."""
    held = set(nodes)
    return [p for p in pending if p.job_id != job_id and held.intersection(p.nodes)
            and (p.partition, p.qos) != (partition, qos)]


def named(found: list[QueuedJob], victim_qos: str) -> str:
    """'by job 10 (partition urgent, user alice)'; several that may each take some of the nodes, one or the other."""
    if not found:
        return UNNAMED
    return "by " + " or ".join(p.describe(victim_qos) for p in found)


def preempting(info: commands.JobInfo) -> str:
    """Who preempts the job `info` describes (scontrol's record of it, in its grace time): one squeue call, and a
    second PLAN_WAIT_S later when the first finds none (the batch step asks within a second of the signal)."""
    qos, nodes = info.get("QOS") or "", expand_nodelist(info.get("NodeList") or "")
    for wait in (0.0, PLAN_WAIT_S):
        time.sleep(wait)
        try:
            text = commands.run("squeue", "-h", "-a", "-r", "-t", "PENDING,CONFIGURING", "-o", PENDING_FORMAT)
        except commands.SlurmUnavailable:
            return UNNAMED
        if found := preemptors(parse_pending(text), info.job_id, nodes, info.get("Partition") or "", qos):
            return named(found, qos)
    return UNNAMED


def preempted_after(job_id: str, ended: str, nodelist: str, partition: str, qos: str) -> str:
    """Who took the nodes of an attempt Slurm killed at `ended` (accounting's End of its PREEMPTED record): the job of
    another partition or QOS that started on them first, within START_WINDOW_S of it. One sacct call."""
    try:
        until = datetime.fromisoformat(ended) + timedelta(seconds=START_WINDOW_S)
        text = commands.run("sacct", "-X", "-n", "-P", "-a", "-s", "R", "-S", ended, "-E",
                            until.isoformat(timespec="seconds"), "-N", nodelist, "-o", STARTED_FORMAT)
    except (ValueError, commands.SlurmUnavailable):
        return UNNAMED
    after = [j for j in preemptors(parse_pending(text), job_id, expand_nodelist(nodelist), partition, qos)
             if j.start >= ended]  # ISO times: ordered as strings
    first = min((j.start for j in after), default="")
    return named([j for j in after if j.start == first], qos)
