"""Why a run stops before its last step, agreed by every rank: a preemption signal on any rank (OR-reduced in the
step's all_reduce, or during an evaluation), or the exclusion of a straggler's host. Every rank then saves and
stops at the same step. (The watchdog's halt stops the main thread itself, in gpt.resilience.progress.)"""
from __future__ import annotations

import logging
from typing import Any

from gpt.config.sections import PreemptionConfig
from gpt.dist.process_group import any_true
from gpt.resilience.exclusion import ExclusionDecision
from gpt.resilience.preemption import PreemptionFlag

log = logging.getLogger(__name__)
ANOTHER_RANK = "SIGNAL(another rank)"


class StopControl:
    """This rank's preemption flag, and the stop every rank agreed on (`reason`: a signal's name, or "straggler")."""

    def __init__(self, preemption: PreemptionConfig):
        self.flag = PreemptionFlag.installed(preemption.signals) if preemption.enabled else None
        self.reason: str | None = None  # set on every rank once any rank got a preemption signal
        self.exclusion: ExclusionDecision | None = None  # a straggler's host to requeue without

    @property
    def raised(self) -> bool:
        """Whether this rank received a preemption signal."""
        return self.flag is not None and self.flag.raised

    def agree(self) -> None:
        """Some rank was signalled (the step's all_reduce said so): stop, naming our own signal if we got one."""
        if self.reason is None:
            self.reason = self._own_signal()

    def signalled_anywhere(self) -> bool:
        """Whether any rank was signalled (a collective: every rank calls it, between evaluation batches)."""
        if not any_true(self.raised):
            return False
        self.reason = self._own_signal()
        return True

    def exclude(self, decision: ExclusionDecision) -> None:
        """Save and stop like a preemption; the worker requeues the job without the straggler's host."""
        self.exclusion, self.reason = decision, "straggler"

    def summarise(self, summary: dict[str, Any], step: int) -> None:
        if self.exclusion is not None:
            summary["exclusion"] = self.exclusion.as_dict()
        elif self.reason is not None:
            log.warning("preemption signal %s: every rank saves at step %d and stops", self.reason, step)
        if self.reason is not None:
            summary["preempted"] = self.reason

    def _own_signal(self) -> str:
        return (self.flag.signal_name if self.flag is not None else None) or ANOTHER_RANK
