"""Preemption: signal handlers only raise a flag; the training loop asks, at a step boundary (and between
evaluation batches), whether ANY rank saw a signal (an OR over all ranks, folded into the step's one small
all_reduce), so every rank stops at the same step and saves together. Then the launcher's side of the rank
(launch.rank.job_env) asks the scheduler, if there is one, to run the job again.

Kept light (no torch at import): the worker installs the handlers first thing, so a signal that arrives while
torch imports or the process group forms is not lost (and does not kill the rank).
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from gpt.config import schema
from gpt.config.sections import PreemptionConfig, signal_names
from gpt.errors import EXIT_INTERRUPTED

log = logging.getLogger(__name__)


def parse_signals(names: Iterable[Any]) -> list[signal.Signals]:
    return [signal.Signals[name] for name in signal_names("preemption.signals", list(names))]


def configured_signals(config_file: Path) -> list[signal.Signals]:
    """The run's preemption.signals: what its ranks handle, and what a rank's task wrapper and srun catch and pass
    on to it (the rank ignores them until its flag is in place). Read before anything heavy, through the one reader
    of the run's config (its one UserError when the file cannot be read)."""
    return parse_signals(schema.load(config_file).preemption.signals)


class PreemptionFlag:
    """Installs handlers for `signals` that only record which signal came (the first one wins).

    Ctrl-C (SIGINT) is always one of them: the first makes every rank save at the next step and stop (no
    requeue: the user asked to stop); a second one stops this process at once."""

    _installed: PreemptionFlag | None = None

    def __init__(self, signals: Iterable[Any] = PreemptionConfig.signals):
        self.signals = self._with_ctrl_c(parse_signals(signals))
        self.received: int | None = None
        for signum in self.signals:
            signal.signal(signum, self._handle)
        PreemptionFlag._installed = self

    @staticmethod
    def _with_ctrl_c(signals: list[signal.Signals]) -> list[signal.Signals]:
        return signals if signal.SIGINT in signals else [*signals, signal.SIGINT]

    @classmethod
    def installed(cls, signals: Iterable[Any] = PreemptionConfig.signals) -> PreemptionFlag:
        """The process's flag: the one the worker installed early, re-pointed at `signals` (the config's)."""
        flag = cls._installed
        if flag is None:
            return cls(signals)
        wanted = cls._with_ctrl_c(parse_signals(signals))
        for signum in flag.signals:
            if signum not in wanted:
                signal.signal(signum, signal.SIG_DFL)
        for signum in wanted:
            signal.signal(signum, flag._handle)
        flag.signals = wanted
        return flag

    def _handle(self, signum: int, frame) -> None:
        # Nothing else here: a handler may run in the middle of a collective or a checkpoint write.
        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT == self.received:
            os._exit(EXIT_INTERRUPTED)  # Ctrl-C twice: stop at once, without a traceback

    @property
    def interrupted(self) -> bool:
        """The user pressed Ctrl-C: stop and stay stopped (a scheduler must not run the job again)."""
        return self.received == signal.SIGINT

    @property
    def raised(self) -> bool:
        return self.received is not None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None


def ctrl_c_pressed() -> bool:
    """Whether this process's flag caught the user's Ctrl-C."""
    flag = PreemptionFlag._installed
    return flag is not None and flag.interrupted
