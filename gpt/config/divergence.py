"""The divergence section: what a run does when its loss or gradient norm is not finite on some rank, or its loss
spikes (gpt.train.divergence). Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from gpt.errors import ConfigError

POLICIES = ("stop", "skip", "rollback")


@dataclass(frozen=True)
class DivergenceConfig:
    # stop: end the run (exit 1) naming the step and the newest checkpoint from before it; skip: leave the step's
    # update out (a spike's is already in: it is counted) and train on, stopping after max_skips steps in a row;
    # rollback: load the newest checkpoint from before the divergence, in the same process, and pass over the batches
    # trained since (the data position moves past them), at most max_rollbacks times without progress
    policy: str = "stop"
    max_skips: int = 3
    max_rollbacks: int = 3
    # a rollback made progress when the run trained this many steps past the step that diverged: the count of
    # rollbacks starts again
    rollback_progress_steps: int = 100
    # a loss spike: the logged loss this many standard deviations above the mean of the last spike_window logged
    # losses (every train.log_interval steps); spike_window=0: no spike rule
    spike_window: int = 0
    spike_threshold: float = 6.0

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError("divergence.policy", self.policy, f"one of {', '.join(POLICIES)}")
        if isinstance(self.max_skips, bool) or self.max_skips < 1:
            raise ConfigError("divergence.max_skips", self.max_skips, "a positive number of steps in a row")
        if isinstance(self.max_rollbacks, bool) or self.max_rollbacks < 1:
            raise ConfigError("divergence.max_rollbacks", self.max_rollbacks, "a positive number of rollbacks")
        if isinstance(self.rollback_progress_steps, bool) or self.rollback_progress_steps < 1:
            raise ConfigError("divergence.rollback_progress_steps", self.rollback_progress_steps,
                              "a positive number of steps")
        if isinstance(self.spike_window, bool) or self.spike_window < 0 or self.spike_window == 1:
            raise ConfigError("divergence.spike_window", self.spike_window,
                              "0 (no spike rule) or 2 or more logged losses")
        if not self.spike_threshold > 0:
            raise ConfigError("divergence.spike_threshold", self.spike_threshold,
                              "a positive number of standard deviations")
