"""The launcher's section, hydra.launcher (hydra/launcher=gptlaunch, configs/config.yaml): how `python -m launch`
submits and waits, for one run and for a sweep alike. Hydra types and checks its keys (the plugin's config,
hydra_plugins/gptlaunch_launcher, is this dataclass); planning reads it once per point (launch.app.plan_run). Under
another launcher (the stock hydra/launcher=submitit_slurm) it keeps its defaults. Light: Hydra imports the plugin,
and so this module, on every start."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

TARGET = "hydra_plugins.gptlaunch_launcher.gptlaunch_launcher.GptlaunchLauncher"


@dataclass
class LauncherSection:
    poll_s: float = 1.0  # how often Slurm is asked about the jobs, until a minute without change (then up to 30 s)
    progress: bool = True  # a progress bar while waiting for the jobs
    # true: return as soon as Slurm accepted every job, printing their ids and the commands that follow them
    # (launch.status, launch.logs, launch.cancel); a sweep's report is then built by a dependency job
    detach: bool = False
    # true: every job runs a snapshot of the code taken at submission (launch.snapshot), not the checkout
    snapshot: bool = True
    # true: a cluster=slurm sweep's points run as job steps inside one allocation per group of equal resources, as
    # many at once as its nodes' CPUs, GPUs and memory hold (launch.backends.slurm.pack)
    pack: bool = False
    # the nodes of each packed allocation: a point of K nodes runs on K of them of its own (at most this many)
    pack_nodes: int = 1


def launcher_section(hydra_launcher: Any) -> LauncherSection:
    """hydra.launcher (Hydra's composed node) as a LauncherSection: the defaults under another launcher."""
    if hydra_launcher is None or hydra_launcher.get("_target_") != TARGET:
        return LauncherSection()
    return LauncherSection(**{f.name: hydra_launcher[f.name] for f in fields(LauncherSection)})
