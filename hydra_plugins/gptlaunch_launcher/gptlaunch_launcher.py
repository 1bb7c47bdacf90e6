"""The launcher Hydra uses for `python -m launch -m ...` (configs/config.yaml: override hydra/launcher: gptlaunch).

    python -m launch -m nodes=1,2,4 cluster=slurm model=tiny     # three Slurm jobs: 1, 2 and 4 nodes
    python -m launch -m nodes=1,2 model=tiny                     # cluster=local: the points run one by one here

Unlike hydra-submitit-launcher, whose resources are resolved once from the primary config (so every point of
`-m nodes=1,2,4` would get the same --nodes), each point's own config decides its resources. Light on imports:
Hydra imports every plugin module on every start; the work is in launch.hydra_launcher.
"""

from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher

from launch.launcher_section import TARGET, LauncherSection


@dataclass
class GptlaunchLauncherConf(LauncherSection):
    """The launcher's section, hydra.launcher: its keys are launch.launcher_section's."""

    _target_: str = TARGET


ConfigStore.instance().store(group="hydra/launcher", name="gptlaunch", node=GptlaunchLauncherConf,
                             provider="gptlaunch")


class GptlaunchLauncher(Launcher):
    def __init__(self, **section: Any) -> None:  # hydra.launcher's keys: planning reads them with each point
        self.config: Any | None = None
        self.hydra_context: Any | None = None
        self.task_function: Any | None = None
        # a detached search (hydra/sweeper=optuna, hydra.launcher.detach=true): the command that goes on with it, and
        # the batches it may wait for, submitted as a job after the batch being launched; search_job is then its id
        self.search: tuple[list[str], int] | None = None
        self.search_job: str | None = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from launch.hydra_launcher import launch_sweep

        return launch_sweep(self, job_overrides, initial_job_idx)
