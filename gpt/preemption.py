"""Preemption: signal handlers only raise a flag; the training loop asks, at a step boundary, whether ANY rank
saw a signal (an OR over all ranks), so every rank stops at the same step and saves together."""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from gpt.errors import ConfigError

log = logging.getLogger(__name__)


class PreemptionFlag:
    def __init__(self, signals: list[str], device: torch.device):
        self.device = device
        self.received: int | None = None
        for name in signals:
            signum = getattr(signal, name, None)
            if not isinstance(signum, signal.Signals):
                raise ConfigError("preemption.signals", name, "signal names such as SIGTERM, SIGUSR2")
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        # Nothing else here: a handler may run in the middle of a collective or a checkpoint write.
        self.received = signum

    def any_rank(self) -> bool:
        """True on every rank when any rank has received a signal. A collective: every rank must call it."""
        flag = torch.tensor([0 if self.received is None else 1], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None
