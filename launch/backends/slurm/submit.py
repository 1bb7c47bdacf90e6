"""Submitting planned cluster=slurm points and waiting for them: the budget guard, one submitit executor per
group of points with equal resources (a job array when the group has several), job ids and log paths as they
are submitted, a progress bar while waiting, and each point's result, or its error and log path.

Job states come from `squeue` (then `scontrol`, then `sacct`): submitit alone would ask `sacct`, which a cluster
without accounting lacks, and then never see a job that died without writing its result.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from gpt.goodput import read_attempts
from gpt.hang_report import newest_hang
from gpt.errors import UserError
from launch.backends.slurm import commands as slurm_commands
from launch.budget import Budget, PointCost, check_budget, table
from launch.backends.slurm.commands import FINAL, GONE, JobInfo, SlurmUnavailable
from launch.backends import Point
from launch.backends.slurm.resources import make_executor
from launch.backends.slurm.task import RankTask
from launch.run_identity import newest_step

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
OUTAGE_GRACE_S = 120  # Slurm's commands may fail this long before the waiter gives up on them


@dataclass
class Submitted:
    point: Point
    job_id: str
    folder: Path

    def paths(self, task: int = 0):
        from submitit.core.utils import JobPaths

        return JobPaths(self.folder, job_id=self.job_id, task_id=task)

    @property
    def num_tasks(self) -> int:
        return self.point.resources.world_size


@dataclass
class Outcome:
    submitted: Submitted
    state: str
    results: list[Any] = field(default_factory=list)  # per task, when every task succeeded
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and not self.errors

    @property
    def result(self) -> dict:
        """What a sweep point returns: where and how it ran, and rank 0's training summary."""
        s = self.submitted
        hosts = sorted({r["host"] for r in self.results if isinstance(r, dict) and "host" in r})
        summary = next((r.get("summary") for r in self.results if isinstance(r, dict) and r.get("rank") == 0), None)
        return {"job_id": s.job_id, "run_dir": str(s.point.run_dir), "state": self.state,
                "nodes": s.point.resources.nodes, "world_size": s.point.resources.world_size, "hosts": hosts,
                "summary": summary}

    def message(self) -> str:
        s = self.submitted
        lines = [f"job {s.job_id} ({s.point.label}) ended {self.state}:"]
        lines += [f"  {e}" for e in self.errors]
        if self.state == "TIMEOUT":
            lines.append("  it reached its time limit (cluster.time_min) before a warning saved it: keep preemption "
                         "on, with a cluster.signal_delay_s that covers a step, a save and the requeue")
        step = newest_step(s.point.run_dir)
        if step is not None:
            lines.append(f"  the same command continues the run from its newest checkpoint (step {step})")
        lines.append(f"  job log: {_show(s.paths(0).stderr)}")
        return "\n".join(lines)


def budget_gate(points: list[Point], budget: Budget, out=sys.stdout) -> None:
    """Print what the sweep may cost; refuse above the limit (before anything is submitted)."""
    costs = [PointCost(p.label, p.resources, p.resources.restarts) for p in points]
    print(table(costs, budget.max_node_hours, budget.applies_to), file=out, flush=True)
    check_budget(costs, budget.max_node_hours, budget.applies_to)


def submit(points: list[Point], folder: Path, out=sys.stdout) -> list[Submitted]:
    """One executor per group of points with equal resources; one job (or one job array) per group. If Slurm
    refuses a group, the jobs already submitted are cancelled: a sweep starts whole or not at all."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault((p.resources, p.job_name), []).append(p)
    submitted: list[Submitted] = []
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for (resources, job_name), group in groups.items():
            executor = make_executor(resources, folder, job_name)
            if len(group) == 1:
                jobs = [executor.submit(RankTask(str(group[0].run_dir)))]
            else:
                with executor.batch():
                    jobs = [executor.submit(RankTask(str(p.run_dir))) for p in group]
            for p, job in zip(group, jobs):
                s = Submitted(p, job.job_id, folder)
                submitted.append(s)
                paths = s.paths(0)
                (p.run_dir / "slurm_job.json").write_text(json.dumps(
                    {"job_id": s.job_id, "stdout": str(paths.stdout), "stderr": str(paths.stderr),
                     "submission": str(paths.submission_file), "resources": resources.describe(),
                     "inherited": inherited_rank_variables()}, indent=1))
                print(f"submitted job {s.job_id} for {p.label}: {resources.describe()}; log: {_show(paths.stdout)}",
                      file=out, flush=True)
    except KeyboardInterrupt:
        slurm_commands.cancel([s.job_id for s in submitted])
        raise UserError(f"interrupted while submitting; cancelled the {len(submitted)} job(s) already submitted"
                        f"{': ' + ' '.join(s.job_id for s in submitted) if submitted else ''}") from None
    except Exception as e:
        slurm_commands.cancel([s.job_id for s in submitted])
        done = f"; cancelled the {len(submitted)} job(s) already submitted" if submitted else ""
        raise UserError(f"Slurm refused a job of this sweep: {_first_line(e)}{done}") from None
    return submitted


def inherited_rank_variables() -> dict[str, str]:
    """torchrun-style variables of this (submitting) shell: sbatch passes them into the job, where Slurm's own
    must decide instead (launch.backends.slurm.task drops them)."""
    return {k: os.environ[k] for k in RANK_VARIABLES if k in os.environ}


def job_states(job_ids: list[str]) -> dict[str, JobInfo]:
    """Job id -> state and pending reason; GONE for the jobs Slurm forgot. SlurmUnavailable in an outage."""
    return slurm_commands.job_infos(job_ids)


def collect(s: Submitted, state: str, grace_s: float = 5.0) -> Outcome:
    """Read every task's result (a pickle submitit wrote) once the job has ended."""
    from submitit.core.utils import pickle_load

    outcome = Outcome(s, state)
    pickles = [s.paths(t).result_pickle for t in range(s.num_tasks)]
    if state in ("COMPLETED", GONE):  # a shared filesystem may show the files a little late
        deadline = time.monotonic() + grace_s
        while not all(p.exists() for p in pickles) and time.monotonic() < deadline:
            time.sleep(0.2)
    missing = []
    for task, path in enumerate(pickles):
        try:
            kind, value = pickle_load(path)
        except Exception:  # missing, or cut short by a killed task
            missing.append(task)
            continue
        if kind == "success":
            outcome.results.append(value)
        else:
            outcome.errors.append(_exception_line(str(value), s, task))
    if state == GONE and not missing and not outcome.errors:
        outcome.state = "COMPLETED"
    if outcome.state != "COMPLETED" or missing or outcome.errors:
        if missing and not outcome.errors:
            info = _job_info(s.job_id)
            why = ", ".join(f"{k}={info.get(k)}" for k in ("ExitCode", "Reason")
                            if info and info.get(k) not in (None, "None"))
            tail = _tail(s.paths(0).stderr)
            outcome.errors.append(f"the job ended before {_tasks(missing, s.num_tasks)} reported"
                                  f"{' (' + why + ')' if why else ''}" + ("; its error output ends:\n    "
                                  + "\n    ".join(tail) if tail else ""))
        if outcome.state == "COMPLETED":
            outcome.state = "FAILED"
    return outcome


def wait(submitted: list[Submitted], poll_s: float = 1.0, progress: bool = True,
         on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Poll Slurm until every job has ended; report each as it ends (errors at once, not after the sweep)."""
    from tqdm import tqdm

    pending = {s.job_id: s for s in submitted}
    outcomes: dict[str, Outcome] = {}
    # A bar on a terminal; in a log file (nohup, CI) one line whenever the status changes.
    live = progress and sys.stderr.isatty()
    bar = tqdm(total=len(submitted), desc="jobs done", unit="job", file=sys.stderr, disable=not live,
               dynamic_ncols=True, mininterval=0.5)
    watch = Watch(started=time.time())
    try:
        while pending:
            infos = watch.poll(list(pending))
            watch.tell_hangs(pending.values())
            watch.tell_requeues(pending.values())
            for jid, info in infos.items():
                if info.state in FINAL or info.state == GONE:
                    outcomes[jid] = collect(pending.pop(jid), info.state)
                    bar.update(1)
                    if on_done:
                        bar.clear()
                        on_done(outcomes[jid])
            status = watch.status(infos, pending)
            bar.set_postfix_str(status, refresh=True)
            if progress and not live and status and status != watch.last_status:
                print(f"jobs: {len(outcomes)} of {len(submitted)} done, {status}", file=sys.stderr, flush=True)
            watch.last_status = status
            if pending:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        bar.close()
        ids = " ".join(pending)
        folder = _show(submitted[0].point.run_dir.parent if len(submitted) > 1 else submitted[0].point.run_dir)
        print(f"\ninterrupted: job(s) {ids} keep running; watch them with: squeue -j {','.join(pending)}; "
              f"stop them with: scancel {ids}; when they have ended, build the report with: "
              f"python -m launch.report {folder}", file=sys.stderr)
        raise SystemExit(130) from None
    bar.close()
    return [outcomes[s.job_id] for s in submitted]


@dataclass
class Watch:
    """The waiter's memory between polls: the last states it saw (kept through a Slurm outage, never taken
    for jobs that are gone), and the stuck jobs it has already explained."""

    infos: dict[str, JobInfo] = field(default_factory=dict)
    outage_since: float | None = None
    explained: set[str] = field(default_factory=set)
    last_status: str = ""
    started: float = 0.0  # hang reports older than this belong to earlier submissions
    hangs: set[str] = field(default_factory=set)  # the ones already told
    requeues: set[tuple] = field(default_factory=set)  # (job id, restart) of the attempts already told

    def tell_hangs(self, jobs) -> None:
        """A job whose watchdog reported a hang (its ranks then requeue it): one line, as soon as it is written."""
        for s in jobs:
            line = newest_hang(s.point.run_dir, since=self.started)
            if line and line not in self.hangs:
                self.hangs.add(line)
                print(f"job {s.job_id} ({s.point.label}): {line}", file=sys.stderr, flush=True)

    def tell_requeues(self, jobs) -> None:
        """Each attempt that ended by requeueing its job (preempted, hung, a node excluded): one line from its
        record in attempts.jsonl, so that the login node says why a job runs again and without which nodes."""
        for s in jobs:
            for a in read_attempts(s.point.run_dir):
                key = (a.get("job_id"), a.get("restart"))
                if a.get("job_id") != s.job_id or not a.get("requeued") or key in self.requeues:
                    continue
                self.requeues.add(key)
                print(f"job {s.job_id} ({s.point.label}): {requeue_line(a)}", file=sys.stderr, flush=True)

    def poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        try:
            fresh = job_states(job_ids)
        except SlurmUnavailable as e:
            now = time.monotonic()
            if self.outage_since is None:
                self.outage_since = now
                print(f"Slurm does not answer ({e}); still waiting", file=sys.stderr, flush=True)
            elif now - self.outage_since > OUTAGE_GRACE_S:
                raise UserError(f"Slurm has not answered for {OUTAGE_GRACE_S} s ({e}); the jobs "
                                f"{' '.join(job_ids)} may still run: check with squeue") from None
            return {j: self.infos.get(j, JobInfo(j, "UNKNOWN")) for j in job_ids}
        if self.outage_since is not None:
            print("Slurm answers again", file=sys.stderr, flush=True)
            self.outage_since = None
        self.infos.update(fresh)
        for info in fresh.values():
            if info.stuck_hint and info.job_id not in self.explained:
                self.explained.add(info.job_id)
                print(f"job {info.job_id} is pending ({info.reason}) and will not start by itself: "
                      f"{info.stuck_hint}", file=sys.stderr, flush=True)
        return fresh

    @staticmethod
    def status(infos: dict[str, JobInfo], pending: dict[str, Submitted]) -> str:
        """'1 running, 2 pending (Resources)': pending jobs with their reasons."""
        counts: dict[str, int] = {}
        for info in (infos[j] for j in pending if j in infos):
            why = f" ({info.reason})" if info.state != "RUNNING" and info.reason not in ("", "None") else ""
            key = info.state.lower() + why
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def requeue_line(attempt: dict[str, Any]) -> str:
    """'attempt 0 ended (excluded gl-n2) before its first step: requeued job 7 (...), without gl-n2'."""
    step = attempt.get("last_step")
    where = f"at step {step}" if step is not None else "before its first step"
    note = attempt.get("note") or "requeued"
    return f"attempt {attempt.get('restart', 0)} ended ({attempt.get('ended')}) {where}: {note}"


def print_outcome(outcome: Outcome, out=sys.stdout) -> None:
    s = outcome.submitted
    if outcome.ok:
        summary = outcome.result.get("summary") or {}
        loss = f", train loss {summary['train_loss']:.4f}" if summary.get("train_loss") is not None else ""
        hosts = ", ".join(outcome.result["hosts"])
        print(f"job {s.job_id} ({s.point.label}) COMPLETED on {hosts}{loss}; run folder: {_show(s.point.run_dir)}",
              file=out, flush=True)
    else:
        print(f"error: {outcome.message()}", file=sys.stderr, flush=True)


def _job_info(job_id: str) -> JobInfo | None:
    try:
        return slurm_commands.scontrol_job(job_id)
    except SlurmUnavailable:
        return None


def _exception_line(traceback_text: str, s: Submitted, task: int) -> str:
    lines = [x for x in traceback_text.strip().splitlines() if x.strip()]
    last = lines[-1] if lines else "unknown error"
    prefix = "launch.backends.slurm.task.RankFailed: "
    if last.startswith(prefix):
        return last[len(prefix):]
    return f"task {task}: {last} (traceback in {_show(s.paths(task).stderr)})"


def _tasks(missing: list[int], total: int) -> str:
    if len(missing) == total:
        return "any rank"
    return "rank(s) " + ",".join(map(str, missing))


def _tail(path: Path, n: int = 6) -> list[str]:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return []
    # submitit's own chatter says nothing about the failure
    return [x[:300] for x in lines if "submitit INFO" not in x][-n:]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


def _show(path: Path) -> str:
    """A path as the user typed it: relative to where they are when that is shorter."""
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else str(path)
    except ValueError:
        return str(path)
