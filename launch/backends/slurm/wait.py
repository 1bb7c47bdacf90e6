"""Waiting for submitted cluster=slurm jobs: a progress bar, one line per hang or requeue as it happens, and each
point's result, or its error and log path, as soon as its job ends.

Job states come from `squeue` (then `scontrol`, then `sacct`): submitit alone would ask `sacct`, which a cluster
without accounting lacks, and then never see a job that died without writing its result.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch import launch_config
from gpt.errors import UserError
from launch.recovery.hang import newest_hang
from gpt.run_folder import CANCELLED, AttemptLine, Next, RunFolder
from launch.backends.slurm import commands as slurm_commands
from launch.backends.slurm.commands import FINAL, GONE, RUNNING, JobInfo, SlurmUnavailable
from launch.backends.slurm.submitted import Submitted, show_path
from launch.backends.slurm.task import REFUSED
from launch.run.attempts import failed_saves_line, ran_on
from launch.run.identity import newest_step
from launch.run.job_record import cancelled_by_user
from launch.recovery.rounds import finished_on_spares

OUTAGE_GRACE_S = 120  # Slurm's commands may fail this long before the waiter gives up on them
FAST_FOR_S = 60.0  # the waiter polls at its own pace for this long after anything changed...
SLOW_POLL_S = 30.0  # ...then at a tenth of how long nothing has, up to this


@dataclass
class JobOutcome:
    """A finished job as the waiter collected it: its Slurm state, each task's result, the errors."""
    submitted: Submitted
    state: str
    results: list[Any] = field(default_factory=list)  # per task, when every task succeeded
    errors: list[str] = field(default_factory=list)
    stopped_with: str = ""  # a packed point its allocation stopped (not requeued): the allocation's decision

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and not self.errors and not self.cancelled and not self.stopped_with

    @property
    def cancelled(self) -> bool:
        """The user cancelled the job (scancel, launch.cancel): neither a failure nor a preemption."""
        return self.state == "CANCELLED" or cancelled_by_user(self.submitted.point.run_dir, self.submitted.job_id)

    @property
    def stopped(self) -> AttemptLine | None:
        """The line of its newest attempt when that saved after a preemption or a signal and nothing runs it again
        (a site whose preemption cancels, the restart limit): the run stopped, it did not fail (launch.status: stopped);
        the line says how, and how the same command continues it."""
        if self.ok or self.cancelled:
            return None
        s = self.submitted
        try:
            mine = [a for a in RunFolder(s.point.run_dir).attempts.read() if a.job_id == s.job_id]
        except OSError:
            mine = []
        last = mine[-1] if mine else None
        if last is not None and last.ended.startswith("preempted") and last.next is Next.STOP:
            return last
        if self.stopped_with:  # a packed point: how it ended (or that it did not start), then its allocation's end
            return AttemptLine(job_id=s.job_id, ended=last.ended if last else "did not start", note=self.stopped_with)
        return None

    @property
    def result(self) -> dict:
        """What a sweep point returns: where and how it ran, and rank 0's training summary."""
        s = self.submitted
        # the hosts that ran ranks: a spare that was never needed reports its host too (launch.backends.slurm.task)
        hosts = sorted({r["host"] for r in self.results if isinstance(r, dict) and "host" in r and not r.get("spare")})
        summary = next((r.get("summary") for r in self.results if isinstance(r, dict) and r.get("rank") == 0), None)
        return {"job_id": s.job_id, "run_dir": str(s.point.run_dir), "state": self.state,
                "nodes": s.point.resources.nodes, "world_size": s.point.resources.world_size, "hosts": hosts,
                "summary": summary}

    def message(self) -> str:
        s = self.submitted
        lines = [f"job {s.job_id} ({s.point.label}) ended {self.state}:"]
        lines += [f"  {e}" for e in self.errors]
        step = newest_step(s.point.run_dir)
        if self.state == "TIMEOUT":
            lines.append(f"  {timeout_line(s.point.run_dir, s.job_id, step)}")
        if step is not None and any(REFUSED in e for e in self.errors):
            lines.append(f"  once that is put right, the same command continues the run from its newest checkpoint "
                         f"(step {step})")
        elif step is not None and not any("the same command continues" in e for e in self.errors):  # said once
            lines.append(f"  the same command continues the run from its newest checkpoint (step {step})")
        if s.paths(0).stderr.exists():  # a job cancelled while pending has none
            lines.append(f"  job log: {show_path(s.paths(0).stderr)}")
        return "\n".join(lines)


def timeout_line(run_dir: Path, job_id: str, step: int | None) -> str:
    """Why a job that reached its time limit was not saved and requeued by the time-limit warning, from what its
    run folder holds."""
    folder = RunFolder(run_dir)
    warned = [a for a in folder.attempts.read() if a.job_id == job_id and a.ended.startswith("preempted:")]
    if warned:
        return ("it was warned before its time limit, but the save and the requeue did not finish in time: raise "
                "cluster.signal_delay_s (the warning's lead)")
    try:
        run = launch_config.load(folder.config)
    except UserError:
        return "it reached its time limit (cluster.time_min)"
    limit = f"it reached its time limit (cluster.time_min={run.cluster.time_min})"
    if not run.preemption.enabled:
        return f"{limit} with preemption.enabled=false: nothing saved it; turn preemption on or raise cluster.time_min"
    if step is None:
        return (f"{limit} before its first checkpoint, and no time-limit warning reached the ranks: raise "
                f"cluster.time_min, or save more often (checkpoint.interval_steps={run.checkpoint.interval_steps})")
    return (f"{limit}, and no attempt recorded a time-limit warning (asked for cluster.signal_delay_s="
            f"{run.cluster.signal_delay_s} s before the limit): it came too late for a step and a save, or never")



def ended(info: JobInfo, members: list[Submitted]) -> str | None:
    """The state a job ended in; None while it runs. A job COMPLETING whose run finished on spares has ended
    COMPLETED (its batch script says so, launch.backends.slurm.spare_exit): Slurm only waits to hear from a node it
    cannot reach, up to SlurmdTimeout, and has released the others."""
    if info.state in FINAL or info.state == GONE:
        return info.state
    if info.state == "COMPLETING" and all(finished_on_spares(s.point.run_dir, s.job_id) for s in members):
        return "COMPLETED"
    return None


def collect(s: Submitted, state: str, grace_s: float = 5.0) -> JobOutcome:
    """Read every task's result (a pickle submitit wrote) once the job has ended."""
    from submitit.core.utils import pickle_load

    outcome = JobOutcome(s, state)
    if s.packed:
        return collect_packed(outcome, grace_s)
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
    if missing and not outcome.errors and finished_on_spares(s.point.run_dir, s.job_id):
        missing = []  # the tasks of a node a spare replaced, killed with it (Slurm may say the job FAILED)
        outcome.state = "COMPLETED"
    if state == GONE and not missing and not outcome.errors:
        outcome.state = "COMPLETED"
    if outcome.state != "COMPLETED" or missing or outcome.errors:
        if missing and not outcome.errors:
            outcome.errors.append(_unreported(s, missing))
        if outcome.state == "COMPLETED":
            outcome.state = "FAILED"
    return outcome


def collect_packed(outcome: JobOutcome, grace_s: float) -> JobOutcome:
    """A point of a packed allocation: its entry in the result of the allocation's one task (launch.backends.slurm.
    pack_task), which holds every point that finished in any attempt."""
    from submitit.core.utils import pickle_load

    s, path = outcome.submitted, outcome.submitted.paths(0).result_pickle
    deadline = time.monotonic() + grace_s
    while not path.exists() and outcome.state in ("COMPLETED", GONE) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        kind, value = pickle_load(path)
    except Exception:  # missing, or cut short by a killed task
        outcome.errors.append(_unreported(s, [0]))
    else:
        failed = {"error": _exception_line(str(value), s, 0)}
        entry = value.get(str(s.point.run_dir), {}) if kind == "success" else failed
        outcome.results, outcome.stopped_with = entry.get("results", []), entry.get("stopped", "")
        if "error" in entry or not (outcome.results or outcome.stopped_with):
            outcome.errors.append(entry.get("error", "its step did not finish (the packed job's log says why)"))
    if outcome.state == GONE and not outcome.errors:
        outcome.state = "COMPLETED"
    if outcome.errors and outcome.state == "COMPLETED":
        outcome.state = "FAILED"
    return outcome


def _unreported(s: Submitted, missing: list[int]) -> str:
    """Why tasks wrote no result: the job never started (no log: cancelled or failed while pending), or it
    ended before they reported, with Slurm's exit code and reason and the end of its error output."""
    info = _job_info(s.job_id)
    why = ", ".join(f"{k}={info.get(k)}" for k in ("ExitCode", "Reason") if info and info.get(k) not in (None, "None"))
    why = f" ({why})" if why else ""
    if not s.paths(0).stderr.exists():
        return f"it never started (no job log): it was cancelled or failed while pending{why}"
    tail = _tail(s.paths(0).stderr)
    said = f"the job ended before {_tasks(missing, s.num_tasks)} reported{why}"
    if (line := _preempted_at_start(s, info)) is not None:  # the batch step recorded it (start_preempted)
        said = f"{line.ended}, while its tasks started: {said}; {line.note}"
    return said + ("; its error output ends:\n    " + "\n    ".join(tail) if tail else "")


def _preempted_at_start(s: Submitted, info: JobInfo | None) -> AttemptLine | None:
    """The line of a preemption that came before any rank reported, which the batch step wrote
    (launch.backends.slurm.start_preempted), if any."""
    try:
        line = RunFolder(s.point.run_dir).attempts.line_of(s.job_id, info.restarts if info else 0)
    except OSError:
        return None
    return line if line is not None and "preempted_by" in line.extra else None


def wait(submitted: list[Submitted], poll_s: float = 1.0, progress: bool = True) -> list[JobOutcome]:
    """Poll Slurm until every job has ended; report each as it ends (print_outcome: errors at once, not after the
    sweep)."""
    from tqdm import tqdm

    pending = {s.job_id: s for s in submitted}
    members: dict[str, list[Submitted]] = {}  # the points of each job: several when it is packed
    for s in submitted:
        members.setdefault(s.job_id, []).append(s)
    outcomes: dict[int, JobOutcome] = {}
    # A bar on a terminal; in a log file (nohup, CI) one line whenever the status changes.
    live = progress and sys.stderr.isatty()
    bar = tqdm(total=len(submitted), desc="jobs done", unit="job", file=sys.stderr, disable=not live,
               dynamic_ncols=True, mininterval=0.5)
    watch = Watch(earlier={p for s in submitted for p in RunFolder(s.point.run_dir).hang_records()},
                  saves_told={s.point.run_dir: len(RunFolder(s.point.run_dir).read_save_failures()) for s in submitted})
    backoff = Backoff(poll_s)
    try:
        while pending:
            infos = watch.poll([j for s in pending.values() for j in s.job_ids])  # a chain's every link
            active = [m for s in watch.active(pending) for m in members[s.job_id]]
            watch.tell_hangs(active)
            watch.tell_requeues(active)
            watch.tell_failed_saves(active)
            for jid, info in [(j, infos[j]) for j in list(pending) if j in infos]:  # a chain ends with its last
                if (state := ended(info, members[jid])) is not None:
                    pending.pop(jid)
                    for s in members[jid]:
                        outcomes[id(s)] = collect(s, state)
                        bar.update(1)
                        bar.clear()
                        print_outcome(outcomes[id(s)])
            status = watch.status(pending)
            bar.set_postfix_str(status, refresh=True)
            if progress and not live and status and status != watch.last_status:
                print(f"jobs: {len(outcomes)} of {len(submitted)} done, {status}", file=sys.stderr, flush=True)
            watch.last_status = status
            backoff.observe((status, len(pending), len(watch.hangs), len(watch.requeues),
                             sum(watch.saves_told.values()), watch.outage_since))
            if pending:
                time.sleep(backoff.interval())
    except KeyboardInterrupt:
        bar.close()
        ids = " ".join(j for s in pending.values() for j in s.job_ids)  # a chain's earlier links too
        folder = show_path(submitted[0].point.run_dir.parent if len(submitted) > 1 else submitted[0].point.run_dir)
        print(f"\ninterrupted: job(s) {ids} keep running; watch them with: squeue -j {ids.replace(' ', ',')}; "
              f"stop them with: scancel {ids}; when they have ended, build the report with: "
              f"python -m launch.report {folder}", file=sys.stderr)
        raise SystemExit(130) from None
    bar.close()
    return [outcomes[id(s)] for s in submitted]


@dataclass
class Watch:
    """The waiter's memory between polls: the last states it saw (kept through a Slurm outage, never taken
    for jobs that are gone), and the stuck jobs it has already explained."""

    infos: dict[str, JobInfo] = field(default_factory=dict)
    outage_since: float | None = None
    explained: set[str] = field(default_factory=set)
    last_status: str = ""
    earlier: set[Path] = field(default_factory=set)  # hang reports there before: earlier submissions
    hangs: set[str] = field(default_factory=set)  # the ones already told
    requeues: set[tuple] = field(default_factory=set)  # (job id, restart) of the attempts already told
    changed: set[str] = field(default_factory=set)  # the jobs whose state or reason the last poll changed
    saves_told: dict[Path, int] = field(default_factory=dict)  # run folder -> its refused saves told (or earlier)

    def active(self, pending: dict[str, Submitted]) -> list[Submitted]:
        """The jobs whose run folders may hold news (a hang, a requeue): those running, and those whose state just
        changed (a requeued job is pending again). A sweep's queued points cost the file system nothing."""
        return [s for s in pending.values()
                if (now := self.in_flight(s)).job_id in self.changed or now.state in RUNNING]

    def in_flight(self, s: Submitted) -> JobInfo:
        """Where a job stands; for a chain, its link in flight (the first not ended), whose successors wait on it
        (Dependency)."""
        for j in s.job_ids:
            info = self.infos.get(j, JobInfo(j, ""))
            if info.state not in FINAL:
                return info
        return self.infos.get(s.job_id, JobInfo(s.job_id, ""))

    def tell_hangs(self, jobs) -> None:
        """A job whose watchdog reported a hang (its ranks then requeue it): one line, as soon as it is written."""
        for s in jobs:
            line = newest_hang(s.point.run_dir, self.earlier)
            if line and line not in self.hangs:
                self.hangs.add(line)
                print(f"job {s.job_id} ({s.point.label}): {line}", file=sys.stderr, flush=True)

    def tell_requeues(self, jobs) -> None:
        """Each attempt that ended by requeueing its job (preempted, hung, a node excluded): one line from its
        record in attempts.jsonl, so that the login node says why a job runs again and without which nodes."""
        for s in jobs:
            for a in RunFolder(s.point.run_dir).attempts.read():
                key = (a.job_id, a.restart, a.round)
                recovered = a.next in (Next.REQUEUE, Next.RESTART)  # one line per in-job restart too
                if a.job_id != s.job_id or not recovered or key in self.requeues:
                    continue
                self.requeues.add(key)
                print(f"job {s.job_id} ({s.point.label}): {requeue_line(a)}", file=sys.stderr, flush=True)

    def tell_failed_saves(self, jobs) -> None:
        """An interval save that storage refused while the run trains on (checkpoint.on_save_error=continue): one
        line as soon as rank 0 records it, not only at the job's end."""
        for s in jobs:
            records = RunFolder(s.point.run_dir).read_save_failures()
            for record in records[self.saves_told.get(s.point.run_dir, 0):]:
                print(f"job {s.job_id} ({s.point.label}): checkpoint save at step {record.get('step')} failed: "
                      f"{record.get('error')} (checkpoint.on_save_error=continue: training goes on)",
                      file=sys.stderr, flush=True)
            self.saves_told[s.point.run_dir] = max(len(records), self.saves_told.get(s.point.run_dir, 0))

    def poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        try:
            fresh = slurm_commands.job_infos(job_ids)
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
        self.changed = {j for j, info in fresh.items() if self.infos.get(j) != info}
        self.infos.update(fresh)
        for info in fresh.values():
            if info.stuck_hint and info.job_id not in self.explained:
                self.explained.add(info.job_id)
                print(f"job {info.job_id} is pending ({info.reason}) and will not start by itself: "
                      f"{info.stuck_hint}", file=sys.stderr, flush=True)
        return fresh

    def status(self, pending: dict[str, Submitted]) -> str:
        """'1 running, 2 pending (Resources)': pending jobs (a chain: its link in flight) with their reasons."""
        counts: dict[str, int] = {}
        for info in (self.in_flight(s) for j, s in pending.items() if j in self.infos):
            why = f" ({info.reason})" if info.state != "RUNNING" and info.reason not in ("", "None") else ""
            key = info.state.lower() + why
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


@dataclass
class Backoff:
    """The waiter's pause between polls: `poll_s` until nothing has changed for FAST_FOR_S, then a tenth of how
    long nothing has (a job's end is then seen at most 10% late), up to SLOW_POLL_S; `poll_s` again as soon as
    anything changes. A sweep of hours costs Slurm a call every 30 s, not every second."""

    poll_s: float
    seen: object = None
    since: float = field(default_factory=time.monotonic)

    def observe(self, seen: object, now: float | None = None) -> None:
        """`seen`: what the waiter shows (states, reasons, lines told, an outage); a change makes it fast again."""
        now = time.monotonic() if now is None else now
        if seen != self.seen:
            self.seen, self.since = seen, now

    def interval(self, now: float | None = None) -> float:
        quiet = (time.monotonic() if now is None else now) - self.since
        if quiet < FAST_FOR_S:
            return self.poll_s
        return max(self.poll_s, min(SLOW_POLL_S, quiet / 10))


def requeue_line(attempt: AttemptLine) -> str:
    """'attempt 0 ended (excluded gl-n2) before its first step: requeued job 7 (...), without gl-n2'."""
    step, trained = attempt.last_step, attempt.trained_to
    resumes = f"step {step}" if step else "the start: no checkpoint yet"
    where = f"after step {trained} (the run resumes from {resumes})" if trained is not None else \
        f"at step {step}" if step is not None else "before its first step"
    name = f"attempt {attempt.restart}" + (f" round {attempt.round}" if attempt.round else "")
    return f"{name} ended ({attempt.ended}) {where}: {attempt.note or 'requeued'}{ran_on(attempt)}"


def print_outcome(outcome: JobOutcome, out=sys.stdout) -> None:
    s = outcome.submitted
    if outcome.ok:
        summary = outcome.result.get("summary") or {}
        loss = f", train loss {summary['train_loss']:.4f}" if summary.get("train_loss") is not None else ""
        loss += f"; {summary['stopped_early']}" if summary.get("stopped_early") else ""  # launcher.early_stop
        hosts = ", ".join(outcome.result["hosts"])
        failed = failed_saves_line(RunFolder(s.point.run_dir).attempts.read())
        print(f"job {s.job_id} ({s.point.label}) COMPLETED on {hosts}{loss}; run folder: {show_path(s.point.run_dir)}"
              + (f"; {failed}" if failed else ""), file=out, flush=True)
    elif (line := outcome.stopped) is not None:  # not requeued, by the site's policy or the restart limit
        print(f"job {s.job_id} ({s.point.label}) {line.ended}: {line.note}", file=out, flush=True)
    elif outcome.cancelled:
        step = newest_step(s.point.run_dir)
        where = f"its newest checkpoint (step {step})" if step is not None else "the start"
        print(f"job {s.job_id} ({s.point.label}) {CANCELLED}; the same command continues the run from {where}",
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
    for prefix in ("launch.backends.slurm.task.RankFailed: ", "launch.backends.slurm.task.RankStopped: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return f"task {task}: {last} (traceback in {show_path(s.paths(task).stderr)})"


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
