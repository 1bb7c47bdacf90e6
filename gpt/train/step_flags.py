"""The step's one small all-reduce: whether every rank's background checkpoint write is done, rank 0's verdict on
checkpoint.interval_minutes, and the ranks' votes for the preemption signal they got. Cast at one step and acted on
at the next, by every rank alike: it travels while the step computes, summed in log2(ranks) rounds on a gloo group
of its own (gpt.collectives.flag_sum; benchmarks/control_allreduce.py)."""
from __future__ import annotations

from typing import Any

from gpt.collectives.flag_sum import BackgroundSum, sum_in_background
from gpt.collectives.process_group import side_group
from gpt.train.saving import Saver
from gpt.train.stop import StopControl


class StepFlags:
    def __init__(self, saver: Saver, stop: StopControl, is_main: bool):
        self.saver, self.stop, self.is_main = saver, stop, is_main
        self.group = side_group("step_flags")  # the flags travel beside training
        stop.votes_group = self.group  # and an evaluation's votes, in the order every rank casts them
        self.cast: tuple[BackgroundSum, Any] | None = None  # cast at the last step, with the save they polled

    def exchange(self, step: int) -> float:
        """At the top of `step`: act on the last step's flags, and cast this step's unless the ranks agreed to stop.
        Returns the seconds this rank still waited for the last step's."""
        seconds = 0.0
        checkpointer = self.saver.checkpointer
        if self.cast is not None:
            (cast, polled), self.cast = self.cast, None
            seconds, (writing, due, *votes) = cast.wait()
            if writing == 0 and polled is not None and polled is checkpointer.pending:
                self.saver.commit_written(step)
            if any(votes):
                self.stop.agree(votes)
            if due:
                self.saver.policy.due = True
        if self.stop.reason is None:
            minutes_due = self.is_main and self.saver.policy.minutes_elapsed()
            values = [0.0 if checkpointer.poll_done() else 1.0, 1.0 if minutes_due else 0.0, *self.stop.votes()]
            self.cast = sum_in_background(values, self.group), checkpointer.pending
        return seconds

    def drain(self) -> None:
        """The last step's flags: every rank cast them, so every rank waits for them."""
        if self.cast is not None:
            self.cast[0].wait()
            self.cast = None
