"""The launcher section: how `python -m launch` behaves once a cluster=slurm job is accepted. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass


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
