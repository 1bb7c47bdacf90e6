"""A run that diverges keeps its good state. A non-finite loss on any rank is spread into its gradients
(`spread_nonfinite`), so the step's existing gradient reduction makes the global gradient norm non-finite on every
rank alike: the strategy then leaves the update out (one host read of the norm per step, no extra collective). A loss
spike is judged from the logged loss, which every rank holds alike after the log step's reduction. The guard then
acts on divergence.policy: stop with one line, or skip and train on, at most max_skips steps in a row. The
checkpointer keeps the newest checkpoint from before the first divergence and marks the ones saved after it."""
from __future__ import annotations

import logging
import statistics
from collections import deque

import torch

from gpt.checkpoint.store import list_checkpoints, step_of
from gpt.checkpoint.writer import Checkpointer
from gpt.config.divergence import DivergenceConfig

log = logging.getLogger(__name__)


class Diverged(Exception):
    """The run stopped on a divergence: one line naming the step and the newest checkpoint from before it."""


def spread_nonfinite(loss: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """`loss` (times a test-only `factor`, debug.nan_at_step and spike_at_step), whose backward is NaN wherever its
    value is not finite: a cross-entropy can be infinite with finite gradients, and only the gradients are reduced
    before the update. No host read: 0 * loss is 0, or NaN for an infinite or NaN loss."""
    if factor != 1.0:
        loss = loss * factor
    return loss * (1 + 0 * loss.detach())


class DivergenceGuard:
    def __init__(self, cfg: DivergenceConfig, checkpointer: Checkpointer, is_main: bool):
        self.cfg, self.checkpointer, self.is_main = cfg, checkpointer, is_main
        self.losses: deque[float] = deque(maxlen=cfg.spike_window or None)
        self.in_a_row = 0  # steps in a row whose update was left out
        self.skipped = 0  # in this attempt

    def after_step(self, step: int, skipped: bool) -> None:
        """`skipped`: the strategy left this step's update out, its global gradient norm not finite."""
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.act(step, "the loss or the gradient norm is not finite (the update was left out)")

    def after_record(self, step: int, loss: float) -> None:
        """The logged loss of `step`, the same on every rank: a spike against the last spike_window ones?"""
        window = self.cfg.spike_window
        if not window:
            return
        if len(self.losses) == window:
            mean, sd = statistics.fmean(self.losses), statistics.pstdev(self.losses)
            if loss > mean and (loss - mean) > self.cfg.spike_threshold * sd:
                self.act(step, f"the loss spiked to {loss:.4g}, {(loss - mean) / max(sd, 1e-12):.1f} standard "
                               f"deviations above the mean {mean:.4g} of the last {window} logged")
                return  # a spike does not join the window it is judged against
        self.losses.append(loss)

    def act(self, step: int, what: str) -> None:
        """The policy, on every rank alike (each saw the same)."""
        self.checkpointer.diverged(step)
        c = self.cfg
        if c.policy == "skip" and self.in_a_row < c.max_skips:
            self.skipped += 1
            if self.is_main:
                log.warning("step %d: %s; divergence.policy=skip: training goes on (%d in a row, at most %d)", step,
                            what, self.in_a_row, c.max_skips)
            return
        self.checkpointer.close()  # a save in flight is from before: it completes
        good = [p for p in list_checkpoints(self.checkpointer.root) if step_of(p) <= step]
        after = f" after {self.in_a_row} in a row (divergence.max_skips={c.max_skips})" if c.policy == "skip" else ""
        raise Diverged(f"the run diverged at step {step}: {what}{after}; the newest checkpoint from before it: "
                       f"{good[-1] if good else 'none'} (divergence.policy={c.policy})")
