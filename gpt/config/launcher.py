"""The launcher section: what a sweep's points are judged by (its objective) and early stopping across them. How
`python -m launch` submits and waits is the launcher's own section, hydra.launcher (launch.launcher_section).
Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gpt.errors import ConfigError


@dataclass(frozen=True)
class LauncherConfig:
    # the value of each point's training summary (summary.json) a sweeper that chooses points from results
    # minimises or maximises (hydra/sweeper=optuna): val_loss (the last evaluation), train_loss, tokens_per_s, ...
    objective: str = "val_loss"
    # asha: a sweep's points that do badly stop early (gpt.train.early_stop): at each rung, an evaluation at step
    # rung_steps * eta**k, a point whose validation loss is worse than the best 1/eta of the other points' saves
    # and stops; its resources go to the next point. none: every point trains to train.max_steps
    early_stop: str = "none"
    eta: int = 3
    rung_steps: int = 0  # the first rung's step: a multiple of train.eval_interval (0: train.eval_interval)
    # one key per knob: keys this section no longer has, refused with the key to use
    MOVED: ClassVar[dict[str, str]] = {key: f"hydra.launcher.{key} (the launcher's own section)"
                                       for key in ("detach", "snapshot", "pack")}

    def __post_init__(self) -> None:
        if self.early_stop not in ("none", "asha"):
            raise ConfigError("launcher.early_stop", self.early_stop, "none or asha")
        if self.eta < 2:
            raise ConfigError("launcher.eta", self.eta, "2 or more (the share of points that go on: 1/eta)")
        if self.rung_steps < 0:
            raise ConfigError("launcher.rung_steps", self.rung_steps, "0 (train.eval_interval) or a positive step")

    def check_rungs(self, eval_interval: int) -> None:
        """Rungs are evaluations: early stopping needs train.eval_interval, and rungs on its steps."""
        if self.early_stop == "none":
            return
        if eval_interval == 0:
            raise ConfigError("train.eval_interval", 0, "a positive number of steps with launcher.early_stop=asha "
                              "(its rungs are evaluations)")
        if self.rung_steps % eval_interval:
            raise ConfigError("launcher.rung_steps", self.rung_steps, f"a multiple of train.eval_interval="
                              f"{eval_interval} (its rungs are evaluations)")
