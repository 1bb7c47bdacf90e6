"""When to save a checkpoint: every checkpoint.interval_steps steps, and every checkpoint.interval_minutes (for
`auto`, the Young/Daly interval that maximises expected goodput); and whether the time-limit warning leaves room for
the save it triggers. Torch-free."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from gpt.config.sections import CheckpointConfig
from gpt.resilience.goodput import PRIOR_SAVE_S, Spent, interruption_rate, window_needed, young_daly_minutes
from gpt.run_folder import RunFolder

log = logging.getLogger(__name__)


class SavePolicy:
    """The save intervals of one attempt, from its own measured costs (`spent`) and the run's attempts log."""

    def __init__(self, ckpt: CheckpointConfig, run_dir: Path, spent: Spent, is_main: bool,
                 signal_delay_s: float | None = None):
        self.ckpt, self.run_dir, self.spent, self.is_main = ckpt, run_dir, spent, is_main
        self.signal_delay_s = signal_delay_s  # cluster.signal_delay_s: the time-limit warning's lead
        self.due = False  # interval_minutes elapsed (rank 0's clock, agreed in the step's all_reduce)
        self.last_save_time = time.monotonic()
        self.interval_minutes = self.checkpoint_interval()

    def minutes_elapsed(self) -> bool:
        """Whether checkpoint.interval_minutes has passed since the last save, on this rank's clock."""
        return (self.interval_minutes is not None
                and time.monotonic() - self.last_save_time >= 60 * self.interval_minutes)

    def save_now(self, step: int) -> bool:
        every = self.ckpt.interval_steps
        return bool(every and step % every == 0) or self.due

    def saved(self) -> None:
        """After a save (counted in `spent`): the clock restarts, and the first save's cost refines the policy."""
        if self.spent.saves == 1:  # now a save's cost is measured here
            if self.ckpt.interval_minutes == "auto":
                self.interval_minutes = self.checkpoint_interval()
            self.check_warning_window()
        self.due = False
        self.last_save_time = time.monotonic()

    def failed(self) -> None:
        """After a save that storage refused, with checkpoint.on_save_error=continue: try at the next interval."""
        self.due = False
        self.last_save_time = time.monotonic()

    def checkpoint_interval(self) -> float | None:
        """checkpoint.interval_minutes, or for `auto` the interval that maximises expected goodput (Young/Daly),
        from the save cost measured in this run (its earlier attempts before its first save) and the
        interruptions its attempts log has seen (or a prior)."""
        if self.ckpt.interval_minutes != "auto":
            return self.ckpt.interval_minutes
        earlier = RunFolder(self.run_dir).attempts.read()
        saves = [(a.goodput["save_s"], a.goodput.get("saves", 0)) for a in earlier if a.goodput]
        seconds, count = self.spent.save_s + sum(s for s, _ in saves), self.spent.saves + sum(n for _, n in saves)
        cost, source = (seconds / count, "measured") if count else (PRIOR_SAVE_S, "a prior until the first save")
        mtbi, why = interruption_rate(earlier)
        minutes = young_daly_minutes(cost, mtbi)
        if self.is_main:
            log.info("checkpoint.interval_minutes=auto: every %.1f min (Young/Daly: a save costs %.2f s, %s; %s)",
                     minutes, cost, source, why)
        return minutes

    def check_warning_window(self) -> None:
        """A time-limit warning (cluster.signal_delay_s before the limit) must leave room for the step under
        way, a save and the requeue, with a margin; say so, with a value that would, when it does not."""
        have = self.signal_delay_s
        if not self.is_main or have is None or not self.spent.steps:
            return
        need = window_needed(self.spent.train_s / self.spent.steps, self.spent.save_s / self.spent.saves)
        if need > have:
            log.warning("cluster.signal_delay_s=%s may be too short: a step (%.1f s), a save (%.1f s) and the requeue "
                        "need about %.0f s with a margin; set cluster.signal_delay_s=%d", have,
                        self.spent.train_s / self.spent.steps, self.spent.save_s / self.spent.saves, need,
                        math.ceil(need / 30) * 30)
