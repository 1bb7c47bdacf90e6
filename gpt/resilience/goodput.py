"""Goodput: the share of a run's allocated time that trained steps it kept.

Each attempt's line in RUN_DIR/attempts.jsonl carries a `goodput` record: its allocated wall time, and the
seconds it spent starting up (to the first step), training, evaluating, saving (the loop's blocked time) and
loading, how many steps of the attempt before it were trained again (lost: trained after that attempt's last
checkpoint), and how many of its own steps a rollback undid (lost too: trained again). An attempt that hung or lost
a node also says, in its line, how long that went unseen: from its last progress to the hang report (watchdog.*_s),
or to the scheduler's word on the node (AttemptLine.detection_s). The run's goodput is the training time of the steps
it kept over the allocated time of every attempt. Torch-free: the report reads it offline.

checkpoint.interval_minutes=auto chooses the interval that maximises expected goodput (Young/Daly):
sqrt(2 x the cost of one save x the mean time between interruptions).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpt.run_folder import CANCELLED, CTRL_C, AttemptLine, RunFolder, read_metrics_lines

PRIOR_MTBI_H = 24.0  # the prior mean time between interruptions, until the run has seen some
PRIOR_SAVE_S = 30.0  # the prior cost of a save, until the run has measured one


@dataclass
class Spent:
    """Seconds of an attempt spent in each phase of the training loop."""

    train_s: float = 0.0
    eval_s: float = 0.0
    save_s: float = 0.0
    saves: int = 0
    steps: int = 0
    steps_undone: int = 0  # of `steps`, those a rollback undid (divergence.policy=rollback): trained again, lost

    @contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, phase, getattr(self, phase) + time.perf_counter() - start)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _records(run_dir: Path, since: float) -> list[dict]:
    """Rank 0's metrics records from `since` on, their steps counting the steps done (a line cut short by a kill is
    skipped)."""
    records = []
    for r in read_metrics_lines(RunFolder(run_dir).metrics_file(0)):
        try:
            if float(r.get("time", 0.0)) >= since:
                records.append(r)
        except (ValueError, TypeError, AttributeError):
            continue
    return records


def kept_training_s(run_dir: Path, since: float, from_step: int, to_step: int) -> float:
    """Training seconds of steps from_step..to_step of an attempt that wrote no goodput record (killed outright, a
    hang, a failure): the steps times its median step time in rank 0's metrics, from `since` on."""
    times = [r.get("step_time_s") or 0.0 for r in _records(run_dir, since)
             if r.get("kind") == "train" and from_step < r.get("step", 0) <= to_step]
    return round(sorted(times)[len(times) // 2] * (to_step - from_step), 3) if times else 0.0


def last_record_time(run_dir: Path, since: float) -> float | None:
    """When rank 0 last wrote a metrics record, from `since` on: the last sign of life of an attempt killed
    outright (its lease's beat is gone with it, or already the next attempt's)."""
    times = [float(r["time"]) for r in _records(run_dir, since)]
    return max(times) if times else None


def last_trained_step(run_dir: Path, since: float) -> int | None:
    """How many steps the run had trained at rank 0's last train record from `since` on (an attempt whose trainer
    cannot say): its step, the steps done, as checkpoints and last_step count them."""
    steps = [r["step"] for r in _records(run_dir, since) if r.get("kind") == "train" and isinstance(r.get("step"), int)]
    return max(steps) if steps else None


ESTIMATED = "estimated"  # a goodput record's key: how an attempt that recorded no time was timed afterwards


@dataclass
class RunGoodput:
    attempts: int  # every attempt the log records
    allocated_s: float
    kept_train_s: float
    losses: dict[str, float] = field(default_factory=dict)  # seconds by cause
    untimed: int = 0  # attempts whose line has no time record (left out of the sums)
    estimated: int = 0  # attempts timed afterwards from what they left (metrics records, the lease's beat)
    interruptions: list[str] = field(default_factory=list)  # how each attempt that did not finish ended

    @property
    def goodput(self) -> float | None:
        return self.kept_train_s / self.allocated_s if self.allocated_s > 0 else None

    def describe(self) -> str:
        if self.goodput is None:
            return "goodput n/a (no attempt recorded its time)"
        lost = ", ".join(f"{k} {v:.1f} s" for k, v in self.losses.items() if v >= 0.05)
        text = (f"goodput {100 * self.goodput:.1f}%: {self.kept_train_s:.1f} s of training kept of "
                f"{self.allocated_s:.1f} s allocated over {self.attempts} attempt(s)")
        if self.estimated:
            text += f" ({self.estimated} of them timed from what it left: its last metrics record or beat)"
        if self.untimed:
            text += f" ({self.untimed} of them recorded no time)"
        text += f"; lost to {lost}" if lost else ""
        return text + (f"; interruptions: {'; '.join(self.interruptions)}" if self.interruptions else "")


def run_goodput(attempts: list[AttemptLine]) -> RunGoodput:
    """The run's goodput from its attempts' records (attempts without one are left out)."""
    records = [a.goodput for a in attempts]
    kept = [g for g in records if g]
    losses = {"start-up": 0.0, "restart in job": 0.0, "requeue": 0.0, "evaluation": 0.0, "saving": 0.0,
              "steps trained again": 0.0, **{f"{seen} detection": 0.0 for seen in DETECTED}, "other": 0.0}
    allocated = train = 0.0
    for i, g in enumerate(records):
        if not g:
            continue
        after = records[i + 1] if i + 1 < len(records) else None
        lost_steps = (after or {}).get("steps_replayed", 0) + g.get("steps_undone", 0)
        per_step = g["train_s"] / g["steps"] if g.get("steps") else 0.0
        lost = min(lost_steps * per_step, g["train_s"])
        allocated += g["allocated_s"]
        train += g["train_s"] - lost
        losses[recovery(attempts[i - 1]) if i else "start-up"] += g.get("startup_s", 0.0)
        losses["evaluation"] += g.get("eval_s", 0.0)
        losses["saving"] += g.get("save_s", 0.0)
        losses["steps trained again"] += lost
        for seen, seconds in detected(attempts[i], g):
            losses[f"{seen} detection"] += seconds
    losses["other"] = max(allocated - train - sum(losses.values()), 0.0)
    interruptions = [a.ended + shrunk(a) for a in attempts if a.ended and not (a.finished or a.stopped_early)]
    return RunGoodput(len(records), allocated, train, losses, untimed=len(records) - len(kept),
                      estimated=sum(1 for g in kept if g.get(ESTIMATED)), interruptions=interruptions)


DETECTED = ("hang", "lost node")  # what an attempt's detection_s may name: an end seen only after a wait


def detected(attempt: AttemptLine, g: dict) -> list[tuple[str, float]]:
    """How long the attempt's hang or lost node went unseen, by what it was; no more than the attempt's time that
    nothing else explains (its steps are timed by their median: the two may overlap by a step)."""
    unexplained = g["allocated_s"] - g.get("train_s", 0.0) - g.get("startup_s", 0.0) - g.get("eval_s", 0.0) \
        - g.get("save_s", 0.0)
    out = []
    for seen, seconds in attempt.detection_s.items():
        if seen in DETECTED and isinstance(seconds, (int, float)):
            out.append((seen, min(max(float(seconds), 0.0), max(unexplained, 0.0))))
            unexplained -= out[-1][1]
    return out


def shrunk(attempt: AttemptLine) -> str:
    """What an interruption the run went on from with fewer ranks says of it (launch.recovery.shrink)."""
    fewer = attempt.shrunk or {}
    return f" (went on with {fewer['to']} of {fewer['from']} ranks)" if "to" in fewer and "from" in fewer else ""


def recovery(before: AttemptLine) -> str:
    """Where the start-up of the attempt after `before` goes: after an in-job restart (launch.recovery.rounds) it is
    "restart in job", from the restart's request to the first step; after a requeue, "requeue" (the wait in the
    queue is not allocated time); else plain start-up (a new submission)."""
    if before.in_job_restart:
        return "restart in job"
    return "requeue" if before.requeued else "start-up"


REQUEUE_S = 10.0  # asking the scheduler to requeue, and the ranks leaving, before the time limit kills them
WINDOW_MARGIN = 2.0


def window_needed(step_s: float, save_s: float) -> float:
    """Seconds a time-limit warning must come early: the step under way, a save and the requeue, with a margin."""
    return WINDOW_MARGIN * (step_s + save_s + REQUEUE_S)


def young_daly_minutes(save_s: float, mtbi_s: float) -> float:
    """The checkpoint interval that maximises expected goodput, in minutes (at least a minute)."""
    return max(math.sqrt(2 * max(save_s, 0.01) * mtbi_s) / 60, 1.0)


def interruption_rate(attempts: list[AttemptLine]) -> tuple[float, str]:
    """Mean seconds between interruptions seen in the attempts log, or the prior; and where it came from."""
    ended = [a for a in attempts if a.goodput]
    stops = sum(1 for a in ended if not a.finished and a.ended not in (CANCELLED, CTRL_C))
    allocated = sum(a.goodput["allocated_s"] for a in ended)
    if stops:
        return allocated / stops, f"{stops} interruption(s) in {allocated / 3600:.2f} h of this run's attempts"
    return PRIOR_MTBI_H * 3600, f"no interruption seen yet: a prior of one per {PRIOR_MTBI_H:g} h"
