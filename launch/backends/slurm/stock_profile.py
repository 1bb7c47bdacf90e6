"""A site profile (or any cluster=slurm key) under the stock hydra-submitit-launcher (`-m
hydra/launcher=submitit_slurm`): a Hydra callback (configs/config.yaml, hydra.callbacks) that runs on the login node
before the stock launcher submits anything. It checks the config as cluster=slurm would, refuses in one line what
the stock launcher cannot do, and writes what the cluster keys ask for into hydra.launcher.*, the keys the stock
launcher submits with: the same sbatch flags, srun flags, environment and setup lines as cluster=slurm's script. A
hydra.launcher.* key given on the command line wins, as a command-line key wins over a profile.

Hydra instantiates callbacks on every start: this module imports nothing heavy until a sweep uses the stock
launcher."""
from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback

from gpt.errors import ConfigError

# the parameters cluster=slurm gives submitit's SlurmExecutor -> the stock launcher's key for each (None: its own)
STOCK_KEYS = {"time": "timeout_min", "ntasks_per_node": "tasks_per_node", "job_name": None, "wckey": None}
# what only gptlaunch's own launcher does: the key, and why the stock one cannot
OWN_LAUNCHER_ONLY = {"chain": "a chain of jobs", "spare_nodes": "hot spares",
                     "container.image": "a container (the stock launcher starts the ranks with this python)"}


class StockLauncherProfile(Callback):
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from launch.backends.slurm.in_job import STOCK_LAUNCHER

        if config.hydra.launcher.get("_target_") == STOCK_LAUNCHER and config.cluster.name != "local":
            apply_profile(config)


def apply_profile(config: Any) -> None:
    """`config` (the sweep's, hydra node included) with its cluster keys written into hydra.launcher."""
    from omegaconf import OmegaConf, flag_override

    from launch import launch_config
    from launch.backends.slurm.resources import SlurmResources
    from launch.backends.slurm.step import workdir

    if config.cluster.name != "slurm":
        raise ConfigError("cluster.name", config.cluster.name, "local, or slurm (a site profile's): "
                          "hydra/launcher=submitit_slurm submits the jobs itself")
    run = launch_config.parse(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
    defaults = {"chain": 1, "spare_nodes": 0, "container.image": None}
    for key, what in OWN_LAUNCHER_ONLY.items():
        value = OmegaConf.select(config.cluster, key)
        if value != defaults[key]:
            raise ConfigError(f"cluster.{key}", value, f"{defaults[key]} under hydra/launcher=submitit_slurm, which "
                              f"cannot run {what}; cluster=slurm's own launcher (leave hydra/launcher) can")
    resources = SlurmResources.from_run(run)
    params = stock_parameters(resources.executor_parameters(run.name, workdir(), workdir()))
    params["max_num_timeout"] = resources.max_num_timeout
    given = {o.lstrip("+~").split("=")[0].removeprefix("hydra.launcher.") for o in config.hydra.overrides.hydra}
    launcher = config.hydra.launcher
    with flag_override(launcher, ["struct", "readonly"], [False, False]):
        for key, value in params.items():
            if key == "additional_parameters":
                value = {**value, **OmegaConf.to_container(launcher[key])}
            if key not in given:
                launcher[key] = value
    # the shape the jobs will have, checked against the rest now rather than in every task
    run.with_cluster(nodes=launcher.nodes, tasks_per_node=launcher.tasks_per_node)


def stock_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """SlurmExecutor's parameter names as the stock launcher's keys (it passes them on under its own)."""
    out = {}
    for key, value in params.items():
        name = STOCK_KEYS.get(key, key)
        if name is not None and value is not None:
            out[name] = value
    return out
