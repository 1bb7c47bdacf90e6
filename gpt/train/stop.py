"""Why a run stops before its last step, agreed by every rank: a preemption signal on any rank (OR-reduced in the
step's all_reduce, or during an evaluation), the exclusion of a straggler's host, or a sweep's early stopping at a
rung (rank 0's verdict, gpt.train.early_stop). Every rank then saves and
stops at the same step. (The watchdog's halt stops the main thread itself, in gpt.resilience.progress.)"""
from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt.config.schema import RunConfig
from gpt.config.sections import PreemptionConfig
from gpt.collectives.flag_sum import sum_in_background
from gpt.collectives.process_group import all_reduce_values
from gpt.train.early_stop import Rungs
from gpt.resilience.exclusion import ExclusionDecision
from gpt.resilience.preemption import PreemptionFlag
from gpt.train.summary import FitSummary

log = logging.getLogger(__name__)
ANOTHER_RANK = "SIGNAL(another rank)"


class StopControl:
    """This rank's preemption flag, and the stop every rank agreed on (`reason`: a signal's name, or "straggler")."""

    def __init__(self, preemption: PreemptionConfig, rungs: Rungs | None = None, is_main: bool = True):
        self.flag = PreemptionFlag.installed(preemption.signals) if preemption.enabled else None
        self.rungs, self.is_main = rungs, is_main
        self.stopped_early: str | None = None  # why this sweep point stopped at a rung (rank 0's words)
        self.reason: str | None = None  # set on every rank once any rank got a preemption signal
        self.exclusion: ExclusionDecision | None = None  # a straggler's host to requeue without
        # the step flags' gloo group (set by gpt.train.step_flags): an evaluation's votes are summed there in
        # log2(ranks) rounds, not in a ring of 2(ranks - 1) hops on the default group, once per evaluation batch
        self.votes_group: Any = None

    @classmethod
    def of(cls, run: RunConfig, run_dir: Path, is_main: bool) -> StopControl:
        """The run's: its preemption section, and its sweep's early stopping (launcher.early_stop) at its rungs."""
        return cls(run.preemption, Rungs.of(run.launcher, run.train.eval_interval, run_dir), is_main)

    @property
    def raised(self) -> bool:
        """Whether this rank received a preemption signal."""
        return self.flag is not None and self.flag.raised

    def votes(self) -> list[float]:
        """1.0 for the signal this rank received, one value per signal it handles (the config's, in its order: the
        same on every rank), summed over the ranks in the step's all_reduce."""
        flag = self.flag
        return [] if flag is None else [1.0 if flag.received == s else 0.0 for s in flag.signals]

    def agree(self, votes: Sequence[float] = ()) -> None:
        """Some rank was signalled (the step's all_reduce said so): stop, naming our own signal if we got one, else
        the one the most ranks got (Slurm signals every task, but a rank may see it a step after another)."""
        if self.reason is None:
            self.reason = self._named(votes)

    def signalled_anywhere(self) -> bool:
        """Whether any rank was signalled (a collective: every rank calls it, between evaluation batches)."""
        if self.flag is None:  # preemption.enabled=false: on every rank alike
            return False
        if self.votes_group is None:
            votes = all_reduce_values(self.votes())
        else:
            votes = sum_in_background(self.votes(), self.votes_group).wait()[1]
        if not any(votes):
            return False
        self.reason = self._named(votes)
        return True

    def after_eval(self, step: int, loss: float, last: bool) -> bool:
        """At a rung (every rank alike): whether the point stops early, rank 0's verdict sent to every rank. At the
        `last` step its loss is still recorded for the points that come later."""
        if self.rungs is None or not self.rungs.at(step):
            return False
        cut = self.rungs.judge(step, loss) if self.is_main else None
        if all_reduce_values([1.0 if cut else 0.0])[0] and not last:
            self.reason, self.stopped_early = "early stop", cut.describe() if cut else "stopped early"
        return self.stopped_early is not None

    def exclude(self, decision: ExclusionDecision) -> None:
        """Save and stop like a preemption; the worker requeues the job without the straggler's host."""
        self.exclusion, self.reason = decision, "straggler"

    def summarise(self, summary: FitSummary, step: int) -> None:
        if self.exclusion is not None:
            summary.exclusion = self.exclusion.as_dict()
        elif self.stopped_early is not None:
            summary.stopped_early = self.stopped_early
            return
        elif self.reason is not None:
            log.warning("signal %s: every rank saves at step %d and stops", self.reason, step)  # why: once it stopped
        summary.preempted = self.reason

    def _named(self, votes: Sequence[float]) -> str:
        if self.flag is None:
            return ANOTHER_RANK
        if self.flag.signal_name:
            return self.flag.signal_name
        if votes and max(votes) > 0:
            return signal.Signals(self.flag.signals[list(votes).index(max(votes))]).name
        return ANOTHER_RANK
