"""The launcher section: how `python -m launch` behaves once a cluster=slurm job is accepted. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from gpt.errors import ConfigError


@dataclass(frozen=True)
class LauncherConfig:
    # true: return as soon as Slurm accepted every job, printing their ids and the commands that follow them
    # (launch.status, launch.logs, launch.cancel); a sweep's report is then built by a dependency job
    detach: bool = False
    # true: every job runs a snapshot of the code taken at submission (launch.snapshot), not the checkout
    snapshot: bool = True
    # true: a cluster=slurm sweep's one-node points run as job steps inside one allocation per group of equal
    # resources, as many at once as the node's CPUs hold (launch.backends.slurm.pack)
    pack: bool = False
    # the value of each point's training summary (summary.json) a sweeper that chooses points from results
    # minimises or maximises (hydra/sweeper=optuna): val_loss (the last evaluation), train_loss, tokens_per_s, ...
    objective: str = "val_loss"
    # asha: a sweep's points that do badly stop early (gpt.train.early_stop): at each rung, an evaluation at step
    # rung_steps * eta**k, a point whose validation loss is worse than the best 1/eta of the other points' saves
    # and stops; its resources go to the next point. none: every point trains to train.max_steps
    early_stop: str = "none"
    eta: int = 3
    rung_steps: int = 0  # the first rung's step: a multiple of train.eval_interval (0: train.eval_interval)

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
