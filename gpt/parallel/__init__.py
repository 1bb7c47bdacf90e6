"""Parallel strategies, one per module, chosen by the strategy section's `name` from the registry
(gpt.parallel.traits.REGISTRY); each is a preset of the layout (`parallel.*`, gpt.parallel.layout) that says how the
data-parallel ranks work and which axes it runs. Planning the layout is torch-free; building a strategy imports it."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gpt.config.model import ModelConfig
from gpt.config.strategy import ParallelConfig, StrategyConfig
from gpt.config.train import TrainConfig
from gpt.parallel.layout import ParallelDims, check_dims
from gpt.parallel.traits import check_compile, traits_of

if TYPE_CHECKING:
    import torch

    from gpt.collectives.process_group import DistEnv
    from gpt.parallel.base import Strategy, StrategySettings

def strategy_class(name: str) -> type[Strategy]:
    """The registered implementation, imported on demand so an optional backend (DeepSpeed) costs nothing unused."""
    module, cls = traits_of(name).implementation.split(":")
    return getattr(importlib.import_module(module), cls)


def plan_layout(strategy: StrategyConfig, parallel: ParallelConfig, model_cfg: ModelConfig, world_size: int,
                ranks_per_node: int, train: TrainConfig | None = None) -> ParallelDims:
    """The run's layout, checked against the strategy, the model and the nodes (a ConfigError if it cannot run)."""
    traits = traits_of(strategy.name)
    tp = parallel.tp
    # The preset's own checks (stages, micro-batches) count the ranks of one tensor-parallel slice.
    slice_ranks = world_size // tp if tp > 0 and world_size % tp == 0 else world_size
    if train is not None:  # before the preset's own checks: fp8 on a strategy that refuses compile says why
        traits.check_precision(train, strategy, parallel)
        traits.check_compute(train, strategy, parallel)
    traits.data_parallel_size(strategy, parallel, model_cfg, slice_ranks, train)
    check_compile(model_cfg, train)
    if train is not None:
        traits.compile_scope(train)
        traits.check_compile_mode(train)
    dims = traits.layout(strategy, parallel, world_size)
    check_dims(dims, parallel, model_cfg, ranks_per_node)
    return dims


def build_strategy(strategy: StrategyConfig, parallel: ParallelConfig, model_cfg: ModelConfig, env: DistEnv,
                   device: torch.device, precision: str, settings: StrategySettings) -> Strategy:
    """This rank's strategy, on the layout of the strategy and parallel sections, with its `settings`."""
    dims = plan_layout(strategy, parallel, model_cfg, env.world_size, env.local_world_size)
    return strategy_class(strategy.name)(strategy, env, device, precision, dims, settings)
