"""Fault injection (`debug.*`), for tests and demonstrations only: the README marks it so. Every injection lives
here, behind hooks the trainer and the checkpointer call at fixed points; with the defaults each hook does
nothing, so a normal run is never changed.

    debug.delay_rank, delay_s           a rank sleeps every step (a straggler)
    debug.save_sleep_s, save_sleep_step a save stalls before it is committed (to kill a run mid-write)
    debug.signal_at_step, signal_rank,  a rank sends itself a signal before those steps (preemption)
      signal_name
    debug.unreadable_rank               that rank cannot read the newest checkpoint (resume must agree)
    debug.hang_rank, hang_step          a rank hangs at that step, or before it joins the others (the watchdog)
    debug.kill_rank, kill_step          a rank kills itself (SIGKILL) at that step (a dead rank)
    debug.straggler_rank, straggler_s   a rank sleeps every step of the first attempt (a sick host: excluded,
                                        the next attempt runs without it)

A hang or a kill happens only in the run's first attempt: the resumed attempt must be able to finish.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

from gpt.progress import PROGRESS
from gpt.run_config import DebugConfig

log = logging.getLogger(__name__)


class Faults:
    def __init__(self, cfg: DebugConfig, rank: int, attempt: int = 1):
        self.cfg, self.rank, self.first_attempt = cfg, rank, attempt == 1

    def before_start(self) -> None:
        """Before the rank joins the others: debug.hang_rank with no hang_step hangs here."""
        c = self.cfg
        if self.first_attempt and c.hang_rank == self.rank and c.hang_step is None:
            self._hang("before joining the other ranks")

    def before_step(self, step: int, first_step: int) -> float:
        """At the top of every step; returns the seconds slept (a straggler's lag)."""
        c = self.cfg
        # not at the step an attempt resumed from: it would stop again at once, for ever
        if step in c.signal_steps and step > first_step and self.rank == c.signal_rank:
            os.kill(os.getpid(), getattr(signal, c.signal_name))
        if self.first_attempt and c.kill_rank == self.rank and step == c.kill_step:
            log.warning("debug.kill_rank: rank %d kills itself at step %d", self.rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.first_attempt and c.hang_rank == self.rank and step == c.hang_step:
            self._hang(f"at step {step}")
        if c.delay_rank == self.rank and c.delay_s > 0:
            time.sleep(c.delay_s)
            return c.delay_s
        if self.first_attempt and c.straggler_rank == self.rank and c.straggler_s > 0:
            time.sleep(c.straggler_s)
            return c.straggler_s
        return 0.0

    def _hang(self, where: str) -> None:
        log.warning("debug.hang_rank: rank %d hangs %s", self.rank, where)
        PROGRESS.what = f"debug.hang_rank: hanging {where}"
        threading.Event().wait()  # for ever; the GIL is free, so the watchdog thread runs

    def before_commit(self, step: int) -> None:
        """Inside a save, after the shards and before meta.json."""
        c = self.cfg
        if c.save_sleep_s > 0 and c.save_sleep_step in (None, step):
            log.info("debug: sleeping %.1f s inside the save of step %d", c.save_sleep_s, step)
            time.sleep(c.save_sleep_s)

    def unreadable(self, newest: bool) -> str | None:
        """Why this rank cannot read a checkpoint, when a test says it cannot see the newest."""
        if newest and self.cfg.unreadable_rank == self.rank:
            return f"rank {self.rank} cannot read it (debug.unreadable_rank)"
        return None
