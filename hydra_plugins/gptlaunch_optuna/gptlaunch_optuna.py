"""The sweeper Hydra uses for `python -m launch -m hydra/sweeper=optuna ...` (docs/day-to-day.md):

    python -m launch -m hydra/sweeper=optuna hydra.sweeper.n_trials=16 hydra.sweeper.n_jobs=4 \
        'train.lr=tag(log, interval(1e-4, 3e-2))' model=tiny

hydra-optuna-sweeper's keys and search-space grammar (sampler, direction, storage, study_name, n_trials, n_jobs,
params), with its study kept in `sqlite:///SWEEP/optuna.db` by default, so that the same command resumes it. Light
on imports: Hydra imports every plugin module on every start; the work is in launch.optuna_sweep.
"""
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import MISSING


class Direction(Enum):
    minimize = 1
    maximize = 2


@dataclass
class TPESamplerConf:  # made when the search starts (_partial_); TPESampler takes more: +hydra.sweeper.sampler.KEY=V
    _target_: str = "optuna.samplers.TPESampler"
    _partial_: bool = True
    seed: int | None = None
    n_startup_trials: int = 10
    multivariate: bool = False
    constant_liar: bool = False  # a batch's trials avoid the values of those still running


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    _partial_: bool = True
    seed: int | None = None


@dataclass
class GridSamplerConf:  # the grid is the search space's values (choice or range sweeps), each point once
    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: int | None = None


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.gptlaunch_optuna.gptlaunch_optuna.OptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING  # hydra/sweeper/sampler=tpe|random|grid
    direction: Direction = Direction.minimize  # of launcher.objective
    storage: str | None = None  # an Optuna storage URL; None: sqlite:///SWEEP/optuna.db
    study_name: str | None = None  # None: the sweep folder's name
    n_trials: int = 20  # the study's trials in all, those of earlier commands included
    n_jobs: int = 2  # trials launched together (a batch)
    params: dict[str, str] | None = None  # the search space, as key: 'interval(1e-4, 1e-2)' (or on the command line)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="gptlaunch")
for _name, _node in (("tpe", TPESamplerConf), ("random", RandomSamplerConf), ("grid", GridSamplerConf)):
    ConfigStore.instance().store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="gptlaunch")


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Direction, storage: str | None, study_name: str | None,
                 n_trials: int, n_jobs: int, params: dict[str, str] | None) -> None:
        self.sampler, self.direction, self.storage, self.study_name = sampler, direction, storage, study_name
        self.n_trials, self.n_jobs, self.params = n_trials, n_jobs, params
        self.config: Any = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        from launch.optuna_sweep import run_search

        run_search(self, arguments)
