"""A run that diverges keeps its good state. A non-finite loss on any rank is spread into its gradients
(`spread_nonfinite`), so the step's existing gradient reduction makes the global gradient norm non-finite on every
rank alike: the strategy then leaves the update out on the device (fused AdamW's found_inf: no host read, no extra
collective). The guard counts those steps on the device too, and reads the count where the loss is read anyway (log
steps) and before a save. A loss spike is judged from the logged loss, which every rank holds alike after the log
step's reduction. The guard then acts on divergence.policy: stop with one line, or skip and train on, at most
max_skips steps in a row. The checkpointer keeps the newest checkpoint from before the first divergence and marks
the ones saved after it."""
from __future__ import annotations

import logging
import math
import statistics
from collections import deque

import torch

from gpt.checkpoint.store import list_checkpoints, step_of
from gpt.checkpoint.writer import Checkpointer
from gpt.config.divergence import DivergenceConfig

log = logging.getLogger(__name__)

# meta.json: {"count": rollbacks without progress so far, "diverged_at": the step that diverged at the last one}
ROLLBACKS = "rollbacks"


class Diverged(Exception):
    """The run stopped on a divergence: one line naming the step and the newest checkpoint from before it."""


class Rollback(Exception):
    """divergence.policy=rollback, on every rank alike: restore the newest checkpoint from before `step` and pass over
    the batches trained since (gpt.train.rollback)."""

    def __init__(self, step: int, what: str, count: int):
        super().__init__(f"step {step}: {what}")
        self.step, self.what, self.count = step, what, count  # count: rollbacks in a row without progress, this one


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
        self.in_a_row = 0  # steps in a row whose update was left out, as of the last settle()
        self.skipped = 0  # in this attempt
        # On the device, read by settle() only: [updates left out, in a row now, the first step left out, the step
        # whose update was the max_skips-th in a row]; -1: none
        self.tally: torch.Tensor | None = None
        self.tallies = False  # the strategy says which updates it left out (not under fp16: its loss scaler decides)
        # Rollbacks in a row without progress (divergence.rollback_progress_steps), and the step that diverged at the
        # last one: saved in every checkpoint (state()), so that a requeued attempt goes on counting
        self.rollbacks = 0
        self.rolled_back_at: int | None = None

    def state(self) -> dict[str, int | None]:
        """meta.json's record of the rollbacks so far (ROLLBACKS)."""
        return {"count": self.rollbacks, "diverged_at": self.rolled_back_at}

    def resume(self, meta: dict) -> None:
        """An attempt that resumed from a checkpoint goes on from its count (none in one written before it was
        saved). A rollback restores weights, not this count: the guard keeps its own."""
        saved = meta.get(ROLLBACKS) or {}
        self.rollbacks, self.rolled_back_at = int(saved.get("count", 0)), saved.get("diverged_at")

    def after_step(self, step: int, skipped: torch.Tensor | None) -> None:
        """`skipped` (0-dim bool, on the device): the strategy left this step's update out, its global gradient norm
        not finite. Counted on the device: no host read on the step's path."""
        if skipped is None:
            return
        self.tallies = True
        t = self.tally
        if t is None:
            t = torch.full((4,), -1, dtype=torch.int64, device=skipped.device)
            t[0], t[1] = 0, self.in_a_row
        bad = skipped.to(torch.int64)
        row = (t[1] + 1) * bad
        self.tally = torch.stack([t[0] + bad, row, torch.where((t[2] < 0) & skipped, step, t[2]),
                                  torch.where((t[3] < 0) & (row >= self.cfg.max_skips), step, t[3])])

    def settle(self) -> None:
        """Read the tally and act on it: at log steps, where the loss is read anyway, and before a save (which
        must know whether it comes after a divergence). Every rank holds the same tally."""
        if self.tally is None:
            return
        left_out, self.in_a_row, first, limit = self.tally.tolist()
        self.tally = None
        if not left_out:
            return
        self.checkpointer.diverged(first)
        what = "the loss or the gradient norm is not finite (the update was left out)"
        if self.cfg.policy == "skip" and limit < 0:
            self.skipped += left_out
            if self.is_main:
                log.warning("step %d: %s; divergence.policy=skip: training goes on (%d left out since the last log, "
                            "%d in a row now, at most %d)", first, what, left_out, self.in_a_row, self.cfg.max_skips)
            return
        if self.cfg.policy == "rollback":
            self.roll_back_or_stop(first, what)
        self.stop(first if self.cfg.policy != "skip" else limit, what)

    def roll_back_or_stop(self, step: int, what: str) -> None:
        """Rollback, unless max_rollbacks in a row made no progress (none trained rollback_progress_steps past the
        step that diverged)."""
        c, last = self.cfg, self.rolled_back_at
        if last is not None and step > last + c.rollback_progress_steps:
            self.rollbacks = 0
        if self.rollbacks >= c.max_rollbacks:
            self.stop(step, f"{what}, again after {self.rollbacks} rollbacks without progress (none trained "
                            f"{c.rollback_progress_steps} steps past the step that diverged; "
                            f"divergence.max_rollbacks={c.max_rollbacks})")
        self.rollbacks += 1
        self.rolled_back_at, self.in_a_row = step, 0
        self.losses.clear()  # the window starts again from the restored weights
        raise Rollback(step, what, self.rollbacks)

    def after_record(self, step: int, loss: float) -> None:
        """The logged loss of `step`, the same on every rank: a spike against the last spike_window ones? A loss
        that is not finite never joins the window: the tally has counted its step already, or (fp16, whose loss
        scaler only lowers its scale) it is a divergence here."""
        if not math.isfinite(loss):
            if not self.tallies:  # fp16: logged losses in a row stand for skipped steps in a row
                self.in_a_row += 1
                what = f"the logged loss is {loss} (train.precision=fp16: the loss scaler left the update out)"
                if self.cfg.policy == "skip" and self.in_a_row >= self.cfg.max_skips:
                    self.checkpointer.diverged(step)
                    self.stop(step, what)
                self.act(step, what)
            return
        if not self.tallies:
            self.in_a_row = 0
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
        """A loss spike, on every rank alike (each saw the same logged loss): its update is already in."""
        self.checkpointer.diverged(step)
        if self.cfg.policy == "rollback":
            self.roll_back_or_stop(step, what)
        if self.cfg.policy == "skip":
            self.skipped += 1
            if self.is_main:
                log.warning("step %d: %s; divergence.policy=skip: training goes on", step, what)
            return
        self.stop(step, what)

    def stop(self, step: int, what: str) -> None:
        self.checkpointer.close()  # a save in flight is from before: it completes
        good = [p for p in list_checkpoints(self.checkpointer.root) if step_of(p) <= step]
        c = self.cfg
        after = f" after {c.max_skips} in a row (divergence.max_skips={c.max_skips})" if c.policy == "skip" else ""
        raise Diverged(f"the run diverged at step {step}: {what}{after}; the newest checkpoint from before it: "
                       f"{good[-1] if good else 'none'} (divergence.policy={c.policy})")
